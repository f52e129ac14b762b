"""Several processes: sharding and gathering helpers, and torchrun runs (gloo on CPU) that equal one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import cli_env
from loradar_cli.advset import load_adv_set
from loradar_cli.distributed import World, _lpt_owners, all_mean, gather_points, local_batches, on_main, spread
from loradar_cli.store.store import ADAPTER_WEIGHTS
from tests.conftest import make_adapter, make_base


def test_batches_are_dealt_out_without_gaps_or_overlaps():
    one = local_batches(70, 16, World())
    shards = [local_batches(70, 16, World(r, 3)) for r in range(3)]
    assert sorted((b, tuple(r)) for s in shards for b, r in s) == [(b, tuple(r)) for b, r in one]
    assert [b for b, _ in shards[1]] == [1, 4]
    assert list(one[-1][1]) == list(range(64, 70))


def test_jobs_go_costliest_first_to_the_least_loaded_rank():
    assert _lpt_owners([1.0, 3.0, 1.0], 2) == [1, 0, 1]
    assert _lpt_owners([5.0, 4.0, 3.0, 3.0, 1.0], 2) == [0, 1, 1, 0, 1]  # loads 8 and 8 (round robin: 9 and 7)
    assert _lpt_owners([2.0, 2.0, 2.0], 3) == [0, 1, 2] and _lpt_owners([], 2) == []
    assert _lpt_owners([7.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1]  # round robin would give 9 and 2


def test_a_world_of_one_needs_no_process_group():
    assert not torch.distributed.is_initialized()
    parts = [(4, torch.tensor([4, 5])), (0, torch.tensor([0, 1, 2, 3]))]
    assert gather_points(World(), parts, 6).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="gathered 6 results for 7 points"):
        gather_points(World(), parts, 7)
    assert on_main(World(), lambda: 42) == 42
    assert spread(World(), [lambda: 43, lambda: 44], costs=[1.0, 2.0]) == [43, 44]
    assert all_mean(World(), 0.25, 8) == 0.25


def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = cli_env()
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "loradar_cli", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_two_process_training_gives_the_one_process_adapter(store):
    """Same global batch, seed and data order: DDP's averaged gradients reproduce one process's steps.

    PGD starts at a random point: each point's start is seeded by the point, not by the shard it falls in.
    """
    make_base(store)
    common = ["train", "--base", "tiny", "--attack", "pgd", "--eps", "0.05", "--alpha", "0.02", "--steps", "2"]
    common += ["--data", "digits", "--limit", "128"]
    common += ["--batch-size", "32", "--epochs", "2", "--val-limit", "64", "--store", str(store.root), "--json"]
    one = json.loads(_cli(*common, "--name", "one").stdout)
    two = _cli(*common, "--name", "two", "--nproc", "2").stdout  # --nproc starts torchrun itself
    two = json.loads(two)  # rank 0 alone prints: exactly one JSON document
    a = load_file(str(store.adapter_dir("one") / ADAPTER_WEIGHTS))
    b = load_file(str(store.adapter_dir("two") / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)  # trained, not the zero init
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert (one["combination"]["run"]["world_size"], two["combination"]["run"]["world_size"]) == (1, 2)
    assert one["metrics"]["val_clean_acc"] == pytest.approx(two["metrics"]["val_clean_acc"], abs=1e-6)


@pytest.mark.slow
def test_two_rank_eval_and_attack_equal_one_rank(store, tmp_path):
    """Random-start PGD seeded per batch: the same adversarial points and the same report on 1 and 2 ranks."""
    make_base(store)
    make_adapter(store, "tiny")
    common = ["--base", "tiny", "--attack", "pgd", "--eps", "0.1", "--steps", "3", "--data", "digits"]
    common += ["--limit", "100", "--batch-size", "16", "--store", str(store.root), "--json", "--quiet"]
    reports = [json.loads(_cli("eval", *common, "--adapter", "ad", nproc=n).stdout) for n in (1, 2)]
    assert [r["run"]["world_size"] for r in reports] == [1, 2]
    for report in reports:  # compute seconds are the one field that may differ
        assert all(r["seconds"] >= 0 for row in report["rows"] for r in row["records"])
        report["rows"] = [
            {**row, "records": [{**r, "seconds": None} for r in row["records"]]} for row in report["rows"]
        ]
    assert reports[0]["rows"] == reports[1]["rows"]
    assert 0 < reports[0]["rows"][0]["attacks"]["pgd"] < reports[0]["rows"][0]["clean"]  # the attack bites
    sets = []
    for n in (1, 2):
        _cli("attack", *common, "--out", str(tmp_path / f"adv{n}.safetensors"), nproc=n)
        sets.append(load_adv_set(tmp_path / f"adv{n}.safetensors"))
    assert torch.equal(sets[0].x, sets[1].x) and torch.equal(sets[0].y, sets[1].y)
    assert not torch.equal(sets[0].x[:16], sets[0].x[16:32])  # batches got their own random starts


def test_nproc_hands_the_launchers_stdin_to_every_process(monkeypatch, tmp_path):
    """Names read from '-' reach each process torchrun starts (they share one stdin only one could read)."""
    import io

    import typer

    from loradar_cli.cli import _engine_options as engine_options
    from loradar_cli.cli._common import read_names

    calls = []

    def call(command, env, errors):
        saved = Path(env[engine_options.STDIN_ENV])
        calls.append((command, saved, saved.read_text()))
        monkeypatch.setenv(engine_options.STDIN_ENV, str(saved))  # as in a started process
        calls.append(read_names(["-"]))
        monkeypatch.delenv(engine_options.STDIN_ENV)
        return 7

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(engine_options.NPROC_ENV, raising=False)
    monkeypatch.setattr(engine_options, "_run_torchrun", call)
    monkeypatch.setattr(sys, "argv", ["loradar", "eval", "--adapter", "-", "--nproc", "2"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("ad\nbd\n"))
    assert read_names(["-"]) == ["ad", "bd"]  # the launcher reads stdin first (eval resolves names early)
    with pytest.raises(typer.Exit) as exit_:
        engine_options.launch_nproc(2)
    (command, saved, text), names = calls
    assert exit_.value.exit_code == 7 and text == "ad\nbd\n" and names == ["ad", "bd"]
    assert command[-4:] == ["loradar_cli", "eval", "--adapter", "-"] and "--nproc" not in command
    assert command[:2] == ["--standalone", "--nproc-per-node=2"]
    assert not saved.exists()  # removed once torchrun returns


def test_a_failed_run_reports_one_line_from_the_rank_that_failed_first(tmp_path, capsys):
    """Rank 0 prints its own error; otherwise the line the first failed rank left, or the signal that stopped it."""
    from types import SimpleNamespace

    from loradar_cli.cli._engine_options import _failure_status

    def failed(code: int, at: float, signal: str = "") -> SimpleNamespace:
        return SimpleNamespace(exitcode=code, timestamp=at, signal_name=lambda: signal)

    (tmp_path / "1").write_text("error: out of memory (use a smaller --batch-size)\n")
    assert _failure_status({0: failed(3, 2.0), 1: failed(1, 1.0)}, tmp_path) == 3
    assert capsys.readouterr().err == ""  # rank 0 printed its line itself
    assert _failure_status({0: failed(-15, 2.0, "SIGTERM"), 1: failed(1, 1.0)}, tmp_path) == 1
    assert capsys.readouterr().err == "error: out of memory (use a smaller --batch-size)\n"
    assert _failure_status({1: failed(-9, 1.0, "SIGKILL"), 2: failed(-15, 2.0, "SIGTERM")}, tmp_path / "none") == 1
    assert capsys.readouterr().err == "error: process 1 was stopped by SIGKILL\n"


def test_ranks_other_than_0_leave_their_error_for_the_launcher(tmp_path, monkeypatch, capsys):
    import typer

    from loradar_cli.cli._common import RANK_ERRORS_ENV, _fail

    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path))
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(typer.Exit):
            _fail("no   adapter 'x'", 3)
    assert (tmp_path / "1").read_text() == "error: no adapter 'x'\n" and not (tmp_path / "0").exists()
    assert capsys.readouterr().err == "error: no adapter 'x'\n"  # rank 0 alone prints


@pytest.mark.slow
def test_a_failure_on_every_rank_is_one_line_and_its_exit_code(store, tmp_path):
    make_base(store)
    done = subprocess.run(
        [sys.executable, "-m", "loradar_cli", "eval", "--base", "tiny", "--data", f"npz:{tmp_path / 'none.npz'}",
         "--store", str(store.root), "--nproc", "2"],
        capture_output=True, text=True, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: npz file {tmp_path / 'none.npz'} does not exist"]


@pytest.mark.slow
def test_two_rank_eval_reads_adapter_names_from_stdin(store):
    make_base(store)
    make_adapter(store, "tiny")
    env = cli_env()
    args = ["eval", "--adapter", "-", "--no-base", "--data", "digits", "--limit", "40", "--store", str(store.root)]
    done = subprocess.run(
        [sys.executable, "-m", "loradar_cli", *args, "--nproc", "2", "--json", "--quiet"],
        input="ad\n",
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [r["model"] for r in report["rows"]] == ["ad"] and report["run"]["world_size"] == 2


def test_leave_process_group_destroys_the_group_once(monkeypatch):
    """The exit hook tears the group down (a rank exiting with a live group could abort) and may run again."""
    import socket

    import torch.distributed as dist

    from loradar_cli.distributed import leave_process_group

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()


def test_end_job_waits_flushes_and_skips_interpreter_finalisation(tmp_path):
    """A finished rank leaves through a barrier and os._exit: buffered output still arrives, exit handlers (and the
    interpreter teardown where gloo could abort) do not run."""
    marker = tmp_path / "finalised"
    script = f"""
import atexit, pathlib, socket, os
import torch.distributed as dist
from loradar_cli.distributed import end_job
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)
atexit.register(pathlib.Path({str(marker)!r}).touch)
print("results", end="")
end_job(int(os.environ["CODE"]))
print("never")
"""
    for code in (0, 3):
        env = {**cli_env(), "CODE": str(code)}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert (done.returncode, done.stdout) == (code, "results"), done.stderr[-2000:]
        assert not marker.exists()


def test_the_cli_ends_through_end_job_only_inside_a_process_group(monkeypatch):
    from loradar_cli.cli import app

    ended = []
    monkeypatch.setattr(app, "run", lambda: 0)
    monkeypatch.setattr("loradar_cli.distributed.end_job", ended.append)
    with pytest.raises(SystemExit) as outside:
        app.main()
    assert outside.value.code == 0 and ended == []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for code in (0, 3):
        monkeypatch.setattr(app, "run", lambda code=code: code)
        with pytest.raises(SystemExit):  # (the real end_job never returns)
            app.main()
    assert ended == [0, 3]  # a failing rank leaves the same way, with its code
