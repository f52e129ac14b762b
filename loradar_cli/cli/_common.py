"""Shared CLI plumbing: stderr console, JSON on stdout, one-line errors, option parsers, progress bars."""

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from loradar_cli.errors import InvalidValueError, LoradarError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Adapter store folder [env LORADAR_STORE; default ./adapters].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs stay on stderr).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for splits, initialisation and random starts.")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="digits | mnist:DIR | fashion-mnist:DIR | cifar10:DIR | cifar100:DIR | imagefolder:DIR | npz:FILE",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use only the first N examples of the split.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing entry of that name.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size.", min=1)]
EpsOpt = Annotated[str | None, typer.Option("--eps", help="Perturbation budget in pixel units, e.g. 8/255 or 0.3.")]
AlphaOpt = Annotated[str | None, typer.Option("--alpha", help="Step size in pixel units, e.g. 2/255.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Attack iterations.")]
AttackOptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--attack-opt", help="Extra attack option KEY=VALUE (or ATTACK.KEY=VALUE for one attack); repeatable."
    ),
]


def run_command(func: F) -> F:
    """Turn library errors into one stderr line and an exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LoradarError as err:
            if os.environ.get("LORADAR_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {err.one_line()}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted:[/] nothing was written", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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
    """Option values: JSON scalars where they parse (true, 3, 0.5, "x"), fractions like 8/255, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return number(text)
    except ValueError:
        return text


def parse_key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidValueError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def attack_options(
    names: list[str], eps: str | None, alpha: str | None, steps: int | None, extra: list[str] | None
) -> dict[str, dict[str, Any]]:
    """Route --eps/--alpha/--steps to the attacks that accept them, and ATTACK.KEY=VALUE to one attack."""
    from loradar_cli.attacks import route_options

    shared: dict[str, Any] = {"eps": parse_fraction(eps), "alpha": parse_fraction(alpha, "--alpha"), "steps": steps}
    specific: dict[str, dict[str, Any]] = {}
    for key, value in parse_key_values(extra, "--attack-opt").items():
        attack, dot, field = key.partition(".")
        if dot:
            if attack not in names:
                raise InvalidValueError(f"--attack-opt {key}: attack {attack!r} is not among {', '.join(names)}")
            specific.setdefault(attack, {})[field] = value
        else:
            shared[key] = value
    return route_options(names, shared, specific)


def emit_json(data: Any) -> None:
    """The command's machine result: exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def open_store(path: Path | None) -> "Any":
    from loradar_cli.store.store import Store

    return Store(path)


PLAIN_PROGRESS_EVERY_S = 5.0  # a redirected stderr gets one line per stage this often


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Progress on stderr with items (images) per second; yields a (stage, done, total) callback.

    A terminal gets a transient rich bar; a redirected stderr (a log file) gets a plain line every few seconds.
    """
    if not enabled:
        yield lambda stage, done, total: None
        return
    if not console.is_terminal:
        yield _plain_progress()
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


def _plain_progress() -> Callable[[str, int, int], None]:
    """A (stage, done, total) callback printing 'stage: done/total (N img/s)' every few seconds of a stage."""
    starts: dict[str, float] = {}
    last: dict[str, float] = {}

    def update(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        starts.setdefault(stage, now)
        if now - last.get(stage, starts[stage]) < PLAIN_PROGRESS_EVERY_S:
            return
        last[stage] = now
        rate = done / max(now - starts[stage], 1e-9)
        console.print(f"{stage}: {done}/{total} ({rate:,.0f} img/s)", highlight=False, soft_wrap=True)

    return update


def read_names(names: list[str]) -> list[str]:
    """Adapter arguments; '-' reads further names from stdin (one per line or a JSON document with 'name')."""
    out: list[str] = []
    for name in names:
        if name != "-":
            out.append(name)
            continue
        text = sys.stdin.read()
        out.extend(_names_from_text(text))
    if not out:
        raise InvalidValueError("no adapter names given (stdin was empty)")
    return out


def _names_from_text(text: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        data = json.loads(stripped)
        items = data if isinstance(data, list) else [data]
        return [item["name"] if isinstance(item, dict) else str(item) for item in items]
    return [line.strip() for line in stripped.splitlines() if line.strip()]
