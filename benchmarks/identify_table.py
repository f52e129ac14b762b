"""`python -m benchmarks.identify_table --preset mnist|cifar10`: attack identification under shift and adaptation.

Crafts labelled sets with `loradar attack` (val sets against the base to fit on; held-out test sets against the
base, against the ensemble's soft vote and identify-then-route decisions and by the adaptive attacker who
attacks route and hides the family from the identifier, each at every eps of the preset, and against each
family's adapter at the main eps), fits the identifier with `loradar fit-identifier` on the val sets, scores
every group of test sets (with the clean test split) with `loradar identify-attack`, and prints a markdown
table. Every command is printed on stderr and kept in the JSON summary; sets and reports that exist are reused,
so a run can be resumed. Needs a store with the preset's base and adapters (README quickstart commands) and the
data under LORADAR_DATA.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import data_root

DATA_ROOT = data_root()


@dataclass(frozen=True)
class Preset:
    """A base, its adapters by attack family, attack options per eps, and the identifier to fit."""

    data: str
    base: str
    adapters: dict[str, str]
    families: tuple[str, ...]
    options: dict[str, str]  # family -> options, "{eps}" and "{alpha}" filled in
    eps: tuple[str, ...]  # the first is the main eps (fitting, adapters, ensembles)
    identifier: str
    features: str = "auto"
    limit: int = 200
    unfitted: dict[str, str] = field(default_factory=dict)  # attacks no identifier is fitted on -> options


PRESETS = {
    "mnist": Preset(
        data=f"mnist:{DATA_ROOT}/mnist",
        base="mnist-base",
        adapters={f: f"mnist-{f}" for f in ("pgd", "fgsm", "roa", "fia")},
        families=("pgd", "fgsm", "roa", "fia"),
        options={
            "pgd": "--eps {eps} --alpha {alpha} --steps 20",
            "fgsm": "--eps {eps}",
            "fia": "--eps {eps}",
            "roa": "",
        },
        eps=("0.1", "0.05", "0.2"),
        identifier="id-m",
        unfitted={"pgd-l2": "--eps 1.5 --alpha 0.2 --steps 20"},
    ),
    "cifar10": Preset(
        data=f"cifar10:{DATA_ROOT}",
        base="c10-base",
        adapters={f: f"c10-{f}" for f in ("pgd", "fgsm", "roa", "fia")},
        families=("pgd", "fgsm", "roa", "fia"),
        options={
            "pgd": "--eps {eps} --alpha {alpha} --steps 10",
            "fgsm": "--eps {eps}",
            "fia": "--eps {eps}",
            "roa": "",
        },
        eps=("8/255",),
        identifier="id-c",
    ),
}

CLI = [sys.executable, "-m", "loradar_cli"]


def _eps_value(eps: str) -> float:
    num, _, den = eps.partition("/")
    return float(num) / float(den or 1)


def attack_options(preset: Preset, family: str, eps: str) -> list[str]:
    """The attack's options at `eps` (PGD's step is eps/10 over 20 steps on MNIST, eps/4 over 10 on CIFAR-10)."""
    if family in preset.unfitted:
        return shlex.split(preset.unfitted[family])
    steps = 20 if "--steps 20" in preset.options[family] else 10
    alpha = f"{_eps_value(eps) / (10 if steps == 20 else 4):.6g}"
    return shlex.split(preset.options[family].format(eps=eps, alpha=alpha))


class Runner:
    """Runs CLI commands (printed on stderr), reusing outputs that exist, and keeps every command and result."""

    def __init__(self, store: Path, out: Path) -> None:
        self.env = {**os.environ, "LORADAR_STORE": str(store)}
        self.out = out
        self.commands: list[str] = []

    def run(self, args: list[str], result: Path, *, capture: bool = False) -> dict[str, Any] | None:
        """Run `loradar ARGS` unless `result` exists; with `capture` the --json stdout is written to `result`."""
        self.commands.append(shlex.join(["loradar", *args]))
        if not result.exists():
            print(f"$ loradar {shlex.join(args)}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"failed ({proc.returncode}): loradar {shlex.join(args)}\n{proc.stderr[-2000:]}")
            if capture:
                result.write_text(proc.stdout)
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return json.loads(result.read_text()) if capture else None


def craft(runner: Runner, preset: Preset, family: str, name: str, split: str, eps: str, target: list[str]) -> Path:
    """One adversarial set `name.safetensors` of `split` (the attack, its target and accuracy in its metadata)."""
    path = runner.out / "sets" / f"{name}.safetensors"
    args = ["attack", "--base", preset.base, "--attack", family, *attack_options(preset, family, eps), *target]
    args += ["--data", preset.data, "--split", split, "--limit", str(preset.limit), "--out", str(path), "-q"]
    runner.run(args, path)
    return path


def target_accuracy(path: Path) -> float | None:
    """Accuracy of the model or decision a set was crafted against, on the set (from the set's metadata)."""
    from loradar_cli.advset import load_adv_set

    return load_adv_set(path).info.get("target_accuracy")


def groups(
    runner: Runner,
    preset: Preset,
    weights: list[float],
    identifier: str = "",
    shift_weights: list[float] | None = None,
    only: str = "",
) -> dict[str, list[tuple[str, Path]]]:
    """Test-set groups by row: (family, set) pairs crafted against each target.

    Sets against the base, the ensemble (soft vote, route) and by the adaptive attacker are crafted at every eps
    of the preset (ROA, which has no eps, at the main one only); the adaptive attacker uses `weights` at the main
    eps and `shift_weights` (default: the largest of `weights`) at the others. With an `identifier` other than
    the preset's, the adaptive sets are crafted against route with it and evading it (the attacker knows the
    defence); the other sets do not depend on it and are reused. With `only` (a regular expression), only the
    rows whose label it finds are crafted.
    """
    main = preset.eps[0]
    members = ",".join(preset.adapters.values())
    identifier = identifier or preset.identifier
    suffix = "" if identifier == preset.identifier else f"-{identifier}"
    shift_weights = shift_weights if shift_weights is not None else [max(weights)]
    route = ["--members", members, "--decision", "route", "--identifier", preset.identifier]
    soft = ["--members", members, "--decision", "soft"]
    rows: dict[str, list[tuple[str, Path]]] = {}

    def row(label: str, families: list[str], name: str, eps: str, target: dict[str, list[str]] | list[str]) -> None:
        """Craft the sets of one row (`name` with {f} for the family; `target` per family or for all)."""
        if re.search(only, label):
            per = target if isinstance(target, dict) else dict.fromkeys(families, target)
            rows[label] = [(f, craft(runner, preset, f, name.format(f=f), "test", eps, per[f])) for f in families]

    for eps in preset.eps:
        row(f"base, eps {eps}", _families(preset, eps), f"test-{{f}}-e{_tag(eps)}", eps, [])
    adapter = {f: ["--adapter", a] for f, a in preset.adapters.items()}
    row("each family's adapter", list(preset.adapters), "test-{f}-adapter", main, adapter)
    for eps in preset.eps:
        at, tag = ("", "") if eps == main else (f", eps {eps}", f"-e{_tag(eps)}")
        row(f"ensemble soft vote{at}", _families(preset, eps), f"test-{{f}}-soft{tag}", eps, soft)
        row(f"ensemble route{at}", _families(preset, eps), f"test-{{f}}-route{tag}", eps, route)
    if preset.unfitted:
        row("not fitted on (want unknown)", list(preset.unfitted), "test-{f}", main, [])
    route_with = [*route[:-1], identifier]
    for eps in preset.eps:
        at, tag = ("", "") if eps == main else (f", eps {eps}", f"-e{_tag(eps)}")
        for w in weights if eps == main else shift_weights:
            evade = [*route_with, "--evade-identifier", identifier, "--evade-weight", f"{w:g}"]
            label = f"adaptive: route + evading {identifier}, weight {w:g}{at}"
            row(label, _families(preset, eps), f"test-{{f}}-adaptive{suffix}-w{w:g}{tag}", eps, evade)
    return rows


def _families(preset: Preset, eps: str) -> list[str]:
    """The families crafted at `eps`: all at the main eps, all but ROA (whose budget is its patch) at the others."""
    return [f for f in preset.families if eps == preset.eps[0] or "{eps}" in preset.options[f]]


def _tag(eps: str) -> str:
    return eps.replace("/", "_")


def fit(
    runner: Runner, preset: Preset, name: str = "", extra: list[Path] | None = None, *, balance: bool = False
) -> dict[str, Any]:
    """Val sets against the base at the main eps (and `extra` sets), and an identifier fitted on them with the
    clean val split (the preset's, unless `name` is given; with `balance`, every class weighing the same)."""
    name = name or preset.identifier
    sets = [craft(runner, preset, f, f"val-{f}", "val", preset.eps[0], []) for f in preset.families]
    sets += extra or []
    args = ["fit-identifier", *preset.adapters.values(), "--name", name]
    args += [a for s in sets for a in ("--adv-set", str(s))]
    args += ["--features", preset.features, "--data", preset.data, "--split", "val", "--limit", str(preset.limit)]
    args += ["--balance"] if balance else []
    report = runner.run([*args, "--overwrite", "--json"], runner.out / f"fit-{name}.json", capture=True)
    assert report is not None
    return report


def defence_sets(
    runner: Runner, preset: Preset, weights: list[float], adaptive: tuple[str, ...] | None = None
) -> list[Path]:
    """Val sets for the defended identifier: against the base at the other eps, and by the adaptive attacker
    (route + evading the preset's identifier) at each weight, for the `adaptive` families (default: all)."""
    main = preset.eps[0]
    members = ",".join(preset.adapters.values())
    sets = [
        craft(runner, preset, f, f"val-{f}-e{_tag(eps)}", "val", eps, [])
        for eps in preset.eps[1:]
        for f in _families(preset, eps)
    ]
    route = ["--members", members, "--decision", "route", "--identifier", preset.identifier]
    for w in weights:
        evade = [*route, "--evade-identifier", preset.identifier, "--evade-weight", f"{w:g}"]
        fams = preset.families if adaptive is None else adaptive
        sets += [craft(runner, preset, f, f"val-{f}-adaptive-w{w:g}", "val", main, evade) for f in fams]
    return sets


def identify(runner: Runner, preset: Preset, label: str, sets: list[tuple[str, Path]], mode: list[str]) -> dict:
    """Identification of one group of test sets plus the clean test split."""
    args = ["identify-attack", *mode, *[a for _, s in sets for a in ("--adv-set", str(s))]]
    args += ["--data", preset.data, "--limit", str(preset.limit), "--json"]
    slug = "".join(c if c.isalnum() else "-" for c in f"{label}-{'-'.join(mode)}").strip("-")
    report = runner.run(args, runner.out / "reports" / f"{slug}.json", capture=True)
    assert report is not None
    return report


def table(preset: Preset, results: list[dict[str, Any]]) -> str:
    """Markdown: per row, accuracy per family (decision accuracy on the set in brackets), clean, all, unknown."""
    fams = preset.families
    head = ["sets crafted against", "identifier", *fams, "clean", "all", "unknown", "not fitted: unknown"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by = {s["attack"]: s for s in r["report"]["sets"].values()}
        cells = []
        for f in fams:
            s = by.get(f)
            target = r["target_accuracy"].get(f)
            cells.append(
                "–"
                if s is None
                else f"{100 * s['accuracy']:.1f}" + (f" ({100 * target:.0f})" if target is not None else "")
            )
        clean = by.get("clean")
        rep = r["report"]
        others = [
            f"{a} {100 * s['predicted'].get('unknown', 0) / s['n']:.1f}"
            for a, s in by.items()
            if a not in fams and a != "clean"
        ]
        lines.append(
            "| " + " | ".join(
                [r["row"], r["mode"], *cells, f"{100 * clean['accuracy']:.1f}" if clean else "–",
                 f"{100 * rep['accuracy']:.1f}", f"{100 * (rep.get('unknown_rate') or 0):.1f}", ", ".join(others) or "–"]
            ) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def score(
    runner: Runner, preset: Preset, rows: dict[str, list[tuple[str, Path]]], identifier: str, *, rules: bool
) -> list[dict[str, Any]]:
    """Each group identified by `identifier` (with and without rejection), and by the rules on the base's sets."""
    results = []
    for label, sets in rows.items():
        targets = {f: target_accuracy(s) for f, s in sets}
        modes = [["--identifier", identifier], ["--identifier", identifier, "--no-reject"]]
        if rules and label == f"base, eps {preset.eps[0]}":
            adapters = list(preset.adapters.values())
            modes += [[*adapters, "--mode", "relative-rule"], [*adapters, "--mode", "rule"]]
        for mode in modes:
            report = identify(runner, preset, label, sets, mode)
            name = (
                mode[-1] if mode[-2] == "--mode" else f"{identifier}" + (", no reject" if "--no-reject" in mode else "")
            )
            results.append({"row": label, "mode": name, "target_accuracy": targets, "report": report})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mnist")
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("LORADAR_STORE", "~/.loradar")).expanduser())
    parser.add_argument("--out", type=Path, required=True, help="Folder for sets, reports and the summary.")
    parser.add_argument("--evade-weights", default="1,10", help="Adaptive attacker's weights, comma-separated.")
    parser.add_argument("--shift-weights", default="", help="Adaptive weights at the preset's other eps, "
                        "comma-separated (default: the largest --evade-weights).")  # fmt: skip
    parser.add_argument("--defence", action="store_true", help="Also fit and score an identifier fitted on more eps "
                        "and on adaptive examples (ID-mix), against an attacker who adapts to it.")  # fmt: skip
    parser.add_argument("--defence-weights", default="10", help="Adaptive weights for --defence, comma-separated.")
    parser.add_argument("--defence-only", action="store_true", help="With --defence: skip the first identifier's rows.")
    parser.add_argument("--defence-balanced", action="store_true", help="With --defence: fit ID-bal instead, with "
                        "fit-identifier --balance and without the adaptive ROA sets (which look clean).")  # fmt: skip
    parser.add_argument("--rows", default="", help="Only the rows whose label this regular expression finds "
                        "(default: all): a long run in stages, each reusing the last.")  # fmt: skip
    opts = parser.parse_args(argv)
    preset = PRESETS[opts.preset]
    for sub in ("sets", "reports"):
        (opts.out / sub).mkdir(parents=True, exist_ok=True)
    runner = Runner(opts.store, opts.out)
    fitted = {preset.identifier: fit(runner, preset)}
    weights = [float(w) for w in opts.evade_weights.split(",")]
    results = []
    if not opts.defence_only:
        shift = [float(w) for w in opts.shift_weights.split(",")] if opts.shift_weights else None
        rows = groups(runner, preset, weights, shift_weights=shift, only=opts.rows)
        results = score(runner, preset, rows, preset.identifier, rules=True)
    defended = ""
    if opts.defence:
        defended = f"{preset.identifier}-{'bal' if opts.defence_balanced else 'mix'}"
        defence = [float(w) for w in opts.defence_weights.split(",")]
        adaptive = tuple(f for f in preset.families if f != "roa") if opts.defence_balanced else None
        extra = defence_sets(runner, preset, defence, adaptive)
        fitted[defended] = fit(runner, preset, defended, extra, balance=opts.defence_balanced)
        rows = groups(runner, preset, defence, defended, shift_weights=[], only=opts.rows)
        results += score(runner, preset, rows, defended, rules=False)
    summary = {
        "preset": opts.preset,
        "fit": {n: {k: f[k] for k in ("features", "train_accuracy", "held_out_accuracy")} for n, f in fitted.items()},
        "commands": runner.commands,
        "rows": [{k: r[k] for k in ("row", "mode", "target_accuracy")} | {"sets": r["report"]["sets"],
                 "accuracy": r["report"]["accuracy"], "unknown_rate": r["report"].get("unknown_rate")}
                 for r in results],
    }  # fmt: skip
    (opts.out / f"summary{f'-{defended}' if opts.defence_only else ''}.json").write_text(
        json.dumps(summary, indent=1) + "\n"
    )
    print(table(preset, results))


if __name__ == "__main__":
    main()
