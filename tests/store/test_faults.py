"""Faults and races against real `python -m loradar_cli` processes on a tiny digits store (the v1 fixture):
SIGKILL at random moments never leaves a visible half-entry, and two writers of one name never both succeed."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loradar_cli.errors import EXIT_CODES
from loradar_cli.store.store import KINDS, Store
from tests.conftest import REPO

V1 = REPO / "tests" / "data" / "store-v1"
TRACEBACK = "Traceback (most recent call last)"


def cli(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORADAR_STORE": str(root)}
    env.pop("LORADAR_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "loradar_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def commands(out: Path) -> dict[str, list[str]]:
    """One writer of each kind; --overwrite so kills also land inside the swap of an existing entry."""
    return {
        "train": [
            "train",
            "--base",
            "tiny",
            "--name",
            "k-train",
            "--attack",
            "fgsm",
            "--eps",
            "0.1",
            "--epochs",
            "1",
            "--limit",
            "64",
            "--val-limit",
            "32",
            "--lr",
            "0.01",
            "--overwrite",
            "-q",
        ],
        "merge": ["merge", "pgd", "fgsm", "--name", "k-merge", "--method", "linear", "--overwrite"],
        "trim": ["trim", "both", "--name", "k-trim", "--rank", "1", "--overwrite"],
        "attack": f"attack --base tiny --attack fgsm --eps 0.1 --limit 32 --out {out / 'k-fgsm.safetensors'}".split(),
        "fit": f"fit-identifier pgd fgsm --name k-who --adv-set {out / 'fixed.safetensors'} --data digits "
        "--limit 32 --epochs 20 --overwrite".split(),
    }


@pytest.fixture
def digits_store(tmp_path) -> tuple[Store, Path]:
    shutil.copytree(V1, tmp_path / "store")
    out = tmp_path / "sets"
    out.mkdir()
    return Store(tmp_path / "store"), out


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def check_store(store: Store, out: Path) -> None:
    """Every entry `list` shows loads and verifies; nothing half-written is visible."""
    from loradar_cli.advset import load_adv_set
    from loradar_cli.store.verify import verify_store

    problems, checked = verify_store(store)
    assert [p.line() for p in problems if "leftover" not in p.message] == []
    assert checked == sum(len(store.names(k)) for k in KINDS)
    for name in store.adapter_names():
        store.load_adapter(name)
    for name in store.identifier_names():
        store.load_identifier(name)
    visible = {p.name for p in store.root.iterdir() if not p.name.startswith(".")}
    assert visible <= {*store.adapter_names(), "bases", "identifiers", "loradar-store.json"}
    for folder in (store.root / "bases", store.root / "identifiers"):
        assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} <= set(
            store.base_names() + store.identifier_names()
        )
    for path in out.iterdir():
        if not path.name.startswith("."):
            assert load_adv_set(path).x.shape[0] > 0


# A zygote: imports what `python -m loradar_cli` imports once, then forks one copy per run, which executes
# `python -m loradar_cli ARGS` (runpy, as -m does) with stderr to a file. Kills then cost the command's own work,
# not an interpreter start, so a hundred of them fit in the time budget.
ZYGOTE = """
import json, os, runpy, sys, traceback
import torch, timm, sklearn.datasets, loradar_cli.cli.app, loradar_cli.loading, loradar_cli.jobs.identify
import loradar_cli.jobs.fit_identifier
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["loradar", *req["args"]]
        code = 0
        try:
            runpy.run_module("loradar_cli", run_name="__main__", alter_sys=True)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
"""


class Zygote:
    """A preloaded interpreter that runs loradar commands in forked children on request."""

    def __init__(self, root: Path, logs: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORADAR_STORE": str(root)}
        env.pop("LORADAR_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.logs, self.runs = logs, 0

    def _ask(self, req: dict) -> int:
        import json

        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, args: list[str]) -> tuple[int, Path]:
        self.runs += 1
        err = self.logs / f"{self.runs}.err"
        return self._ask({"args": args, "err": str(err)}), err

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_no_damage(digits_store, tmp_path):
    store, out = digits_store
    runs = commands(out)
    fixed = cli(store.root, *runs["attack"][:-1], str(out / "fixed.safetensors"))
    assert finish(fixed)[0] == 0
    rng = random.Random(0)
    budget, kills, lock = time.monotonic() + 300, [0], threading.Lock()  # a cap; ~1 min on an idle machine
    outcomes: dict[str, list[str]] = {name: [] for name in runs}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        logs = tmp_path / f"logs-{name}"
        logs.mkdir()
        zygote = Zygote(store.root, logs)
        try:
            pid, err = zygote.start(runs[name])  # returns once the zygote has imported everything
            start = time.monotonic()
            assert zygote.wait(pid) == 0, err.read_text()
            duration = time.monotonic() - start
            while time.monotonic() < budget and kills[0] < 100:
                pid, err = zygote.start(runs[name])
                # half the kills anywhere in the run, half late in it, where the writes are
                time.sleep(rng.uniform(0, duration) if rng.random() < 0.5 else rng.uniform(0.6, 1.1) * duration)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                code = zygote.wait(pid)
                if code == -signal.SIGKILL:
                    with lock:
                        kills[0] += 1
                    outcomes[name].append("killed")
                    duration *= 1.05  # track the run time as the machine's load changes: kills stay in the run
                else:
                    assert code == 0 and TRACEBACK not in err.read_text(), err.read_text()
                    outcomes[name].append("finished")
                    duration *= 0.8
        except BaseException as failure:  # a worker's failure must fail the test, not vanish with its thread
            errors.append(failure)
        finally:
            zygote.close()

    threads = [threading.Thread(target=worker, args=(name,)) for name in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    summary = {name: (o.count("killed"), o.count("finished")) for name, o in outcomes.items()}
    print(f"kills, finished runs per command: {summary}; {time.monotonic() - budget + 300:.0f} s")
    assert kills[0] >= 100, summary
    check_store(store, out)
    for name, args in runs.items():  # a rerun of every killed command succeeds, with the same name
        code, err = finish(cli(store.root, *args))
        assert code == 0 and TRACEBACK not in err, (name, err)
    check_store(store, out)
    from loradar_cli.store.verify import verify_store

    assert verify_store(store)[0] == []  # the reruns cleaned what the kills left


@pytest.mark.slow
def test_two_writers_of_one_name_exactly_one_wins(digits_store):
    store, _ = digits_store
    for extra in ([], ["--overwrite"]):
        procs = [cli(store.root, "merge", "pgd", "fgsm", "--name", "race", "--method", "linear", *extra) for _ in "ab"]
        results = [finish(p) for p in procs]
        codes = sorted(code for code, _ in results)
        for code, err in results:
            assert TRACEBACK not in err
            if code:
                assert "being written by another loradar process" in err or "already exists" in err, err
                assert err.strip().count("\n") == 0  # one line
        taken = EXIT_CODES["ExistsError"]  # the loser: "already exists" or "being written by another process"
        assert codes in ([0, taken], [0, 0] if extra else [0, taken]), results
        store.load_adapter("race")
        assert not [p for p in store.root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    # writers of different names at once do not disturb each other
    procs = [cli(store.root, "merge", "pgd", "fgsm", "--name", f"m{i}", "--method", "linear") for i in range(3)]
    assert [finish(p)[0] for p in procs] == [0, 0, 0]
    for i in range(3):
        store.load_adapter(f"m{i}")
