"""Atomic file writes with the user's umask: a command that fails leaves no half-written file behind."""

import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2  # renameat2(2) flag, linux/fs.h
_AT_FDCWD = -100


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new regular file, as open(2) with 0666 would give it."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a new folder, as mkdir(2) with 0777 would give it."""
    return 0o777 & ~umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden folder in `parent` with the umask's mode (mkdtemp alone makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def cannot_write(path: Path) -> str | None:
    """Why a new file could not be written at `path`, or None: checked before a command's work, not after it."""
    if path.is_dir():
        return f"{path} is a folder"
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent  # atomic_path creates the missing folders below the nearest existing one
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return None


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (never following or replacing anything there) with the umask's mode and sync it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    """The bytes of a regular file, refusing a symbolic link (O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> "ctypes._CFuncPtr | None":
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _host() -> str:
    """This machine's short host name, safe inside a file name."""
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "host"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporary files of writes to `path` whose process died (SIGKILL, power loss) on this host.

    A writer's temporary name records its host and process id, so a live writer's file, or one written from
    another machine sharing the folder, is never touched.
    """
    removed = []
    host = _host()
    for tmp in path.parent.glob(f".{path.name}.*.part"):
        parts = tmp.name.rsplit(".", 3)  # [".NAME.RANDOM", HOST, PID, "part"]
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit() or _pid_alive(int(parts[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write to; it replaces `path` on success and is removed on failure.

    Temporary files left by a killed earlier write to the same path are removed first (see `remove_orphans`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{_host()}.{os.getpid()}.part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes it 0600; the result gets the mode any other new file would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
