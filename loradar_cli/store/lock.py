"""Per-entry write claims: an exclusive flock(2) on `<root>/.locks/<kind>-<name>.lock`, held until the write ends.

The kernel drops a flock when its holder dies, so a killed writer never leaves a stale claim; the lock files
themselves stay (empty, hidden) because unlinking a lock file races with a process about to take it.
"""

import fcntl
import os
from pathlib import Path

from loradar_cli.errors import ExistsError
from loradar_cli.files import dir_mode

LOCKS = ".locks"
_held: dict[str, int] = {}


def lock_path(root: Path, kind: str, name: str) -> Path:
    return root / LOCKS / f"{kind}-{name}.lock"


def try_claim(path: Path) -> bool:
    """Take the claim without waiting; True if this process now holds it (reentrant within one process)."""
    key = str(path)
    if key in _held:
        return True
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, dir_mode())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return True


def claim(path: Path, what: str) -> None:
    """Take the claim for `what` (e.g. "adapter 'x'") or fail at once naming the process that holds it."""
    if try_claim(path):
        return
    try:
        holder = path.read_text().strip() or "?"
    except OSError:
        holder = "?"
    raise ExistsError(
        f"{what} is being written by another loradar process (pid {holder})", hint="wait for it or pick another name"
    )


def release(path: Path) -> None:
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def held(path: Path) -> bool:
    return str(path) in _held
