"""`python -m benchmarks [--quick] [--out FILE]`: run every benchmarks/bench_<group>.py, table on stderr, JSON file.

A group's `rows(quick)` returns dicts with the keys of `benchmarks.ROW_KEYS`; a group that raises is reported as
one failed row, so one broken group does not hide the others.
"""

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import ROW_KEYS

HERE = Path(__file__).resolve().parent


def groups() -> list[str]:
    """Module names of the benchmark groups, sorted."""
    return sorted(f"benchmarks.{p.stem}" for p in HERE.glob("bench_*.py"))


def check_row(row: dict[str, Any], group: str) -> dict[str, Any]:
    """A row with exactly the contract's keys and types (ratio float, met bool)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"{group}: row {row.get('row')!r} lacks {', '.join(missing)}")
    return {**{k: row[k] for k in ROW_KEYS}, "ratio": float(row["ratio"]), "met": bool(row["met"]), "group": group}


def run_group(name: str, quick: bool) -> list[dict[str, Any]]:
    """One group's rows, or one failed row naming the error."""
    start = time.perf_counter()
    try:
        rows = [check_row(r, name) for r in importlib.import_module(name).rows(quick)]
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        rows = [
            {
                "row": f"{name} failed",
                "baseline": "-",
                "ratio": float("nan"),
                "goal": "runs",
                "met": False,
                "threads": 0,
                "device": "-",
                "detail": f"{type(err).__name__}: {err}",
                "group": name,
            }
        ]
    print(f"{name}: {len(rows)} row(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a rich table on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmarks (ratio against a baseline of the same run)")
    for col in ("row", "baseline", "ratio", "goal", "met", "threads", "device"):
        table.add_column(col, justify="right" if col in ("ratio", "threads") else "left")
    for r in rows:
        table.add_row(
            r["row"],
            r["baseline"],
            f"{r['ratio']:.3g}",
            r["goal"],
            "yes" if r["met"] else "NO",
            str(r["threads"]),
            r["device"],
        )
    Console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs; skips the slowest rows")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--only", action="append", help="run only groups whose name contains this; repeatable")
    args = parser.parse_args(argv)
    names = [g for g in groups() if not args.only or any(o in g for o in args.only)]
    rows = [row for name in names for row in run_group(name, args.quick)]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2, default=str) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
