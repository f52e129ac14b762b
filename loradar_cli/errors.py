"""One error hierarchy: the library raises these, the CLI prints their message on one line and exits."""


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


class NotFoundError(LoradarError):
    """A named adapter, base, file or layer does not exist."""


class ExistsError(LoradarError):
    """A name is taken in the store and --overwrite was not given."""


class CorruptError(LoradarError):
    """A stored file is unreadable or its checksum does not match."""


class IncompatibleError(LoradarError):
    """An adapter does not fit the base or the other adapters it is combined with."""


class InvalidValueError(LoradarError):
    """An option value is out of range or malformed."""
