"""`python -m benchmarks.recipes_runs STORE OUT [--jobs N]`: train and evaluate every recipe on MNIST, one JSON per run.

Each run is the CLI as a user would run it (a subprocess, OMP_NUM_THREADS=1): `train` with PGD-7 (alpha = eps/4)
at each eps, then `eval` on the first test images with PGD-20 (alpha = eps/8) followed by the quick suite
(PGD, APGD-CE) with early stopping, so the worst case counts a point only if it survives all of them. Then the
AMT ablation: a pool at several budgets, its tts merge, that merge trimmed, and the pool's majority vote.
A run whose JSON exists is skipped, so an interrupted sweep continues; `benchmarks.recipes_table` prints tables.
STORE must already hold the base (`mnist-base`).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("loradar", "pgd-at", "trades", "mart", "amt", "advlora", "autolora", "hyperat")
EPS = (0.1, 0.3)
POOL_EPS = (0.05, 0.1, 0.2)
TRAIN = ("--targets", "all", "-r", "16", "--lr", "1e-2", "--epochs", "3", "--limit", "4000")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORADAR_DEVICE": "cpu"}
    env.pop("WORLD_SIZE", None)
    return env


def cli(store: Path, *args: str) -> dict[str, Any]:
    """Run `python -m loradar_cli ARGS --store STORE --json -q`; its JSON document with the command and wall time."""
    cmd = ["loradar", *args, "--store", str(store), "--json", *([] if args[0] == "show" else ["-q"])]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loradar_cli", *cmd[1:]], capture_output=True, text=True, env=_env())
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return {"command": " ".join(cmd), "wall_s": time.perf_counter() - start, "report": json.loads(done.stdout)}


def eval_args(data: str, eps: float, limit: int) -> list[str]:
    """PGD-20 (alpha eps/8), then the quick suite at the same eps, on the first `limit` test images."""
    opts = ["--attack-opt", "pgd.steps=20", "--attack-opt", f"pgd.alpha={eps / 8:g}"]
    return ["--data", data, "--limit", str(limit), "--eps", f"{eps:g}", "--attack", "pgd", *opts, "--suite", "quick"]


def recipe_run(store: Path, out: Path, data: str, recipe: str, eps: float, limit: int) -> None:
    """Train `recipe` at `eps`, evaluate what it stored, write `<out>/<recipe>-<eps>.json`."""
    path = out / f"{recipe}-{eps:g}.json"
    if path.exists():
        return
    name = f"rec-{recipe}-{eps:g}"
    attack = ["--attack", "pgd", "--eps", f"{eps:g}", "--alpha", f"{eps / 4:g}", "--steps", "7"]
    if (store / name).is_dir() or (store / "bases" / name).is_dir():  # trained before an interrupted evaluation
        train = cli(store, "show", name)
    else:
        train = cli(store, "train", "--base", "mnist-base", "--data", data, "--recipe", recipe, "--name", name,
                    *attack, *TRAIN, "--resume")  # fmt: skip
    target = ["--base", name] if recipe == "autolora" else ["--adapter", name, "--no-base"]
    evaluation = cli(store, "eval", *target, *eval_args(data, eps, limit))
    _write(path, {"recipe": recipe, "eps": eps, "train": train, "eval": evaluation})


def base_run(store: Path, out: Path, data: str, eps: float, limit: int) -> None:
    """The base's row at `eps` (the reference every recipe starts from)."""
    path = out / f"base-{eps:g}.json"
    if not path.exists():
        _write(path, {"recipe": "base", "eps": eps, "eval": cli(store, "eval", "--base", "mnist-base",
                                                                  *eval_args(data, eps, limit))})  # fmt: skip


