"""Shared CLI plumbing: stderr console, JSON on stdout, one-line errors, option parsers, progress bars."""

import errno
import functools
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, ConsoleDimensions

from loradar_cli import names
from loradar_cli.cli._output import emit_json  # noqa: F401  (its home is cli/_output.py; re-exported for old imports)
from loradar_cli.errors import (
    INTERNAL_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    IncompatibleError,
    InvalidValueError,
    LoradarError,
    LoradarWarning,
    NotFoundError,
    ProvenanceWarning,
)
from loradar_cli.signals import import_held, interrupt_received

try:  # Typer >= 0.26 vendors Click as typer._click; its exceptions are not the click package's
    from typer import _click as click
except ImportError:  # pragma: no cover - older Typer runs on the click package
    import click  # type: ignore[no-redef]

PIPED_WIDTH = 1000  # off a terminal, lines as wide as their content (up to this): no cut names, no wrapped rows


class StderrConsole(Console):
    """Rich on stderr; when stderr is not a terminal, as wide as the content instead of the 80-column default.

    Tables and their titles shrink to their content either way, so in a log or a pipe they keep every name whole.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(max(size.width, PIPED_WIDTH), size.height)


console = StderrConsole(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
SEED_MAX = 2**64 - 1  # torch.manual_seed and numpy's default_rng accept [0, 2^64)
BROKEN_PIPE_EXIT_CODE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
PROGRESS_SECONDS = 5.0  # plain-line progress: at most one line per stage this often
_state = {"strict": False}

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Adapter store folder [env LORADAR_STORE; default ./adapters].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs stay on stderr).")]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for splits, initialisation and random starts.")
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help=f"Dataset spec KIND or KIND:PATH, KIND one of {names.choices(names.DATASETS)} "
        "(e.g. digits, mnist:DIR, cifar10:DIR, imagefolder:DIR, npz:FILE).",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N examples of the split.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing entry of that name.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size.", min=1)]
EpsOpt = Annotated[str | None, typer.Option("--eps", help="Perturbation budget in pixel units, e.g. 8/255 or 0.3.")]
AlphaOpt = Annotated[str | None, typer.Option("--alpha", help="Step size in pixel units, e.g. 2/255.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Attack iterations.")]
AttackOptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--attack-opt", help="Extra attack option KEY=VALUE (or ATTACK.KEY=VALUE for one attack); repeatable."
    ),
]


def set_strict(strict: bool) -> None:
    """--strict (a root option): data-provenance warnings become errors."""
    _state["strict"] = strict


def run_command(func: F) -> F:
    """The one error path: every failure becomes one stderr line and an exit code, never a traceback.

    LoradarError subclasses exit with their class's code, any other exception is an internal error (exit 70;
    LORADAR_DEBUG=1 re-raises it for the traceback), Ctrl-C exits 130. Float options are checked finite here,
    so no command can forget it; loradar's warnings print as one `warning:` line each.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(os.environ.get("LORADAR_DEBUG"))
        try:
            import_held("torch")  # every command's C extensions, loaded with Ctrl-C held (see signals.py)
            with _warnings_on_stderr(debug):
                check_finite_options(kwargs)
                check_output_paths(kwargs)
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except click.ClickException as err:
            _fail(err.format_message(), err.exit_code)
        except LoradarError as err:
            if debug:
                raise
            _fail(err.one_line(), err.exit_code)
        except ProvenanceWarning as err:
            if debug:
                raise
            _fail(f"{err} (--strict)", IncompatibleError.exit_code)
        except KeyboardInterrupt:
            forget_interrupt()
            _fail("Ctrl-C; no partial file was left behind", INTERRUPTED_EXIT_CODE, prefix="interrupted")
        except BrokenPipeError:  # `loradar ... | head`: the reader left; exit as `yes | head` does, silently
            _quiet_stdout()
            raise typer.Exit(BROKEN_PIPE_EXIT_CODE) from None
        except Exception as err:
            if debug:
                raise
            if interrupt_received():  # a Ctrl-C that some library turned into another exception
                forget_interrupt()
                _fail("Ctrl-C; no partial file was left behind", INTERRUPTED_EXIT_CODE, prefix="interrupted")
            known = known_error(err)
            if known is not None:
                _fail(known.one_line(), known.exit_code)
            _fail(
                f"internal error: {describe_exception(err)} (set LORADAR_DEBUG=1 for the traceback)", INTERNAL_EXIT_CODE
            )

    return wrapper  # type: ignore[return-value]


