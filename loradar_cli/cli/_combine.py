"""Shared pieces of the combination commands: options, weight parsing, the --plot availability check (their
tables are in `cli/_tables.py`)."""

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from loradar_cli.cli._common import number
from loradar_cli.errors import InvalidValueError

BaseOpt = Annotated[str | None, typer.Option("--base", help="Base model (default: the adapters' base).")]
AdvSetsOpt = Annotated[list[Path] | None, typer.Option("--adv-set", help="Saved adversarial set; repeatable.")]
OptDataOpt = Annotated[
    str | None, typer.Option("--data", help="Clean inputs: digits | mnist:DIR | cifar10:DIR | ... (labelled 'clean').")
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split of --data: train, val or test.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Write per-sample predictions to this JSON file.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", help="weighted: one weight per adapter (default: reliability from stored validation metrics)."
    ),
]
IdentifierOpt = Annotated[
    str | None,
    typer.Option(
        "--identifier",
        help="route: a fitted identifier (fit-identifier); default: the most confident adapter classifies.",
    ),
]


def parse_weights(text: str | None, what: str = "--weights") -> list[float] | None:
    """'0.5,0.5' or '1/3,2/3,-1' -> floats (negative weights subtract an adapter)."""
    if text is None:
        return None
    try:
        return [number(part) for part in text.split(",")]
    except ValueError:
        raise InvalidValueError(f"{what} expects comma-separated numbers such as 0.5,0.5, got {text!r}") from None


def check_plot_available(plot: Path | None) -> None:
    """--plot needs matplotlib, which loradar does not depend on."""
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise InvalidValueError(
            "--plot needs matplotlib, which is not installed",
            hint="pip install matplotlib (or the package's [plot] extra)",
        )
