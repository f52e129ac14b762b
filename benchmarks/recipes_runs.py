"""`python -m benchmarks.recipes_runs STORE OUT [--preset mnist|cifar10] [--jobs N]`: train and evaluate every
recipe, one JSON per run.

Each run is the CLI as a user would run it (a subprocess, OMP_NUM_THREADS=1): `train` with PGD-7 (alpha = eps/4)
at each eps, then `eval` on the first test images with PGD-20 (alpha = eps/8) followed by the quick suite
(PGD, APGD-CE) with early stopping, so the worst case counts a point only if it survives all of them. Then the
AMT ablation: a pool at several budgets, its tts merge, that merge trimmed, and the pool's majority vote.
A preset gives the base, the data, the eps lists and the train options; flags override each. Eps are kept as
given (`8/255` stays `8/255` in the commands and the JSON). A run whose JSON exists is skipped, so an
interrupted sweep continues; `benchmarks.recipes_table` prints tables. STORE must already hold the base.
"""

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import cli_env, data_root

DATA = data_root()
RECIPES = ("loradar", "pgd-at", "trades", "mart", "amt", "advlora", "autolora", "hyperat")


@dataclass(frozen=True)
class Preset:
    """What a sweep trains from and on: base, data spec, eps lists (as given) and the train options."""

    base: str
    data: str
    eps: tuple[str, ...]
    pool_eps: tuple[str, ...]
    pool_eval_eps: str
    lr: str | None  # None: the train command's default
    epochs: int
    train_limit: int
    rank: int = 16
    targets: str = "all"
    pool_lr: str | None = "1e-3"
    trim_layers: str = "layer4"


PRESETS = {
    "mnist": Preset(
        base="mnist-base",
        data=f"mnist:{DATA / 'mnist'}",
        eps=("0.1", "0.3"),
        pool_eps=("0.05", "0.1", "0.2"),
        pool_eval_eps="0.1",
        lr="1e-2",
        epochs=3,
        train_limit=4000,
    ),
    "cifar10": Preset(
        base="c10-base",
        data=f"cifar10:{DATA}",
        eps=("2/255", "8/255"),
        pool_eps=("1/255", "2/255", "4/255", "8/255"),
        pool_eval_eps="2/255",
        lr=None,
        epochs=2,  # 16 runs in about 80 minutes on one CPU thread
        train_limit=2000,
        pool_lr=None,
    ),
}


def scaled(eps: str, divisor: int) -> str:
    """`eps / divisor` in the same notation: '8/255' / 4 -> '2/255', '0.1' / 8 -> '0.0125'."""
    if "/" in eps:
        num, den = eps.split("/", 1)
        return f"{float(num) / divisor:g}/{den}"
    return f"{float(eps) / divisor:g}"


def tag(eps: str) -> str:
    """Eps as it may appear in a store name or file name ('8/255' -> '8_255')."""
    return eps.replace("/", "_")


def train_args(preset: Preset) -> list[str]:
    """The train options every recipe run shares (no --lr when the preset keeps the command's default)."""
    lr = [] if preset.lr is None else ["--lr", preset.lr]
    limit = ["--limit", str(preset.train_limit)]
    return ["--targets", preset.targets, "-r", str(preset.rank), *lr, "--epochs", str(preset.epochs), *limit]


def cli(store: Path, *args: str) -> dict[str, Any]:
    """Run `python -m loradar_cli ARGS --store STORE --json -q`; its JSON document with the command and wall time."""
    cmd = ["loradar", *args, "--store", str(store), "--json", *([] if args[0] == "show" else ["-q"])]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "loradar_cli", *cmd[1:]], capture_output=True, text=True, env=cli_env()
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return {"command": " ".join(cmd), "wall_s": time.perf_counter() - start, "report": json.loads(done.stdout)}


def eval_args(data: str, eps: str, limit: int) -> list[str]:
    """PGD-20 (alpha eps/8), then the quick suite at the same eps, on the first `limit` test images."""
    opts = ["--attack-opt", "pgd.steps=20", "--attack-opt", f"pgd.alpha={scaled(eps, 8)}"]
    return ["--data", data, "--limit", str(limit), "--eps", eps, "--attack", "pgd", *opts, "--suite", "quick"]


def attack_args(eps: str) -> list[str]:
    """The training attack: PGD-7 at `eps`, alpha eps/4."""
    return ["--attack", "pgd", "--eps", eps, "--alpha", scaled(eps, 4), "--steps", "7"]


