"""`loradar rm`: remove store entries."""

from typing import Annotated

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, emit_json, open_store, run_command

KindOpt = Annotated[
    str | None, typer.Option("--kind", help="base, adapter or identifier (needed when a name is used by two kinds).")
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
    if json_out:
        emit_json(report.model_dump())
        return
    for entry in report.removed:
        console.print(f"removed {entry}", highlight=False)
    for o in report.orphans:
        console.print(f"[yellow]orphaned:[/] {o.kind} {o.name} (its {o.relation} {o.missing} is gone)", highlight=False)
