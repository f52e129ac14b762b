"""`loradar identify-attack`: which attack family each input came from (`fit` learns the calibrated identifier)."""

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from loradar_cli.cli._combine import (
    AdvSetsOpt,
    BaseOpt,
    OptDataOpt,
    OutOpt,
    SplitOpt,
    check_plot_available,
    confusion_table,
    identify_table,
    plot_confusion,
)
from loradar_cli.cli._common import (
    BatchOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    emit_json,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from

DEFAULT_COMMAND = "predict"


class DefaultToPredict(TyperGroup):
    """A group whose default command is `predict`: `identify-attack A B` runs `identify-attack predict A B`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


identify_app = typer.Typer(
    cls=DefaultToPredict,
    help="Identify the attack family of each input from the adapters' outputs: `identify-attack A B C ...` "
    "(predict, the default) or `identify-attack fit A B C ...`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

CleanOpt = Annotated[
    str,
    typer.Option("--clean", help="The 'clean' member: base (the base model), none, or an adapter name (rule mode)."),
]


@identify_app.command(DEFAULT_COMMAND)
@run_command
def identify_cli(
    adapters: Annotated[
        list[str] | None,
        typer.Argument(
            help="Attack-specific adapters ('-' reads stdin); calibrated mode defaults to the identifier's."
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option("--mode", help="rule (most confident adapter, with a margin) or calibrated (needs --identifier)."),
    ] = "rule",
    identifier: Annotated[str | None, typer.Option("--identifier", help="Fitted identifier (calibrated mode).")] = None,
    margin: Annotated[
        float,
        typer.Option(
            "--margin", min=0.0, help="rule: lead over the runner-up needed to name an attack, else 'unknown'."
        ),
    ] = 0.1,
    clean: CleanOpt = "base",
    base: BaseOpt = None,
    data: OptDataOpt = None,
    split: SplitOpt = "test",
    adv_set: AdvSetsOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the confusion matrix to FILE.png (needs matplotlib).")
    ] = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict the attack family of each input; with labelled sets, report accuracy and the confusion matrix."""
    from loradar_cli.combine import identify_sets
    from loradar_cli.device import using

    check_plot_available(plot)
    names = read_names(adapters) if adapters else []
    with using(engine_from(device)) as engine:
        report = identify_sets(
            open_store(store),
            names,
            base=base,
            mode=mode,
            identifier=identifier,
            margin=margin,
            clean=clean,
            data=data,
            split=split,
            adv_sets=adv_set or [],
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            out=out,
        )
    confusion = report["confusion"]
    if plot is not None and confusion:
        plot_confusion(plot, confusion["labels"], confusion["matrix"], f"attack identification ({mode})")
    if json_out:
        emit_json({**report, "run": engine.describe()})
    elif not quiet:
        console.print(identify_table(report))
        if confusion:
            console.print(confusion_table(confusion["labels"], confusion["matrix"], report["accuracy"]))


@identify_app.command("fit")
@run_command
def identify_fit_cli(
    adapters: Annotated[list[str], typer.Argument(help="Attack-specific adapters ('-' reads stdin).")],
    name: Annotated[str, typer.Option("--name", help="Name of the identifier (stored under identifiers/).")],
    adv_set: AdvSetsOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Clean training inputs (labelled 'clean').")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data.")] = "val",
    clean: Annotated[
        str, typer.Option("--clean", help="base: add the base model's outputs as features; none.")
    ] = "base",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Full-batch optimiser steps.")] = 300,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 0.05,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 1e-3,
    base: BaseOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit the calibrated identifier on adversarial sets labelled by their attack (and clean data) and store it."""
    from loradar_cli.combine import fit_identifier_from_sets
    from loradar_cli.device import using

    with using(engine_from(device)) as engine:
        _, report = fit_identifier_from_sets(
            open_store(store),
            read_names(adapters),
            name=name,
            adv_sets=adv_set or [],
            base=base,
            data=data,
            split=split,
            limit=limit,
            clean=clean,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    if json_out:
        emit_json({**report, "run": engine.describe()})
        return
    if not quiet and report["confusion"]:
        confusion = report["confusion"]
        console.print(confusion_table(confusion["labels"], confusion["matrix"], report["accuracy"]))
    print(name)