def pool_run(store: Path, out: Path, data: str, eps: float, limit: int, lr: str, recipe: str = "amt") -> None:
    """The AMT ablation: pool at POOL_EPS (learning rate `lr`), tts merge, trimmed merge, majority vote; evaluated
    at `eps`."""
    path = out / f"pool-{recipe}-{eps:g}.json"
    if path.exists():
        return
    pool = f"pool-{recipe}"
    values = ",".join(f"{e:g}" for e in POOL_EPS)
    train = cli(store, "train", "--base", "mnist-base", "--data", data, "--recipe", recipe, "--attack", "pgd",
                "--steps", "7", "--pool", f"eps={values}", "--name", pool, *TRAIN, "--lr", lr, "--resume")  # fmt: skip
    merge = cli(store, "merge", pool, "--method", "tts", "--support", data, "--name", f"{pool}-tts", "--overwrite")
    trim = cli(store, "trim", f"{pool}-tts", "--full-weight", "--keep", "0.9", "--layers", "layer4",
               "--name", f"{pool}-tts-trim", "--overwrite")  # fmt: skip
    members = [m["name"] for m in train["report"]["members"]] if "members" in train["report"] else []
    adapters = [*members, f"{pool}-tts", f"{pool}-tts-trim"]
    evaluation = cli(store, "eval", *[a for m in adapters for a in ("--adapter", m)], "--no-base",
                     "--members", f"pool:{pool}", "--vote", "majority", *eval_args(data, eps, limit))  # fmt: skip
    _write(path, {"recipe": f"pool-{recipe}", "eps": eps, "train": train, "merge": merge, "trim": trim,
                  "eval": evaluation})  # fmt: skip


def variants_run(store: Path, out: Path, data: str, eps: float, limit: int, recipe: str = "amt") -> None:
    """What else the ablation tries on the stored pool: tts over all members (top-k 3), a wider score trade-off
    (lam 0.3, beta 5), a harder trim (keep 0.7 of layer4, and 0.9 of every layer), and the soft vote."""
    path = out / f"variants-{recipe}-{eps:g}.json"
    if path.exists():
        return
    pool, made = f"pool-{recipe}", {}
    merges = {"top3": ["--top-k", "3"], "lam03-beta5": ["--lam", "0.3", "--beta", "5"]}
    for tag, options in merges.items():
        made[f"{pool}-tts-{tag}"] = cli(store, "merge", pool, "--method", "tts", "--support", data, *options,
                                        "--name", f"{pool}-tts-{tag}", "--overwrite")  # fmt: skip
    trims = {"trim07": ["--keep", "0.7", "--layers", "layer4"], "trim09-all": ["--keep", "0.9"]}
    for tag, options in trims.items():
        made[f"{pool}-tts-{tag}"] = cli(store, "trim", f"{pool}-tts", "--full-weight", *options,
                                        "--name", f"{pool}-tts-{tag}", "--overwrite")  # fmt: skip
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
        print(f"FAILED {fn.__name__}{args[2:]}: {err}", file=sys.stderr, flush=True)


def main() -> None:
    """Parse the arguments and run the sweep (queues in parallel with --jobs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", default=f"mnist:{REPO.parent / 'shared' / 'data' / 'mnist'}")
    parser.add_argument("--limit", type=int, default=500, help="test images per evaluation")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--eps", default=",".join(f"{e:g}" for e in EPS))
    parser.add_argument("--pool-lr", default="1e-3", help="learning rate of the pool (amt collapses at 1e-2 here)")
    parser.add_argument("--pool-eval-eps", default="0.1", help="eps of the AMT ablation's evaluation ('' skips it)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = [r for r in args.recipes.split(",") if r]
    queues: list[list[tuple]] = []
    for eps in [float(e) for e in args.eps.split(",") if e]:
        queue: list[tuple] = [(base_run, args.store, args.out, args.data, eps, args.limit)]
        queue += [(recipe_run, args.store, args.out, args.data, r, eps, args.limit) for r in recipes]
        queues.append(queue)
    if args.pool_eval_eps:
        queues = queues or [[]]
        pool_eps = float(args.pool_eval_eps)
        queues[0].append((pool_run, args.store, args.out, args.data, pool_eps, args.limit, args.pool_lr))
        queues[0].append((variants_run, args.store, args.out, args.data, pool_eps, args.limit))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda q: [_safe(*job) for job in q], queues))


if __name__ == "__main__":
    main()