def recipe_command(preset: Preset, recipe: str, eps: str, name: str, options: tuple[str, ...] = ()) -> list[str]:
    """The train command of one recipe run (options: extra `--recipe-opt` items)."""
    extra = [a for o in options for a in ("--recipe-opt", o)]
    return ["train", "--base", preset.base, "--data", preset.data, "--recipe", recipe, "--name", name,
            *attack_args(eps), *train_args(preset), *extra, "--resume"]  # fmt: skip


def run_name(prefix: str, recipe: str, eps: str) -> str:
    """The store name of one recipe run."""
    return f"{prefix}-{recipe}-{tag(eps)}"


def recipe_run(store: Path, out: Path, preset: Preset, recipe: str, eps: str, limit: int, prefix: str,
               options: tuple[str, ...]) -> None:  # fmt: skip
    """Train `recipe` at `eps`, evaluate what it stored, write `<out>/<recipe>-<eps>.json`."""
    path = out / f"{recipe}-{tag(eps)}.json"
    if path.exists():
        return
    name = run_name(prefix, recipe, eps)
    if (store / name).is_dir() or (store / "bases" / name).is_dir():  # trained before an interrupted evaluation
        train = cli(store, "show", name)
    else:
        train = cli(store, *recipe_command(preset, recipe, eps, name, options))
    target = ["--base", name] if recipe == "autolora" else ["--adapter", name, "--no-base"]
    evaluation = cli(store, "eval", *target, *eval_args(preset.data, eps, limit))
    _write(path, {"recipe": recipe, "eps": eps, "options": list(options), "train": train, "eval": evaluation})


def base_run(store: Path, out: Path, preset: Preset, eps: str, limit: int) -> None:
    """The base's row at `eps` (the reference every recipe starts from)."""
    path = out / f"base-{tag(eps)}.json"
    if not path.exists():
        evaluation = cli(store, "eval", "--base", preset.base, *eval_args(preset.data, eps, limit))
        _write(path, {"recipe": "base", "eps": eps, "eval": evaluation})


def pool_command(preset: Preset, recipe: str, pool: str) -> list[str]:
    """The train command of the ablation's pool: one member per budget of `preset.pool_eps`."""
    lr = [] if preset.pool_lr is None else ["--lr", preset.pool_lr]
    values = ",".join(preset.pool_eps)
    return ["train", "--base", preset.base, "--data", preset.data, "--recipe", recipe, "--attack", "pgd",
            "--steps", "7", "--pool", f"eps={values}", "--name", pool, *train_args(preset), *lr, "--resume"]  # fmt: skip


def pool_run(store: Path, out: Path, preset: Preset, eps: str, limit: int, recipe: str = "amt") -> None:
    """The AMT ablation: pool at `preset.pool_eps`, tts merge, trimmed merge, majority vote; evaluated at `eps`."""
    path = out / f"pool-{recipe}-{tag(eps)}.json"
    if path.exists():
        return
    pool, data = f"pool-{recipe}", preset.data
    train = cli(store, *pool_command(preset, recipe, pool))
    merge = cli(store, "merge", pool, "--method", "tts", "--support", data, "--name", f"{pool}-tts", "--overwrite")
    trim = cli(store, "trim", f"{pool}-tts", "--full-weight", "--keep", "0.9", "--layers", preset.trim_layers,
               "--name", f"{pool}-tts-trim", "--overwrite")  # fmt: skip
    members = [m["name"] for m in train["report"]["members"]] if "members" in train["report"] else []
    adapters = [*members, f"{pool}-tts", f"{pool}-tts-trim"]
    evaluation = cli(store, "eval", *[a for m in adapters for a in ("--adapter", m)], "--no-base",
                     "--members", f"pool:{pool}", "--vote", "majority", *eval_args(data, eps, limit))  # fmt: skip
    _write(path, {"recipe": f"pool-{recipe}", "eps": eps, "train": train, "merge": merge, "trim": trim,
                  "eval": evaluation})  # fmt: skip


