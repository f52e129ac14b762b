"""signals: Ctrl-C is held while C extensions import and delivered after; a received one is remembered."""

import os
import signal

import pytest
import typer

from loradar_cli import signals


@pytest.fixture
def sigint_handler():
    """Run with Python's own SIGINT handler (a background shell may have started the tests with SIGINT ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    state = dict(signals._state)
    yield
    signal.signal(signal.SIGINT, old)
    signals._state.update(state)


def test_a_ctrl_c_inside_the_held_block_arrives_at_its_end(sigint_handler):
    reached = []
    with pytest.raises(KeyboardInterrupt), signals.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the kill")  # the held signal did not interrupt the block
    assert reached == ["after the kill"]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the mask is restored


def test_import_held_returns_the_module():
    assert signals.import_held("json").dumps([1]) == "[1]"


def test_received_interrupts_are_remembered_and_still_raise(sigint_handler):
    signals._state["received"] = False
    signals.remember_interrupts()
    assert not signals.interrupt_received()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signals.interrupt_received()


def test_an_ignored_sigint_stays_ignored(sigint_handler):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals.remember_interrupts()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_an_error_after_a_ctrl_c_is_reported_as_the_interrupt(monkeypatch, capsys):
    """A library that turned the KeyboardInterrupt into another exception (a half-imported module) exits 130."""
    from loradar_cli.cli._common import run_command

    def broken_by_the_interrupt() -> None:
        raise AttributeError("module 'numpy._core' has no attribute '_multiarray_umath'")

    monkeypatch.setitem(signals._state, "received", True)
    with pytest.raises(typer.Exit) as done:
        run_command(broken_by_the_interrupt)()
    assert done.value.exit_code == 130 and capsys.readouterr().err.startswith("interrupted:")
    monkeypatch.setitem(signals._state, "received", False)
    with pytest.raises(typer.Exit) as done:
        run_command(broken_by_the_interrupt)()
    assert done.value.exit_code == 70  # without a Ctrl-C it is the bug it looks like
