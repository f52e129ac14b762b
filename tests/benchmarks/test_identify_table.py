"""The identification benchmark's driver: attack options, the sets it crafts, reuse, and its markdown table."""

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from benchmarks import identify_table as t

MNIST = t.PRESETS["mnist"]
CIFAR = t.PRESETS["cifar10"]


def _opt(args: list[str], flag: str) -> str | None:
    """The value after `flag` in `args`, or None."""
    return args[args.index(flag) + 1] if flag in args else None


class Recorder(t.Runner):
    """A runner that runs nothing: it records each command and answers captures with a report built from it."""

    instances: ClassVar[list["Recorder"]] = []

    def __init__(self, store: Path, out: Path) -> None:
        super().__init__(store, out)
        self.calls: list[tuple[list[str], Path]] = []
        Recorder.instances.append(self)

    def run(self, args: list[str], result: Path, *, capture: bool = False) -> dict[str, Any] | None:
        self.calls.append((args, result))
        return fake_report(args) if capture else None


def fake_report(args: list[str]) -> dict[str, Any]:
    """An identify-attack/fit-identifier report whose sets are the command's --adv-set files (all named right)."""
    sets = {Path(args[i + 1]).name: args[i + 1] for i, a in enumerate(args) if a == "--adv-set"}
    per_set = {name: {"n": 10, "attack": name.split("-")[1], "accuracy": 1.0, "predicted": {}} for name in sets}
    return {
        "sets": {"clean": {"n": 10, "attack": "clean", "accuracy": 0.5, "predicted": {}}, **per_set},
        "accuracy": 0.9,
        "unknown_rate": 0.0,
        "features": ["residual"],
        "train_accuracy": 1.0,
        "held_out_accuracy": 0.95,
    }


def _eps_value(eps: str) -> float:
    num, _, den = eps.partition("/")
    return float(num) / float(den or 1)


@pytest.mark.parametrize("eps", ["0.05", "0.1", "0.2"])
def test_mnist_pgd_step_is_a_tenth_of_eps_over_20_steps(eps):
    args = t.attack_options(MNIST, "pgd", eps)
    assert _opt(args, "--eps") == eps
    assert float(_opt(args, "--alpha")) == pytest.approx(float(eps) / 10, rel=1e-5)
    assert _opt(args, "--steps") == "20"


def test_cifar_pgd_step_is_a_quarter_of_eps_over_10_steps():
    args = t.attack_options(CIFAR, "pgd", "8/255")
    assert _opt(args, "--eps") == "8/255"
    assert float(_opt(args, "--alpha")) == pytest.approx(8 / 255 / 4, rel=1e-5)
    assert _opt(args, "--steps") == "10"


def test_options_of_single_step_patch_and_unfitted_attacks():
    assert t.attack_options(MNIST, "fgsm", "0.2") == ["--eps", "0.2"]
    assert t.attack_options(MNIST, "fia", "0.05") == ["--eps", "0.05"]
    assert t.attack_options(MNIST, "roa", "0.2") == []  # ROA's budget is its patch, not eps
    unfitted = t.attack_options(MNIST, "pgd-l2", "0.05")  # fixed options whatever the eps
    assert unfitted == shlex.split(MNIST.unfitted["pgd-l2"]) and _opt(unfitted, "--eps") == "1.5"


def test_cifar_preset_has_an_adapter_per_family():
    assert set(CIFAR.adapters) == set(CIFAR.families) == {"pgd", "fgsm", "roa", "fia"}


def _crafted(runner: Recorder) -> dict[str, list[str]]:
    """Set file name -> the attack command that crafts it."""
    return {res.name: args for args, res in runner.calls if args[0] == "attack"}


def test_groups_craft_ensemble_and_adaptive_sets_at_every_eps(tmp_path):
    runner = Recorder(tmp_path / "store", tmp_path)
    rows = t.groups(runner, MNIST, [1.0, 10.0])
    crafted = _crafted(runner)
    assert len(crafted) == len(runner.calls)  # one command per set file: no set is crafted twice or overwritten
    main, others = MNIST.eps[0], MNIST.eps[1:]
    assert others  # the preset tests shift
    for eps in MNIST.eps:
        at = "" if eps == main else f", eps {eps}"
        want = set(MNIST.families) if eps == main else set(MNIST.families) - {"roa"}
        labels = [f"base, eps {eps}", f"ensemble soft vote{at}", f"ensemble route{at}"]
        labels += [f"adaptive: route + evading id-m, weight {w}{at}" for w in (["1", "10"] if eps == main else ["10"])]
        for label in labels:
            assert {f for f, _ in rows[label]} == want, label
            for family, path in rows[label]:
                args = crafted[path.name]
                assert _opt(args, "--attack") == family and _opt(args, "--split") == "test"
                assert _opt(args, "--eps") == (None if family == "roa" else eps)
                assert _opt(args, "--limit") == str(MNIST.limit)
                decision = _opt(args, "--decision")
                assert decision == {"base": None, "ensemble soft vote": "soft"}.get(label.split(",")[0], "route")
                if decision is not None:
                    assert _opt(args, "--members") == ",".join(MNIST.adapters.values())
                if decision == "route":
                    assert _opt(args, "--identifier") == MNIST.identifier
                if label.startswith("adaptive"):
                    assert _opt(args, "--evade-identifier") == "id-m"
                    assert _opt(args, "--evade-weight") == label.split("weight ")[1].split(",")[0]
                else:
                    assert "--evade-identifier" not in args
    assert "adaptive: route + evading id-m, weight 1, eps 0.05" not in rows
    adapters = dict(rows["each family's adapter"])
    assert {f: _opt(crafted[p.name], "--adapter") for f, p in adapters.items()} == MNIST.adapters


