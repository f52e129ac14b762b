"""The `loradar` command: a Typer app whose commands import torch only when they run."""

import functools
import sys

import typer

from loradar_cli import __version__
from loradar_cli.cli._common import click, console, forget_interrupt, set_strict
from loradar_cli.cli.attack import attack_cli
from loradar_cli.cli.browse import list_cli, show_cli
from loradar_cli.cli.ensemble_vote import ensemble_vote_cli
from loradar_cli.cli.evaluate import eval_cli
from loradar_cli.cli.export import export_cli
from loradar_cli.cli.finetune import finetune_cli
from loradar_cli.cli.identify_attack import fit_identifier_cli, identify_cli
from loradar_cli.cli.import_ import import_base_cli, import_cli
from loradar_cli.cli.merge import merge_cli
from loradar_cli.cli.mv import mv_cli
from loradar_cli.cli.quickstart import quickstart_cli
from loradar_cli.cli.rm import rm_cli
from loradar_cli.cli.train import train_cli
from loradar_cli.cli.trim import trim_cli
from loradar_cli.cli.verify import verify_cli
from loradar_cli.signals import remember_interrupts

app = typer.Typer(
    name="loradar",
    help="Robust, attack-specialised LoRA adapters for timm vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"loradar {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Data that does not match a base's classes or image statistics is an error."
    ),
) -> None:
    """Train, attack, evaluate and combine robust LoRA adapters."""
    set_strict(strict)


app.command("quickstart")(quickstart_cli)
app.command("finetune")(finetune_cli)
app.command("train")(train_cli)
app.command("attack")(attack_cli)
app.command("eval")(eval_cli)
app.command("list")(list_cli)
app.command("show")(show_cli)
app.command("rm")(rm_cli)
app.command("mv")(mv_cli)
app.command("verify")(verify_cli)
app.command("import")(import_cli)
app.command("import-base")(import_base_cli)
app.command("export")(export_cli)
app.command("merge")(merge_cli)
app.command("trim")(trim_cli)
app.command("ensemble-vote")(ensemble_vote_cli)
app.command("identify-attack", no_args_is_help=True)(identify_cli)
app.command("fit-identifier")(fit_identifier_cli)


@functools.cache
def _click_command() -> typer.core.TyperGroup:
    """The Click command tree, built once: Typer builds it from the annotations on every call otherwise."""
    return typer.main.get_command(app)


def run(args: list[str] | None = None) -> int:
    """Run the CLI on `args` and return the exit code; Click's usage errors become one stderr line too."""
    command = _click_command()
    try:
        result = command.main(args=args, prog_name="loradar", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        forget_interrupt()
        console.print("[bold red]interrupted:[/] no partial file was left behind", highlight=False)
        return 130
    except click.ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `loradar` alone: the help, as Click prints it
            console.print(err.format_message(), highlight=False, markup=False)
            return err.exit_code
        where = f" (see: {err.ctx.command_path} --help)" if getattr(err, "ctx", None) is not None else ""
        message = " ".join(err.format_message().split())
        console.print(f"[bold red]error:[/] {message}{where}", highlight=False, soft_wrap=True)
        return err.exit_code
    return result if isinstance(result, int) else 0


def main() -> None:
    """The `loradar` script: exit with `run`'s code; a Ctrl-C outside any command is one line and 130 too."""
    remember_interrupts()
    try:
        code = run()
    except KeyboardInterrupt:
        forget_interrupt()
        console.print("[bold red]interrupted:[/] no partial file was left behind", highlight=False)
        code = 130
    if _in_process_group():
        from loradar_cli.distributed import end_job

        end_job(code)
    sys.exit(code)


def _in_process_group() -> bool:
    """Whether this process joined a torchrun process group (checked without importing torch for other commands)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
