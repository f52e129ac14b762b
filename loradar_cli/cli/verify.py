"""`loradar verify`: check every file, hash, link and tensor of the store."""

from typing import Annotated

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, open_store, run_command
from loradar_cli.cli._output import show_result


@run_command
def verify_cli(
    names: Annotated[list[str] | None, typer.Argument(help="Entries to check (default: the whole store).")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Remove leftovers of interrupted writes first.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Schema, sha256 of every file, base fingerprints, finite tensors, PEFT configs, links and leftovers.

    Prints one line per problem on stdout and exits 1 if there is any.
    """
    from loradar_cli.jobs.verify import verify

    report = verify(open_store(store), names or [], fix=fix)

    def human() -> None:
        for path in report.fixed:
            console.print(f"removed leftover {path}", highlight=False)
        console.print(f"{report.checked} entries checked, {len(report.problems)} problems", highlight=False)

    show_result(json_out, report.model_dump(), human=human, result=report.problems)
    if report.problems:
        raise typer.Exit(1)
