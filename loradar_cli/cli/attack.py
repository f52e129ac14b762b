"""`loradar attack`: write adversarial examples of a data split to a safetensors file."""

from pathlib import Path
from typing import Annotated

import typer

from loradar_cli import names
from loradar_cli.cli._combine import IdentifierOpt
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
    open_store,
    progress_bar,
    run_command,
)
from loradar_cli.cli._engine_options import (
    DeviceOpt,
    NprocOpt,
    WorkersOpt,
    engine_from,
    launch_nproc,
)
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import kv_table
from loradar_cli.errors import InvalidValueError


@run_command
def attack_cli(
    base: Annotated[str, typer.Option("--base", help="Base model in the store.")],
    attack: Annotated[str, typer.Option("--attack", help=f"Attack: {names.choices(names.ATTACKS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Attack the base with this adapter applied.")] = None,
    members: Annotated[
        str | None,
        typer.Option("--members", help="Attack the decision of an ensemble of these adapters (comma-separated)."),
    ] = None,
    decision: Annotated[
        str, typer.Option("--decision", help=f"The ensemble's decision: {names.choices(names.ENSEMBLE_METHODS)}.")
    ] = "soft",
    identifier: IdentifierOpt = None,
    evade_identifier: Annotated[
        str | None,
        typer.Option(
            "--evade-identifier",
            help="Adaptive attacker: also lower this identifier's probability of the attack's family.",
        ),
    ] = None,
    evade_weight: Annotated[
        float, typer.Option("--evade-weight", min=0.0, help="Weight of the identifier term against the loss.")
    ] = 1.0,
    data: DataOpt = "digits",
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    eps: EpsOpt = None,
    alpha: AlphaOpt = None,
    steps: StepsOpt = None,
    attack_opt: AttackOptOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = 0,
    nproc: NprocOpt = 1,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Craft adversarial examples against base (+ adapter) and save them with the attack's full config."""
    from loradar_cli.jobs.attack import craft_adv_set
    from loradar_cli.jobs.attack_target import EnsembleSpec, EvasionSpec

    voters = [n.strip() for n in (members or "").split(",") if n.strip()]
    if decision not in names.ENSEMBLE_METHODS:
        raise InvalidValueError(f"unknown --decision {decision!r}; valid: {', '.join(names.ENSEMBLE_METHODS)}")
    if identifier and not voters:
        raise InvalidValueError("--identifier is route's router: give --members and --decision route")
    ensemble = EnsembleSpec(voters, decision, identifier) if voters else None
    evade = EvasionSpec(evade_identifier, attack, evade_weight) if evade_identifier else None
    options = attack_options([attack], eps, alpha, steps, attack_opt)[attack]
    launch_nproc(nproc)
    engine = engine_from(device, workers=workers)
    main = engine.world.is_main
    with progress_bar(not quiet and main) as progress:
        adv, acc = craft_adv_set(
            open_store(store),
            out,
            base=base,
            attack=attack,
            data=data,
            adapter=adapter,
            attack_options=options,
            split=split,
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            engine=engine,
            ensemble=ensemble,
            evade=evade,
        )
    if not main:
        return
    summary = {"out": str(out), "n": len(adv.y), "attack": attack, "target_accuracy": acc, **adv.info}
    show_result(
        json_out,
        summary,
        quiet=quiet,
        human=lambda: console.print(kv_table(f"{attack} → {out}", {"examples": len(adv.y), "target accuracy": acc})),
        result=str(out),
    )
