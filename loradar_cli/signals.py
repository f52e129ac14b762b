"""Ctrl-C around C-extension imports: held while they load, and remembered once received.

A KeyboardInterrupt raised inside an extension's initialisation leaves it half-imported. The process then fails
later with a wrong error (numpy without `_multiarray_umath`, a RecursionError), or aborts: pybind11 turns the
interrupt into std::terminate. Holding SIGINT while torch, timm, torchvision and scikit-learn import delays a
Ctrl-C by at most those seconds and delivers it at the next safe point.
"""

import importlib
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, ModuleType

_state = {"received": False}


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Block SIGINT in this (main) thread for the block; one that arrived meanwhile is delivered at its end."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield  # only the main thread receives signals in Python; Windows has no signal mask
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def import_held(name: str) -> ModuleType:
    """`importlib.import_module(name)` with Ctrl-C held (for modules with C extensions)."""
    with interrupts_held():
        return importlib.import_module(name)


def remember_interrupts() -> None:
    """Note every Ctrl-C this process receives (it still raises KeyboardInterrupt), if Python's handler is installed.

    A shell without job control starts background commands with SIGINT ignored: that choice is kept.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)


def interrupt_received() -> bool:
    """Whether a Ctrl-C reached this process since `remember_interrupts`."""
    return _state["received"]


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    _state["received"] = True
    raise KeyboardInterrupt
