"""`python -m benchmarks.recipes_table OUT`: the JSONs of `benchmarks.recipes_runs` as Markdown tables on stdout.

Recipes: the learning rate, clean, PGD-20 and worst-case accuracy (%) on the evaluated test images, the training's seconds per
epoch (mean over epochs) and the epoch kept. The AMT ablation: every row of the pool's evaluation (members,
tts merge, trimmed merge, majority vote) on worst-case accuracy.
"""

import argparse
import json
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def eps_text(eps: float | str) -> str:
    """Eps as the sweep was given it ('8/255'); older sweeps stored a float."""
    return eps if isinstance(eps, str) else f"{eps:g}"


def eps_value(eps: float | str) -> float:
    """Eps as a number, to sort by ('8/255' -> 0.0314)."""
    if isinstance(eps, str) and "/" in eps:
        num, den = eps.split("/", 1)
        return float(num) / float(den)
    return float(eps)


def history(train: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch records of a train report: an adapter's combination, or a base's (AutoLoRa) origin."""
    report = train["report"]
    return (report.get("combination") or report.get("origin") or {}).get("history", [])


def train_lr(train: dict[str, Any]) -> str:
    """The learning rate of a train command as run ('default' when left to the command, '?' for an entry that was
    trained before an interrupted sweep and only shown)."""
    words = train.get("command", "").split()
    if words[1:2] != ["train"]:
        return "?"
    return words[words.index("--lr") + 1] if "--lr" in words[:-1] else "default"


def recipe_row(doc: dict[str, Any]) -> list[str]:
    """One recipe run: recipe, eps, lr, clean, PGD-20, worst case, s/epoch, kept epoch, n."""
    rows = doc["eval"]["report"]["rows"]
    row = rows[0]
    if doc["recipe"] == "base":
        seconds, kept, lr = "—", "—", "—"
    else:
        epochs = history(doc["train"])
        seconds = f"{sum(h['seconds'] for h in epochs) / max(len(epochs), 1):.0f}"
        kept = str(int(doc["train"]["report"]["metrics"]["best_epoch"]))
        lr = train_lr(doc["train"])
    cells = [_pct(row["clean"]), _pct(row["attacks"].get("pgd")), _pct(row["worst_case"]), seconds, kept]
    return [doc["recipe"], eps_text(doc["eps"]), lr, *cells, str(row["n"])]


def pool_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Every row of the ablation's evaluation: model, clean, PGD-20, worst case."""
    out = []
    for row in doc["eval"]["report"]["rows"]:
        out.append([row["model"], _pct(row["clean"]), _pct(row["attacks"].get("pgd")), _pct(row["worst_case"])])
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    """Read OUT/*.json and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    docs = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    order = ["base", "loradar", "pgd-at", "trades", "mart", "amt", "advlora", "autolora", "hyperat"]
    runs = [d for d in docs if not d["recipe"].startswith(("pool-", "variants-"))]
    runs.sort(key=lambda d: (eps_value(d["eps"]), order.index(d["recipe"]) if d["recipe"] in order else len(order)))
    header = ["recipe", "eps", "lr", "clean", "PGD-20", "worst case", "s/epoch", "epoch kept", "n"]
    print(markdown(header, [recipe_row(d) for d in runs]))
    for doc in (d for d in docs if d["recipe"].startswith(("pool-", "variants-"))):
        print(f"\n{doc['recipe']} evaluated at eps {eps_text(doc['eps'])}:\n")
        print(markdown(["model", "clean", "PGD-20", "worst case"], pool_rows(doc)))
        merges = {"tts": doc["merge"]} if "merge" in doc else doc.get("made", {})
        for name, merge in merges.items():
            report = merge["report"]
            weights = report.get("weights", report.get("combination", {}).get("weights"))
            if weights is not None:
                print(f"\n{name} weights: {', '.join(f'{w:.2f}' for w in weights)}")


if __name__ == "__main__":
    main()
