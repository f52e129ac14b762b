"""`loradar mv`: rename a store entry."""

from typing import Annotated

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, open_store, run_command
from loradar_cli.cli._output import show_result
from loradar_cli.cli.rm import KindOpt, print_orphans


@run_command
def mv_cli(
    old: Annotated[str, typer.Argument(help="Current name.")],
    new: Annotated[str, typer.Argument(help="New name.")],
    kind: KindOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rename even if other entries refer to the old name.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rename an entry; refuses while other entries refer to it unless --force (which names them)."""
    from loradar_cli.jobs.mv import rename_entry

    report = rename_entry(open_store(store), old, new, kind=kind, force=force)

    def human() -> None:
        console.print(f"renamed {report.kind} {report.old} → {report.new}", highlight=False)
        print_orphans(report.orphans)

    show_result(json_out, report.model_dump(), human=human)
