"""Per-entry write claims: an exclusive flock(2) on `<root>/.locks/<kind>-<name>.lock`, held until the write ends.

The kernel drops a flock when its holder dies, so a killed writer never leaves a live claim. A released claim
unlinks its file (and the folder once empty), so a finished command leaves no trace; a claimer checks after
locking that the path still names the file it locked, which makes unlink-on-release safe against a process
that opened the file just before it was removed.
"""

import atexit
import contextlib
import fcntl
import os
import time
from pathlib import Path

from loradar_cli.errors import ExistsError
from loradar_cli.files import dir_mode

LOCKS = ".locks"
CLAIM_WAIT = 3.0  # seconds a writer waits for a claim before reporting its holder
_held: dict[str, int] = {}


def lock_path(root: Path, kind: str, name: str) -> Path:
    return root / LOCKS / f"{kind}-{name}.lock"


def try_claim(path: Path, *, timeout: float | None = 0.0) -> bool:
    """Take the claim, waiting up to `timeout` seconds (None: as long as it takes); True if this process now
    holds it (reentrant within one process)."""
    key = str(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    if key in _held:
        return True
    while True:
        try:
            path.parent.mkdir()
            os.chmod(path.parent, dir_mode())
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except FileNotFoundError:
            continue  # the folder was removed by a releasing process in between
        if not _flock(fd, fcntl.LOCK_EX, deadline):
            os.close(fd)
            return False
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released and unlinked it after we opened it: try again on the new file
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = fd
        return True


def _flock(fd: int, mode: int, deadline: float | None) -> bool:
    """flock, polling until `deadline` (None: block); False if still held by another process then."""
    if deadline is None:
        fcntl.flock(fd, mode)
        return True
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def claim(path: Path, what: str) -> None:
    """Take the claim for `what` (e.g. "adapter 'x'") or fail naming the process that holds it.

    It waits a few seconds first: a writer of another name may hold it briefly while removing this name's
    leftovers, and that must not make this writer fail.
    """
    if try_claim(path, timeout=CLAIM_WAIT):
        return
    raise busy_error(path, what)


def busy_error(path: Path, what: str) -> ExistsError:
    return ExistsError(
        f"{what} is being written by another loradar process (pid {holder(path)})",
        hint="wait for it or pick another name",
    )


def release(path: Path) -> None:
    """Give the claim up: unlink its file while still holding the lock, then close (dropping the flock)."""
    fd = _held.pop(str(path), None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)
    with contextlib.suppress(OSError):  # other claims may live there
        path.parent.rmdir()


def busy(path: Path) -> bool:
    """True if another process holds the claim now (a peek: nothing is created or kept)."""
    if str(path) in _held:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return not _flock(fd, fcntl.LOCK_SH, time.monotonic() + CLAIM_WAIT)
    finally:
        os.close(fd)


def holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def held(path: Path) -> bool:
    return str(path) in _held


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(Path(key))
