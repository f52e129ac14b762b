"""`loradar attack`: write adversarial examples of a data split to a safetensors file."""

from pathlib import Path
from typing import Annotated

import typer

from loradar_cli import names
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


@run_command
def attack_cli(
    base: Annotated[str, typer.Option("--base", help="Base model in the store.")],
    attack: Annotated[str, typer.Option("--attack", help=f"Attack: {names.choices(names.ATTACKS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Attack the base with this adapter applied.")] = None,
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
