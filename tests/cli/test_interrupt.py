"""Ctrl-C on a real process: exit 130, one line on stderr, no traceback, no partial output file."""

import functools
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, make_adapter, make_base


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.0, 2.5, 4.0, 6.0])
def test_sigint_exits_130_with_one_line_and_no_partial_file(store, tmp_path, delay):
    base = make_base(store)
    make_adapter(store, base.name, "ad")
    out = tmp_path / "sets"
    args = [sys.executable, "-m", "loradar_cli", "attack", "--base", "tiny", "--adapter", "ad", "--attack", "pgd"]
    args += ["--attack-opt", "steps=200", "--out", str(out / "pgd.safetensors"), "--store", str(store.root), "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LORADAR_DEBUG", None)
    before = sorted(p.name for p in store.root.rglob("*"))
    # a shell without job control starts background commands with SIGINT ignored, and children inherit that: give
    # the attack the default disposition, as a terminal's foreground command has, so Python installs its handler
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=restore
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip(f"the attack finished within {delay} s")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1 and stdout == ""
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in store.root.rglob("*")) == before


def test_ctrl_c_caught_after_it_left_an_exec_still_exits_130(tmp_path):
    """A Ctrl-C raised inside `exec` of a string (code generation during a lazy import) and handled by the
    command wrapper must not make `python -m` re-raise SIGINT on itself at exit (returncode -2)."""
    module = tmp_path / "interrupted_in_exec.py"
    module.write_text(
        "import sys\n"
        "import typer\n"
        "from loradar_cli.cli._common import run_command\n"
        "command = run_command(lambda: exec('raise KeyboardInterrupt'))\n"
        "try:\n"
        "    command()\n"
        "except typer.Exit as done:\n"
        "    sys.exit(done.exit_code)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    proc = subprocess.run([sys.executable, "-m", module.stem], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().startswith("interrupted:")
