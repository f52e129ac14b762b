"""Rich tables for results (printed on stderr so stdout stays clean for --json and pipes)."""

from collections.abc import Sequence
from typing import Any

from rich.table import Table


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def eval_table(rows: Sequence[Any], title: str = "accuracy (%)") -> Table:
    """Rows of EvalRow: model × {clean, each attack, each saved set, worst case}."""
    attacks = list(dict.fromkeys(k for r in rows for k in r.attacks))
    sets = list(dict.fromkeys(k for r in rows for k in r.adv_sets))
    through = {r.model: r.attacked for r in rows if r.attacked != "white-box"} if attacks else {}
    notes = [f"{m} attacked through {a}" for m, a in through.items()]
    if attacks and any(r.early_stop for r in rows):
        notes.insert(0, "attack columns: robust after that attack and all before it (early stopping)")
    table = Table(title=title, caption="; ".join(notes) or None)
    table.add_column("model", style="bold")
    for col in ["clean", *attacks, *sets, "worst case"]:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [
            pct(r.clean),
            *(pct(r.attacks.get(a)) for a in attacks),
            *(pct(r.adv_sets.get(s)) for s in sets),
            pct(r.worst_case if attacks else None),
        ]
        table.add_row(r.model, *cells)
    return table


def kv_table(title: str, items: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in items.items():
        table.add_row(key, pct(value) if isinstance(value, float) and 0 <= value <= 1 else str(value))
    return table
