"""`loradar list` and `loradar show`: browse the store (bases, adapters, identifiers) and adapters' lineage."""

import json
from typing import Annotated, Any

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, open_store, run_command
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import pct

KIND_HELP = "base, adapter, identifier or pool"


@run_command
def list_cli(
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    kind: Annotated[str | None, typer.Option("--kind", help=f"Only this kind: {KIND_HELP}.")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Only entries of this base (and the base).")] = None,
    attack: Annotated[str | None, typer.Option("--attack", help="Only adapters specialised to this attack.")] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="Only adapters of this recipe or combination (linear, trim...).")
    ] = None,
) -> None:
    """List the store's entries: names one per line on stdout, a table on stderr (or --json)."""
    from loradar_cli.jobs.browse import list_entries

    report = list_entries(open_store(store), kind=kind, base=base, attack=attack, recipe=recipe)
    for problem in report.skipped:
        console.print(f"[yellow]skipped:[/] {problem} (run loradar verify)", highlight=False, soft_wrap=True)
    show_result(
        json_out, report.as_json(), human=lambda: _print_table(report), result=[row.name for row in report.rows]
    )


def _print_table(report: Any) -> None:
    from rich.table import Table

    table = Table(title=f"store {report.store}")
    for col in ("name", "kind", "model", "base", "recipe", "attack / data", "val clean", "val robust"):
        table.add_column(col, no_wrap=True, justify="right" if col.startswith("val") else "left")
    for r in report.rows:
        table.add_row(r.name, r.kind, r.model, r.base, r.recipe, r.attack, pct(r.val_clean), pct(r.val_robust))
    _wide_console().print(table, crop=False)


def _wide_console() -> Any:
    """The stderr console; piped or redirected, one as wide as the content (rich would cut at 80 columns)."""
    from rich.console import Console

    return console if console.is_terminal else Console(stderr=True, width=10_000, no_color=True)


@run_command
def show_cli(
    name: Annotated[str, typer.Argument(help="Adapter, base or identifier name.")],
    kind: Annotated[str | None, typer.Option("--kind", help=f"{KIND_HELP} (when two kinds share the name).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print an entry's metadata (JSON on stdout) and, for adapters, its lineage as a tree on stderr."""
    from loradar_cli.jobs.browse import lineage, show_entry

    the_store = open_store(store)
    resolved, data = show_entry(the_store, name, kind)

    def human() -> None:
        if resolved == "adapter":
            _wide_console().print(_tree(lineage(the_store, name)), crop=False)

    show_result(json_out, data, human=human, result=json.dumps(data, indent=2, default=str))


def _tree(node: Any, tree: Any = None) -> Any:
    from rich.tree import Tree

    label = node.label if node.how is None else f"{node.how}: {node.label}"
    branch = Tree(label, highlight=False) if tree is None else tree.add(label, highlight=False)
    for child in node.children:
        _tree(child, branch)
    return branch
