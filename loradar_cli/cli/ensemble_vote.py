"""`loradar ensemble-vote`: majority / weighted / soft votes and identify-then-route over adapters of one base."""

from typing import Annotated

import typer

from loradar_cli import names
from loradar_cli.cli._combine import (
    AdvSetsOpt,
    BaseOpt,
    IdentifierOpt,
    OptDataOpt,
    OutOpt,
    SplitOpt,
    WeightsOpt,
    parse_weights,
)
from loradar_cli.cli._common import (
    BatchOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import vote_table


@run_command
def ensemble_vote_cli(
    adapters: Annotated[list[str], typer.Argument(help="Voting adapters ('-' reads names from stdin).")],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help=f"{names.choices(names.ENSEMBLE_METHODS)} (majority breaks ties by summed probability); "
            "repeatable [default: majority].",
        ),
    ] = None,
    weights: WeightsOpt = None,
    identifier: IdentifierOpt = None,
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Adapter (e.g. a merge) evaluated alone in the same table; repeatable."),
    ] = None,
    base: BaseOpt = None,
    data: OptDataOpt = None,
    split: SplitOpt = "test",
    adv_set: AdvSetsOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify inputs by an ensemble of adapters (each adapter's ΔW folded in once) and report accuracy per set."""
    from loradar_cli.device import using
    from loradar_cli.jobs.ensemble_vote import vote_sets

    with using(engine_from(device)) as engine:
        report = vote_sets(
            open_store(store),
            read_names(adapters),
            base=base,
            methods=method or ["majority"],
            weights=parse_weights(weights),
            data=data,
            split=split,
            adv_sets=adv_set or [],
            limit=limit,
            identifier=identifier,
            compare=compare or [],
            seed=seed,
            batch_size=batch_size,
            out=out,
        )
    result = report.model_dump(mode="json")
    show_result(
        json_out, {**result, "run": engine.describe()}, quiet=quiet, human=lambda: console.print(vote_table(result))
    )
