"""`loradar rm`: remove store entries."""

from collections.abc import Iterable
from typing import Annotated, Any

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, open_store, run_command
from loradar_cli.cli._output import show_result

KindOpt = Annotated[
    str | None,
    typer.Option("--kind", help="base, adapter, identifier or pool (needed when a name is used by two kinds)."),
]


@run_command
def rm_cli(
    names: Annotated[list[str], typer.Argument(help="Entries to remove.")],
    kind: KindOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Remove even if other entries depend on it.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove entries atomically; refuses while other entries depend on them unless --force (which names them)."""
    from loradar_cli.jobs.rm import remove_entries

    report = remove_entries(open_store(store), names, kind=kind, force=force)

    def human() -> None:
        for entry in report.removed:
            console.print(f"removed {entry}", highlight=False)
        print_orphans(report.orphans)

    show_result(json_out, report.model_dump(), human=human)


def print_orphans(orphans: Iterable[Any]) -> None:
    """One stderr line per entry left pointing at something that is gone (rm and mv --force)."""
    for o in orphans:
        console.print(f"[yellow]orphaned:[/] {o.kind} {o.name} (its {o.relation} {o.missing} is gone)", highlight=False)
