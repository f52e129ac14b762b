"""benchmarks.__main__: rows keep the contract, a failing group is one failed row, the JSON holds every row."""

import json
import sys
import types
from pathlib import Path

import pytest

from benchmarks import ROW_KEYS
from benchmarks import __main__ as runner


def _row(**update: object) -> dict:
    row = {"row": "r", "baseline": "b", "ratio": 2, "goal": ">= 1", "met": 1, "threads": 1, "device": "cpu",
           "detail": "d", "extra": "dropped"}  # fmt: skip
    return {**row, **update}


def test_check_row_keeps_the_contract_keys_and_types() -> None:
    row = runner.check_row(_row(), "benchmarks.bench_x")
    assert list(row) == [*ROW_KEYS, "group"] and row["group"] == "benchmarks.bench_x"
    assert row["ratio"] == 2.0 and isinstance(row["ratio"], float) and row["met"] is True


def test_check_row_names_the_missing_keys() -> None:
    with pytest.raises(ValueError, match="lacks goal, met"):
        runner.check_row({k: v for k, v in _row().items() if k not in ("goal", "met")}, "g")


def _install(monkeypatch: pytest.MonkeyPatch, name: str, rows) -> None:
    module = types.ModuleType(name)
    module.rows = rows  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)


def test_a_group_that_raises_is_one_failed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(quick: bool) -> list[dict]:
        raise RuntimeError("no data")

    _install(monkeypatch, "benchmarks.bench_broken", broken)
    (row,) = runner.run_group("benchmarks.bench_broken", quick=True)
    assert row["met"] is False and row["ratio"] != row["ratio"], "nan ratio"
    assert row["detail"] == "RuntimeError: no data" and row["group"] == "benchmarks.bench_broken"


def test_main_writes_every_row_of_the_selected_groups(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = []
    _install(monkeypatch, "benchmarks.bench_fake", lambda quick: seen.append(quick) or [_row(row="a"), _row(row="b")])
    monkeypatch.setattr(runner, "groups", lambda: ["benchmarks.bench_fake", "benchmarks.bench_other"])
    out = tmp_path / "r.json"
    assert runner.main(["--quick", "--only", "fake", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert seen == [True] and document["quick"] is True
    assert [r["row"] for r in document["rows"]] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp")), "written through a temporary file"


def test_every_group_module_defines_rows() -> None:
    """Each bench_<group>.py the runner finds can be imported and exposes rows(quick)."""
    import importlib

    names = runner.groups()
    assert names and all(n.startswith("benchmarks.bench_") for n in names)
    for name in names:
        assert callable(importlib.import_module(name).rows)
