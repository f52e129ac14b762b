"""`loradar export`: write entries and what they need to one tar or zip bundle."""

from pathlib import Path
from typing import Annotated

import typer

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, open_store, run_command
from loradar_cli.cli._output import show_result


@run_command
def export_cli(
    names: Annotated[list[str], typer.Argument(help="Adapters (or identifiers, bases) to export.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file: .tar, .tar.gz, .tgz or .zip.")],
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Leave the base out; only its sha256 fingerprint travels.")
    ] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Bundle adapters with their merge/trim ancestors, a manifest holding every file's sha256, and the base."""
    from loradar_cli.jobs.export import export_entries

    report = export_entries(open_store(store), names, out, with_base=not no_base)

    def human() -> None:
        console.print(f"wrote {report.out} ({report.bytes} bytes, sha256 {report.sha256[:12]})", highlight=False)
        for entry in report.entries:
            console.print(f"  {entry}", highlight=False)

    show_result(json_out, report.model_dump(), human=human)
