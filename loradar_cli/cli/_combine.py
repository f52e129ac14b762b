"""Shared pieces of the combination commands: weight parsing, result tables, the --plot availability check."""

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loradar_cli.cli._common import number
from loradar_cli.cli._tables import pct
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


def weights_table(report: Mapping[str, Any]) -> Table:
    """Per-adapter merge weights (with AMT's C, V and score for tts)."""
    scores = {row["adapter"]: row for row in report.get("scores") or []}
    table = Table(title=f"{report['method']} merge → {report['name']}")
    table.add_column("adapter", style="bold")
    columns = ("compactness", "divergence", "score") if scores else ()
    for col in (*columns, "weight"):
        table.add_column(col, justify="right")
    for name, weight in zip(report["parents"], report["weights"], strict=True):
        row = scores.get(name, {})
        table.add_row(name, *(f"{row[c]:.4f}" for c in columns), f"{weight:.4f}")
    return table


def layers_table(title: str, layers: Mapping[str, Mapping[str, Any]]) -> Table:
    """Per-layer rank and energy kept (merge re-factoring, trim)."""
    table = Table(title=title)
    table.add_column("layer", style="bold")
    for col in ("rank", "of", "energy kept (%)", "storage"):
        table.add_column(col, justify="right")
    for name, info in layers.items():
        rank = info.get("rank", info.get("stored_rank"))
        total = info.get("original_rank", info.get("min_dim"))
        kept = f"q={info['q']}" if "q" in info else str(rank)
        table.add_row(name, kept, str(total), pct(info["energy"]), info.get("storage", "lora"))
    return table


def vote_table(report: Mapping[str, Any]) -> Table:
    """Rows: each ensemble method, then each adapter alone; columns: the input sets."""
    sets = report["sets"]
    table = Table(title="accuracy (%)")
    table.add_column("model", style="bold")
    for label, row in sets.items():
        table.add_column(f"{label} (n={row['n']})", justify="right")
    for method in report["methods"]:
        table.add_row(
            f"{method} vote" if method != "route" else "route", *(pct(r["accuracy"][method]) for r in sets.values())
        )
    for name in dict.fromkeys([*report["members"], *report["compare"]]):
        table.add_row(name, *(pct(r["adapters"][name]) for r in sets.values()))
    return table