def forget_interrupt() -> None:
    """Tell CPython the Ctrl-C was handled, so `python -m loradar_cli` exits 130 rather than dying by SIGINT.

    A KeyboardInterrupt that leaves any `exec` of a string (dataclass and pydantic code generation during a lazy
    import) sets the interpreter's "unhandled Ctrl-C" flag, which is never cleared when the exception is caught
    later; at exit the interpreter then re-raises SIGINT on itself. Every `exec` of a string clears the flag first.
    """
    exec("pass")  # a constant string: only its side effect on the flag is wanted


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # an in-memory stdout (tests) has no descriptor
        pass
    finally:
        os.close(devnull)


RANK_ERRORS_ENV = "LORADAR_RANK_ERRORS"  # set by `--nproc`: the folder where ranks other than 0 leave their error


def rank_error_file(folder: str | Path, rank: int | str) -> Path:
    """Where rank `rank` of an `--nproc` run leaves its error line for the launcher."""
    return Path(folder, str(rank))


def _fail(message: str, code: int, prefix: str = "error") -> NoReturn:
    """Print `prefix: message` as one stderr line and exit with `code`.

    Under `--nproc`, ranks other than 0 leave the line in a file instead: the launcher prints it if rank 0 did not
    fail first, so a failure on every rank is still one line.
    """
    text = " ".join(message.split())
    folder, rank = os.environ.get(RANK_ERRORS_ENV), os.environ.get("RANK", "0")
    if folder and rank != "0":
        rank_error_file(folder, rank).write_text(f"{prefix}: {text}\n")
    else:
        console.print(f"[bold red]{prefix}:[/] {text}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def describe_exception(err: BaseException) -> str:
    """`Type: first line of the message`, short enough for one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_ALLOCATION_FAILURES = ("can't allocate memory", "Storage size calculation overflowed", "out of memory")


_PATH_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC, errno.EROFS,
    errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP,
}  # fmt: skip
"""Errors of a path the user gave (a folder that cannot be made, a full disk): one line naming it, not a bug."""


def known_error(err: Exception) -> LoradarError | None:
    """Exceptions with a known user-level cause (memory, non-finite maths) as LoradarErrors; None otherwise."""
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err)
    if names & {"MemoryError", "OutOfMemoryError"} or any(m in text for m in _ALLOCATION_FAILURES):
        return LoradarError(
            f"out of memory ({describe_exception(err)})", hint="use a smaller --batch-size, --rank or --limit"
        )
    if isinstance(err, OSError) and err.filename is not None and err.errno in _PATH_ERRNOS:
        where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
        cls = NotFoundError if err.errno == errno.ENOENT else LoradarError
        return cls(f"{where}: {err.strerror or os.strerror(err.errno)}")
    if "LinAlgError" in names or "_LinAlgError" in names:
        return IncompatibleError(
            f"a matrix decomposition failed ({describe_exception(err)})",
            hint="an adapter may hold NaN or infinite values",
        )
    return None


def check_finite_options(kwargs: Mapping[str, Any]) -> None:
    """Every float option (and list of floats) must be finite: `inf` and `nan` parse as floats but mean nothing."""
    for name, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise InvalidValueError(f"{option_flag(name)} must be a finite number, got {item}")


OUTPUT_PARAMETERS = ("out", "plot")
"""Parameters that name a file a command writes: checked writable before the command runs."""


def check_output_paths(kwargs: Mapping[str, Any]) -> None:
    """Refuse an output file that could not be written before any work is done (a folder, no permission, ...)."""
    from loradar_cli.files import cannot_write

    for name in OUTPUT_PARAMETERS:
        path = kwargs.get(name)
        reason = cannot_write(path) if isinstance(path, Path) else None
        if reason:
            raise InvalidValueError(f"{option_flag(name)} {path}: cannot write there ({reason})")


def option_flag(name: str) -> str:
    """The flag a parameter was declared with (`lora_alpha` -> `--lora-alpha`), from the running Click command."""
    get_context = getattr(click, "get_current_context", None) or click.globals.get_current_context
    ctx = get_context(silent=True)
    for param in ctx.command.params if ctx is not None else []:
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return "--" + name.replace("_", "-")


@contextmanager
def _warnings_on_stderr(debug: bool) -> Iterator[None]:
    """loradar warnings as one `warning:` line each (errors under --strict); other libraries' warnings hidden."""

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        if issubclass(category, LoradarWarning) or debug:
            console.print(f"[yellow]warning:[/] {' '.join(str(message).split())}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always" if debug else "ignore")
        warnings.simplefilter("always", LoradarWarning)
        if _state["strict"]:
            warnings.simplefilter("error", ProvenanceWarning)
        warnings.showwarning = show
        yield


def number(text: str) -> float:
    """'8/255', '0.5/255', '0.03' or '2e-2' -> a finite float; ValueError otherwise."""
    numerator, slash, denominator = text.strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except ZeroDivisionError:
        raise ValueError(f"division by zero in {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def parse_fraction(text: str | None, what: str = "--eps", *, allow_zero: bool = True) -> float | None:
    """'8/255', '0.5/255', '0.03' or '2e-2' -> float; negative, non-finite or malformed values are refused."""
    if text is None:
        return None
    try:
        value = number(text)
    except ValueError:
        raise InvalidValueError(f"{what} must be a number or a fraction such as 8/255, got {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidValueError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {text!r}")
    return value


def parse_value(text: str) -> Any:
    """Option values: JSON scalars where they parse (true, 3, 0.5, "x"), fractions like 8/255, else the string.

    Non-finite numbers (`1e400`, `Infinity`, `NaN`) are refused: no option means anything with them.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidValueError(f"{text!r} is not a finite number")
        return value
    try:
        return number(text)
    except ValueError:
        if text.strip().lower() in ("inf", "+inf", "-inf", "nan", "infinity", "-infinity"):
            raise InvalidValueError(f"{text!r} is not a finite number") from None
        return text


def parse_key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """KEY=VALUE items -> a dict (values through `parse_value`); a key given twice is refused."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidValueError(f"{what} expects KEY=VALUE, got {item!r}")
        if key in out:
            raise InvalidValueError(f"{what} {key} is given twice")
        try:
            out[key] = parse_value(value)
        except InvalidValueError as err:
            raise InvalidValueError(f"{what} {key}: {err.message}") from None
    return out


def parse_attack_option(item: str) -> tuple[str, str, Any]:
    """`ATTACK.KEY=VALUE` or `KEY=VALUE` -> (attack or "", key, value); the attack keeps its dashes (apgd-t), the
    key is normalised as `parse_key_values` does."""
    key, sep, text = item.partition("=")
    attack, dot, field = key.strip().rpartition(".")
    field = field.replace("-", "_")
    if not sep or not field or (dot and not attack):
        raise InvalidValueError(f"--attack-opt expects KEY=VALUE or ATTACK.KEY=VALUE, got {item!r}")
    return attack, field, parse_key_values([f"{field}={text}"], "--attack-opt")[field]


def attack_options(
    names: list[str], eps: str | None, alpha: str | None, steps: int | None, extra: list[str] | None
) -> dict[str, dict[str, Any]]:
    """Route --eps/--alpha/--steps to the attacks that accept them, and ATTACK.KEY=VALUE to one attack."""
    from loradar_cli.attacks import route_options

    shared: dict[str, Any] = {"eps": parse_fraction(eps), "alpha": parse_fraction(alpha, "--alpha"), "steps": steps}
    specific: dict[str, dict[str, Any]] = {}
    for item in extra or []:
        attack, field, value = parse_attack_option(item)
        key = item.partition("=")[0].strip()  # as the user wrote it, for messages
        target = specific.setdefault(attack, {}) if attack else shared
        if attack and attack not in names:
            raise InvalidValueError(f"--attack-opt {key}: attack {attack!r} is not among {', '.join(names)}")
        if field in target and (attack or field not in ("eps", "alpha", "steps") or target[field] is not None):
            raise InvalidValueError(f"--attack-opt {key} is given twice")
        target[field] = value
    return route_options(names, shared, specific)


def open_store(path: Path | None) -> "Any":
    """The store at `path` (or LORADAR_STORE, or ./adapters); a root that is not a folder is refused."""
    from loradar_cli.store.store import Store

    return Store(path)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Progress on stderr: a transient rich bar on a terminal, else plain lines; yields a (stage, done, total) callback.

    A 12-minute job whose stderr goes to a file must still show that it is alive, so off a terminal one line per
    stage is written every few seconds (and when the stage ends), with its rate.
    """
    if not enabled:
        yield lambda stage, done, total: None
        return
    if not console.is_terminal:
        yield PlainProgress(console.print)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        starts: dict[str, float] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
                starts[stage] = time.perf_counter()
            rate = done / max(time.perf_counter() - starts[stage], 1e-9)
            bar.update(tasks[stage], completed=done, total=total, rate=f"{rate:,.0f} img/s")

        yield update


class PlainProgress:
    """(stage, done, total) -> a line `stage: done/total (p %), r/s, t s`: when a stage starts, then at most every
    `interval` seconds, and when it ends (the rate counts from the stage's first report; a stage whose count
    goes back, such as `epoch 1/4` of the next adapter of a pool, starts over)."""

    def __init__(
        self,
        write: Callable[..., None],
        interval: float = PROGRESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.done: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if done < self.done.get(stage, 0):  # the same stage name run again: a new stage
            self.started.pop(stage, None)
            self.last.pop(stage, None)
        self.done[stage] = done
        start = self.started.setdefault(stage, now)
        if stage in self.last and done < total and now - self.last[stage] < self.interval:
            return
        self.last[stage] = now
        elapsed = now - start
        rate = f", {done / elapsed:.1f}/s" if elapsed > 0 else ""
        share = f" ({100 * done / total:.0f} %)" if total else ""
        self.write(f"{stage}: {done}/{total}{share}{rate}, {elapsed:.0f} s", highlight=False, soft_wrap=True)


def read_names(names: list[str]) -> list[str]:
    """Adapter arguments; '-' reads further names from stdin (one per line or a JSON document with 'name')."""
    out: list[str] = []
    for name in names:
        if name != "-":
            out.append(name)
            continue
        from loradar_cli.cli._engine_options import stdin_text

        out.extend(_names_from_text(stdin_text()))
    if not out:
        raise InvalidValueError("no adapter names given (stdin was empty)")
    return out


def _names_from_text(text: str) -> list[str]:
    """One name per line, or a JSON document (a name, a list, or objects with 'name' such as `--json` output)."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return [line.strip() for line in stripped.splitlines() if line.strip()]
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as err:
        raise InvalidValueError(f"stdin is not valid JSON: {err.msg} at line {err.lineno}") from None
    items = data if isinstance(data, list) else [data]
    names = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name:
            raise InvalidValueError("JSON on stdin must hold names or objects with a 'name' string")
        names.append(name)
    return names