def test_shift_weights_and_another_identifier(tmp_path):
    first = Recorder(tmp_path / "store", tmp_path)
    t.groups(first, MNIST, [1.0, 10.0])
    runner = Recorder(tmp_path / "store", tmp_path)
    rows = t.groups(runner, MNIST, [10.0], "id-x", shift_weights=[1.0, 10.0])
    for eps in MNIST.eps[1:]:
        for w in ("1", "10"):
            for _, path in rows[f"adaptive: route + evading id-x, weight {w}, eps {eps}"]:
                args = _crafted(runner)[path.name]
                assert _opt(args, "--evade-identifier") == "id-x" and _opt(args, "--eps") in (eps, None)
                assert _opt(args, "--identifier") == "id-x"  # route with the identifier it evades
    adaptive = {n for n, a in _crafted(runner).items() if "--evade-identifier" in a}
    others = set(_crafted(runner)) - adaptive
    assert not adaptive & set(_crafted(first))  # sets against id-x never reuse those against id-m
    assert others <= set(_crafted(first))  # ... while the sets that do not depend on it are the same files


def test_runner_reuses_an_existing_result_and_runs_a_missing_one(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, env, **kwargs):
        calls.append((cmd, env["LORADAR_STORE"]))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"accuracy": 0.25}), stderr="")

    monkeypatch.setattr(t.subprocess, "run", fake_run)
    runner = t.Runner(tmp_path / "store", tmp_path)
    done = tmp_path / "done.json"
    done.write_text(json.dumps({"accuracy": 0.75}))
    assert runner.run(["identify-attack", "--json"], done, capture=True) == {"accuracy": 0.75}
    assert calls == []  # reused, not run
    missing = tmp_path / "missing.json"
    assert runner.run(["identify-attack", "--json"], missing, capture=True) == {"accuracy": 0.25}
    assert calls == [([*t.CLI, "identify-attack", "--json"], str(tmp_path / "store"))]
    assert json.loads(missing.read_text()) == {"accuracy": 0.25}  # kept for the next run
    assert runner.commands == ["loradar identify-attack --json"] * 2  # both are in the summary's commands


def test_runner_stops_on_a_failed_command_without_writing_its_result(tmp_path, monkeypatch):
    def fail(cmd, env, **kwargs):
        return subprocess.CompletedProcess(cmd, 3, stdout="", stderr="error: no such adapter")

    monkeypatch.setattr(t.subprocess, "run", fail)
    result = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="no such adapter"):
        t.Runner(tmp_path, tmp_path).run(["attack"], result, capture=True)
    assert not result.exists()


def _set(attack: str, n: int, predicted: dict[str, int]) -> dict[str, Any]:
    return {"n": n, "attack": attack, "accuracy": predicted.get(attack, 0) / n, "predicted": predicted}


def test_table_from_hand_made_reports():
    report = {
        "sets": {
            "clean": _set("clean", 200, {"clean": 190, "roa": 4, "unknown": 6}),
            "test-pgd.safetensors": _set("pgd", 200, {"pgd": 189, "fia": 2, "unknown": 9}),
            "test-fgsm.safetensors": _set("fgsm", 100, {"fgsm": 50, "unknown": 50}),
            "test-pgd-l2.safetensors": _set("pgd-l2", 200, {"unknown": 150, "pgd": 50}),
        },
        "accuracy": 429 / 700,
        "unknown_rate": 215 / 700,
    }
    results = [
        {"row": "base, eps 0.1", "mode": "id-m", "target_accuracy": {"pgd": 0.0, "fgsm": 0.164}, "report": report},
        {"row": "rules", "mode": "rule", "target_accuracy": {}, "report": {**report, "unknown_rate": None}},
    ]
    lines = t.table(MNIST, results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:6] == list(MNIST.families) and len(lines) == 2 + len(results)
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    first = cells[0]
    assert first["sets crafted against"] == "base, eps 0.1" and first["identifier"] == "id-m"
    assert first["pgd"] == f"{100 * 189 / 200:.1f} (0)"
    assert first["fgsm"] == "50.0 (16)"
    assert first["roa"] == first["fia"] == "–"  # no set of that family in the group
    assert first["clean"] == "95.0"
    assert first["all"] == f"{100 * 429 / 700:.1f}" and first["unknown"] == f"{100 * 215 / 700:.1f}"
    assert first["not fitted: unknown"] == "pgd-l2 75.0"
    assert cells[1]["pgd"] == "94.5" and cells[1]["unknown"] == "0.0"  # no target accuracy, no unknown rate


