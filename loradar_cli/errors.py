"""One error hierarchy: the library raises these, the CLI prints their message on one line and exits.

Exit codes (stable, documented in the README): 0 success, 1 other loradar error, 2 a bad command line or option
value (Click's usage errors use 2 as well), 3 not found, 4 name taken, 5 corrupt file, 6 incompatible inputs,
70 internal error (a bug: rerun with LORADAR_DEBUG=1 for the traceback), 130 interrupted (Ctrl-C).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

INTERNAL_EXIT_CODE = 70  # EX_SOFTWARE in sysexits.h
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


class LoradarError(Exception):
    """A user-facing error: a clear message (and optional hint), never a traceback."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class InvalidValueError(LoradarError):
    """An option value is out of range or malformed."""

    exit_code = 2


class NotFoundError(LoradarError):
    """A named adapter, base, file or layer does not exist."""

    exit_code = 3


class ExistsError(LoradarError):
    """A name is taken in the store and --overwrite was not given."""

    exit_code = 4


class CorruptError(LoradarError):
    """A stored file is unreadable or its checksum does not match."""

    exit_code = 5


class IncompatibleError(LoradarError):
    """An adapter does not fit the base or the other adapters it is combined with."""

    exit_code = 6


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (LoradarError, InvalidValueError, NotFoundError, ExistsError, CorruptError, IncompatibleError)
}


class LoradarWarning(UserWarning):
    """Something the user should know that does not stop the command (printed as one `warning:` line)."""


class ProvenanceWarning(LoradarWarning):
    """Data that does not match what a base was fitted on (classes, image statistics); an error under --strict."""


def validation_message(err: "ValidationError", *, first: bool = False, values: bool = True) -> str:
    """The one formatter of pydantic's multi-line report: `field: message (got value)` items joined by '; '.

    `first` keeps only the first problem; `values` off leaves the offending values out (e.g. file contents).
    """
    items = [
        f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" + (f" (got {e['input']!r})" if values else "")
        for e in err.errors()[: 1 if first else None]
    ]
    return "; ".join(items)
