"""`loradar eval --suite/--eps-sweep/--plot/--strict`: names from the registry, curves, exit codes."""

import json

import pytest
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from loradar_cli.errors import EXIT_CODES
from loradar_cli.names import NORMS as NORM_NAMES
from loradar_cli.names import SUITES as SUITE_NAMES

runner = CliRunner()


def invoke(store, *args: str):
    return runner.invoke(app, ["eval", "--store", str(store.root), *args])


def test_suite_names_constant_matches_registry() -> None:
    from loradar_cli.evaluation import SUITES
    from loradar_cli.evaluation.suite import NORMS

    assert tuple(SUITES.names()) == SUITE_NAMES and NORMS == NORM_NAMES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "fast"], "unknown suite 'fast'; valid: plus, quick, standard"),
        (["--suite", "quick", "--norm", "l1"], "unknown norm 'l1'; valid: linf, l2"),
        (["--suite", "quick", "--plot", "x.png"], "--plot draws the --eps-sweep curves"),
        (["--eps-sweep", "0,1/255"], "--eps-sweep needs --suite or --attack"),
        (["--suite", "quick", "--eps-sweep", "2/255,1/255"], "increasing values"),
    ],
)
def test_bad_suite_options_are_one_line(tiny, args: list[str], message: str) -> None:
    store, *_ = tiny
    result = invoke(store, *args)
    assert result.exit_code == EXIT_CODES["InvalidValueError"] and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_suite_sweep_and_plot(tiny, tmp_path) -> None:
    store, _, adapter, model = tiny
    plot = tmp_path / "curve.png"
    result = invoke(
        store, "--adapter", adapter.name, "--no-base", "--suite", "quick", "--eps", "0.05", "--steps", "3",
        "--eps-sweep", "0,0.02,0.05", "--plot", str(plot), "--limit", "24", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["rows"]
    assert (row["suite"], row["norm"], row["eps"], row["seed"], row["n"]) == ("quick", "linf", 0.05, 0, 24)
    assert [r["label"] for r in row["records"]] == ["pgd", "apgd-ce"]
    assert (
        row["records"][1]["attack"]["config"]["steps"] == 3 and row["records"][0]["attack"]["config"]["alpha"] == 0.0125
    )
    from loradar_cli.data import load_data

    data = load_data("digits", "test", limit=24, channels=1, size=16)
    clean = (model.eval()(data.x).argmax(1) == data.y).float().mean().item()
    eps, acc = zip(*row["sweep"], strict=True)
    assert eps == (0, 0.02, 0.05) and acc[0] == pytest.approx(clean) and acc[-1] == pytest.approx(row["worst_case"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(plot)
    assert f"wrote {plot}" in result.stderr.replace("\n", "")


def test_strict_exits_3_when_a_flag_is_raised_after_printing(tiny, monkeypatch) -> None:
    store, _, adapter, _ = tiny
    args = ["--adapter", adapter.name, "--no-base", "--attack", "fgsm", "--eps", "0.05", "--limit", "8", "--json"]
    assert invoke(store, *args, "--strict").exit_code == 0, "no flag on an ordinary model"
    from loradar_cli.evaluation import checks

    monkeypatch.setattr(checks, "output_spread", lambda model, x, passes=3: 1.0)  # as if randomised
    result = invoke(store, *args, "--strict")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["rows"][0]["flags"][0]["id"] == "randomised"
    assert "randomised" in result.stderr
    assert invoke(store, *args).exit_code == 0, "without --strict flags only warn"


def test_suite_attack_options_keep_a_dashed_label_and_reach_the_built_attack():
    """`--attack-opt apgd-t.targets=3` must reach APGD-T (a label normalised to apgd_t was silently dropped)."""
    from loradar_cli.cli.evaluate import suite_spec
    from loradar_cli.evaluation.suite import suite_attacks
    from loradar_cli.jobs.evaluate import SuiteSpec

    extra = ["apgd-t.targets=3", "square.queries=1000", "apgd-ce.eot=2"]
    spec = suite_spec("standard", "linf", "0.1", None, extra, SuiteSpec)
    assert spec.overrides == {"apgd-t": {"targets": 3}, "square": {"queries": 1000}, "apgd-ce": {"eot": 2}}
    built = suite_attacks("standard", eps=spec.eps, overrides=spec.overrides)
    assert (built["apgd-t"].config.targets, built["square"].config.queries, built["apgd-ce"].config.eot) == (3, 1000, 2)


def test_the_table_goes_to_stderr_and_json_alone_to_stdout(tiny) -> None:
    """eval takes the output decision of every command: the table on stderr (none under -q), with or without
    --json; stdout holds nothing, or exactly one JSON document."""
    store, _, adapter, _ = tiny
    args = ["--adapter", adapter.name, "--no-base", "--attack", "fgsm", "--eps", "0.05", "--limit", "8"]
    human = invoke(store, *args)
    assert human.exit_code == 0 and human.stdout == "" and "accuracy (%) on digits test, n=8" in human.stderr
    assert adapter.name in human.stderr
    quiet = invoke(store, *args, "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and "accuracy (%)" not in quiet.stderr
    machine = invoke(store, *args, "--json")
    report = json.loads(machine.stdout)
    assert [r["model"] for r in report["rows"]] == [adapter.name] and "accuracy (%) on digits" in machine.stderr
    quiet_machine = invoke(store, *args, "--json", "-q")
    assert json.loads(quiet_machine.stdout)["rows"] == report["rows"]
    assert "accuracy (%)" not in quiet_machine.stderr
