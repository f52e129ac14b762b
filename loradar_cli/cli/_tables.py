"""Rich tables for every command's results (printed on stderr so stdout stays clean for --json and pipes)."""

from collections.abc import Mapping, Sequence
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


def sets_table(report: Mapping[str, Any]) -> Table:
    """Per input set: the true attack, identification accuracy and what was predicted."""
    table = Table(title=f"attack identification ({report['mode']})")
    for col in ("set", "attack", "n", "accuracy (%)", "predicted"):
        table.add_column(col)
    for label, row in report["sets"].items():
        predicted = ", ".join(f"{k}: {v}" for k, v in row["predicted"].items())
        table.add_row(label, row["attack"], str(row["n"]), pct(row["accuracy"]), predicted)
    return table


def confusion_table(confusion: Mapping[str, Any], title: str) -> Table:
    """Confusion matrix: rows true attack, columns predicted (the last column is 'unknown')."""
    table = Table(title=f"{title} (rows: true, columns: predicted)")
    table.add_column("true \\ predicted", style="bold")
    for label in confusion["columns"]:
        table.add_column(label, justify="right")
    for label, row in zip(confusion["rows"], confusion["matrix"], strict=True):
        table.add_row(label, *(str(v) for v in row))
    return table


def per_class_table(per_class: Mapping[str, Mapping[str, Any]], title: str = "per-class scores") -> Table:
    """Precision, recall and support per true class (precision '-' for a class never predicted)."""
    table = Table(title=title)
    for col in ("class", "precision (%)", "recall (%)", "n"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, row in per_class.items():
        table.add_row(name, pct(row["precision"]), pct(row["recall"]), str(row["support"]))
    return table