def test_score_runs_the_rules_only_on_the_main_base_row(tmp_path, monkeypatch):
    monkeypatch.setattr(t, "target_accuracy", lambda path: 0.5)
    runner = Recorder(tmp_path / "store", tmp_path)
    rows = {
        "base, eps 0.1": [("pgd", tmp_path / "test-pgd-e0.1.safetensors")],
        "base, eps 0.05": [("pgd", tmp_path / "test-pgd-e0.05.safetensors")],
    }
    results = t.score(runner, MNIST, rows, "id-m", rules=True)
    modes = [(r["row"], r["mode"]) for r in results]
    assert modes == [
        ("base, eps 0.1", "id-m"),
        ("base, eps 0.1", "id-m, no reject"),
        ("base, eps 0.1", "relative-rule"),
        ("base, eps 0.1", "rule"),
        ("base, eps 0.05", "id-m"),
        ("base, eps 0.05", "id-m, no reject"),
    ]
    reports = [res for args, res in runner.calls]
    assert len(set(reports)) == len(reports)  # every (row, mode) has its own report file
    rule = next(args for args, _ in runner.calls if "rule" in args)
    assert rule[1 : 1 + len(MNIST.adapters)] == list(MNIST.adapters.values())
    assert all(r["target_accuracy"] == {"pgd": 0.5} for r in results)


def test_main_writes_a_summary_with_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(t, "target_accuracy", lambda path: None)
    monkeypatch.setattr(t, "Runner", Recorder)
    t.main(["--preset", "mnist", "--out", str(tmp_path), "--store", str(tmp_path / "store"), "--shift-weights", "1,10"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = {r["row"] for r in summary["rows"]}
    for eps in MNIST.eps[1:]:
        assert {f"adaptive: route + evading id-m, weight {w}, eps {eps}" for w in ("1", "10")} <= labels
        assert {f"ensemble soft vote, eps {eps}", f"ensemble route, eps {eps}"} <= labels
    assert summary["fit"] == {"id-m": {"features": ["residual"], "train_accuracy": 1.0, "held_out_accuracy": 0.95}}
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + len(summary["rows"])


def test_only_crafts_the_rows_it_finds(tmp_path):
    runner = Recorder(tmp_path / "store", tmp_path)
    rows = t.groups(runner, MNIST, [10.0], only="^base|adaptive")
    assert set(rows) == {f"base, eps {e}" for e in MNIST.eps} | {
        f"adaptive: route + evading id-m, weight 10{'' if e == MNIST.eps[0] else f', eps {e}'}" for e in MNIST.eps
    }
    assert len(runner.calls) == sum(len(sets) for sets in rows.values())  # nothing else was crafted


def test_balanced_defence_fits_with_balance_and_without_adaptive_roa(tmp_path, monkeypatch):
    monkeypatch.setattr(t, "target_accuracy", lambda path: None)
    monkeypatch.setattr(t, "Runner", Recorder)
    monkeypatch.setattr(Recorder, "instances", [])
    argv = ["--out", str(tmp_path), "--defence", "--defence-balanced", "--defence-only", "--rows", "^base"]
    t.main(argv)
    calls = Recorder.instances[0].calls
    fits = {_opt(args, "--name"): args for args, _ in calls if args[0] == "fit-identifier"}
    assert set(fits) == {"id-m", "id-m-bal"}
    assert "--balance" in fits["id-m-bal"] and "--balance" not in fits["id-m"]
    fitted_on = [Path(s).name for s in fits["id-m-bal"][fits["id-m-bal"].index("--adv-set") :][1::2]]
    adaptive = sorted(n for n in fitted_on if "adaptive" in n)
    assert adaptive == sorted(f"val-{f}-adaptive-w10.safetensors" for f in ("pgd", "fgsm", "fia"))  # no ROA
    assert {f"val-{f}-e{e}.safetensors" for e in MNIST.eps[1:] for f in ("pgd", "fgsm", "fia")} <= set(fitted_on)
    summary = json.loads((tmp_path / "summary-id-m-bal.json").read_text())
    assert {r["row"] for r in summary["rows"]} == {f"base, eps {e}" for e in MNIST.eps}
    assert {r["mode"] for r in summary["rows"]} == {"id-m-bal", "id-m-bal, no reject"}


def test_rows_limits_the_first_identifiers_rows_and_keeps_the_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(t, "target_accuracy", lambda path: None)
    monkeypatch.setattr(t, "Runner", Recorder)
    monkeypatch.setattr(Recorder, "instances", [])
    t.main(["--preset", "cifar10", "--out", str(tmp_path), "--rows", "^base"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["row"], r["mode"]) for r in summary["rows"]] == [
        ("base, eps 8/255", mode) for mode in ("id-c", "id-c, no reject", "relative-rule", "rule")
    ]
    crafted = [args for args, _ in Recorder.instances[0].calls if args[0] == "attack"]
    assert len(crafted) == 2 * len(CIFAR.families)  # the val sets to fit on and the base's test sets, no others
    assert all("--members" not in args and "--adapter" not in args for args in crafted)