def variants_run(store: Path, out: Path, preset: Preset, eps: str, limit: int, recipe: str = "amt") -> None:
    """What else the ablation tries on the stored pool: tts over all members (top-k 3), a wider score trade-off
    (lam 0.3, beta 5), a harder trim (keep 0.7 of the trimmed layers, and 0.9 of every layer), and the soft vote."""
    path = out / f"variants-{recipe}-{tag(eps)}.json"
    if path.exists():
        return
    pool, data, made = f"pool-{recipe}", preset.data, {}
    merges = {"top3": ["--top-k", "3"], "lam03-beta5": ["--lam", "0.3", "--beta", "5"]}
    for name, options in merges.items():
        made[f"{pool}-tts-{name}"] = cli(store, "merge", pool, "--method", "tts", "--support", data, *options,
                                         "--name", f"{pool}-tts-{name}", "--overwrite")  # fmt: skip
    trims = {"trim07": ["--keep", "0.7", "--layers", preset.trim_layers], "trim09-all": ["--keep", "0.9"]}
    for name, options in trims.items():
        made[f"{pool}-tts-{name}"] = cli(store, "trim", f"{pool}-tts", "--full-weight", *options,
                                         "--name", f"{pool}-tts-{name}", "--overwrite")  # fmt: skip
    evaluation = cli(store, "eval", *[a for m in made for a in ("--adapter", m)], "--no-base",
                     "--members", f"pool:{pool}", "--vote", "soft", *eval_args(data, eps, limit))  # fmt: skip
    _write(path, {"recipe": f"variants-{recipe}", "eps": eps, "made": made, "eval": evaluation})


def _write(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr, flush=True)


def _safe(fn, *args) -> None:
    """Run one job; a failure is logged and the sweep goes on."""
    try:
        fn(*args)
    except Exception as err:  # one broken run must not hide the others
        print(f"FAILED {fn.__name__}{args[3:]}: {err}", file=sys.stderr, flush=True)


def _split(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def parser() -> argparse.ArgumentParser:
    """The command line: a preset and what may override it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mnist")
    p.add_argument("--base", help="base model in STORE (default: the preset's)")
    p.add_argument("--data", help="data spec (default: the preset's)")
    p.add_argument("--eps", help="comma list of budgets as the CLI takes them, e.g. 2/255,8/255")
    p.add_argument("--lr", help="train learning rate ('default': the train command's own)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-limit", type=int, help="training examples per run")
    p.add_argument("--rank", type=int)
    p.add_argument("--limit", type=int, default=500, help="test images per evaluation")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--recipe-opt", action="append", default=[], help="KEY=VALUE passed to every recipe run")
    p.add_argument("--prefix", default="rec", help="store names are PREFIX-RECIPE-EPS")
    p.add_argument("--no-base-row", action="store_true", help="skip the base's own rows")
    p.add_argument("--pool-lr", help="learning rate of the pool (default: the preset's)")
    p.add_argument("--pool-eval-eps", help="eps of the AMT ablation's evaluation ('' skips it)")
    p.add_argument("--pool-recipe", default="amt", help="recipe of the ablation's pool members")
    return p


def preset_of(args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides applied."""
    preset = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    for key in ("base", "data", "epochs", "rank"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.eps is not None:
        changes["eps"] = _split(args.eps)
    if args.lr is not None:
        changes["lr"] = None if args.lr == "default" else args.lr
    if args.pool_lr is not None:
        changes["pool_lr"] = None if args.pool_lr == "default" else args.pool_lr
    if args.train_limit is not None:
        changes["train_limit"] = args.train_limit
    if args.pool_eval_eps is not None:
        changes["pool_eval_eps"] = args.pool_eval_eps
    return replace(preset, **changes)


def queues(args: argparse.Namespace, preset: Preset) -> list[list[tuple]]:
    """The jobs, one queue per eps (the ablation joins the first): each a tuple (function, *arguments)."""
    store, out, options = args.store, args.out, tuple(args.recipe_opt)
    todo: list[list[tuple]] = []
    for eps in preset.eps:
        queue: list[tuple] = [] if args.no_base_row else [(base_run, store, out, preset, eps, args.limit)]
        queue += [(recipe_run, store, out, preset, r, eps, args.limit, args.prefix, options)
                  for r in _split(args.recipes)]  # fmt: skip
        todo.append(queue)
    if preset.pool_eval_eps:
        todo = todo or [[]]
        todo[0].append((pool_run, store, out, preset, preset.pool_eval_eps, args.limit, args.pool_recipe))
        todo[0].append((variants_run, store, out, preset, preset.pool_eval_eps, args.limit, args.pool_recipe))
    return todo


def main() -> None:
    """Parse the arguments and run the sweep (queues in parallel with --jobs)."""
    args = parser().parse_args()
    unknown = [r for r in [*_split(args.recipes), args.pool_recipe] if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    preset = preset_of(args)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda q: [_safe(*job) for job in q], queues(args, preset)))


if __name__ == "__main__":
    main()
