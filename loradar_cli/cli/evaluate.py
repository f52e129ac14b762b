"""`loradar eval`: clean, white-box robust and saved-set accuracy, with the per-point worst case."""

import time
from pathlib import Path
from typing import Annotated

import typer

from loradar_cli.cli._combine import IdentifierOpt, WeightsOpt, parse_weights
from loradar_cli.cli._common import (
    AlphaOpt,
    AttackOptOpt,
    BatchOpt,
    DataOpt,
    EpsOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    SeedOpt,
    StepsOpt,
    StoreOpt,
    attack_options,
    console,
    emit_json,
    open_store,
    progress_bar,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import (
    ChannelsLastOpt,
    DeviceOpt,
    EvalPrecisionOpt,
    NprocOpt,
    WorkersOpt,
    engine_from,
    launch_nproc,
)
from loradar_cli.cli._tables import eval_table
from loradar_cli.errors import InvalidValueError


@run_command
def eval_cli(
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the adapters' base).")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Adapter to evaluate ('-' reads stdin); repeatable.")
    ] = None,
    attack: Annotated[list[str] | None, typer.Option("--attack", help="White-box attack; repeatable.")] = None,
    adv_set: Annotated[list[Path] | None, typer.Option("--adv-set", help="Saved adversarial set; repeatable.")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip the base row when adapters are given.")] = False,
    vote: Annotated[
        list[str] | None,
        typer.Option("--vote", help="Add an ensemble row: majority, weighted or soft vote of --members; repeatable."),
    ] = None,
    route: Annotated[bool, typer.Option("--route", help="Add an identify-then-route row over --members.")] = False,
    members: Annotated[
        list[str] | None,
        typer.Option(
            "--members",
            help="Ensemble members, comma-separated or repeated (default: the --adapter list). "
            "Ensemble rows are attacked through the mean of their logits.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    identifier: IdentifierOpt = None,
    data: DataOpt = "digits",
    split: Annotated[str, typer.Option("--split")] = "test",
    eps: EpsOpt = None,
    alpha: AlphaOpt = None,
    steps: StepsOpt = None,
    attack_opt: AttackOptOpt = None,
    device: DeviceOpt = None,
    precision: EvalPrecisionOpt = "fp32",
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = 0,
    nproc: NprocOpt = 1,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate the base, adapters and ensembles on clean data, under attacks, and on saved adversarial sets."""
    from loradar_cli.jobs.evaluate import EnsembleRows, evaluate_models
    from loradar_cli.loading import resolve_base_for

    the_store = open_store(store)
    adapters = read_names(adapter) if adapter else []
    voters = [n.strip() for item in members or [] for n in item.split(",") if n.strip()] or adapters
    methods = [*dict.fromkeys(vote or []), *(["route"] if route else [])]
    if members and not methods:
        raise InvalidValueError("--members needs --vote METHOD or --route")
    ensemble = EnsembleRows(voters, methods, parse_weights(weights), identifier) if methods else None
    if ensemble is not None and not voters:
        raise InvalidValueError("ensemble rows need --members (or --adapter) names")
    base_name = resolve_base_for(the_store, adapters or voters, base)
    names = list(dict.fromkeys(attack or []))
    options = attack_options(names, eps, alpha, steps, attack_opt)
    rows_for = ([] if no_base and (adapters or ensemble) else [None]) + adapters
    launch_nproc(nproc)
    engine = engine_from(device, precision, channels_last, workers)
    main = engine.world.is_main
    start = time.perf_counter()
    with progress_bar(not quiet and main) as progress:
        rows = evaluate_models(
            the_store,
            base=base_name,
            adapters=rows_for,
            data=data,
            attacks=options,
            adv_sets=adv_set or [],
            split=split,
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            ensemble=ensemble,
            progress=progress,
            engine=engine,
        )
    if not main:
        return
    run = engine.record(time.perf_counter() - start, rows[0].n * len(rows))
    if not quiet:
        console.print(eval_table(rows, title=f"accuracy (%) on {data} {split}, n={rows[0].n}"))
    if json_out:
        emit_json(
            {
                "base": base_name,
                "data": data,
                "split": split,
                "limit": limit,
                "seed": seed,
                "attacks": options,
                "members": voters if ensemble else None,
                "rows": [r.model_dump() for r in rows],
                "run": run,
            }
        )
