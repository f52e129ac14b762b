"""`loradar train`: train an attack-specialised LoRA adapter on a frozen base."""

from typing import Annotated

import typer

from loradar_cli.cli._common import (
    AlphaOpt,
    AttackOptOpt,
    BatchOpt,
    DataOpt,
    EpsOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StepsOpt,
    StoreOpt,
    attack_options,
    console,
    emit_json,
    open_store,
    progress_bar,
    run_command,
)
from loradar_cli.cli._engine_options import (
    AugmentOpt,
    ChannelsLastOpt,
    DeviceOpt,
    NprocOpt,
    PrecisionOpt,
    WorkersOpt,
    engine_from,
    launch_nproc,
)
from loradar_cli.cli._tables import kv_table


@run_command
def train_cli(
    base: Annotated[str, typer.Option("--base", help="Base model in the store.")],
    attack: Annotated[str, typer.Option("--attack", help="Attack to specialise against: fgsm, pgd, pgd-l2, roa, fia.")],
    name: Annotated[str, typer.Option("--name", help="Name of the new adapter.")],
    data: DataOpt = "digits",
    recipe: Annotated[str, typer.Option("--recipe", help="loradar (clean + adversarial batch) or pgd-at.")] = "loradar",
    eps: EpsOpt = None,
    alpha: AlphaOpt = None,
    steps: StepsOpt = None,
    attack_opt: AttackOptOpt = None,
    static_attack: Annotated[
        bool, typer.Option("--static-attack", help="Craft attacks once against the base.")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    step_size: Annotated[int, typer.Option("--step-size", min=1, help="StepLR period in epochs.")] = 10,
    batch_size: BatchOpt = 128,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1)] = 4,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="Default: the rank (scale 1).")] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets", help="Preset (block-conv1, convs, attn-mlp, all), regex or comma list of module suffixes."
        ),
    ] = None,
    train_head: Annotated[bool, typer.Option("--train-head/--frozen-head")] = True,
    select: Annotated[str, typer.Option("--select", help="Keep the best epoch by robust, clean, or last.")] = "robust",
    min_clean: Annotated[
        float,
        typer.Option(
            "--min-clean",
            min=0.0,
            max=1.0,
            help="With --select robust, prefer epochs whose val clean accuracy is at least this "
            "(e.g. 0.8): a near-constant predictor can look robust.",
        ),
    ] = 0.0,
    augment: AugmentOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = 0,
    nproc: NprocOpt = 1,
    limit: LimitOpt = None,
    val_limit: Annotated[int, typer.Option("--val-limit", min=1)] = 512,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a LoRA adapter against one attack (adaptive by default) and store it in PEFT's format."""
    from pydantic import ValidationError

    from loradar_cli.errors import InvalidValueError
    from loradar_cli.jobs.train import train_and_store_adapter
    from loradar_cli.recipes.loop import TrainConfig

    try:
        config = TrainConfig(
            recipe=recipe,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            step_size=step_size,
            static_attack=static_attack,
            select=select,
            min_clean=min_clean,
            seed=seed,
        )
    except ValidationError as err:
        raise InvalidValueError(
            f"invalid training option: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}"
        ) from None
    options = attack_options([attack], eps, alpha, steps, attack_opt)[attack]
    launch_nproc(nproc)
    engine = engine_from(device, precision, channels_last, workers)
    main = engine.world.is_main
    with progress_bar(not quiet and main) as progress:
        meta = train_and_store_adapter(
            open_store(store),
            name,
            base=base,
            attack=attack,
            data=data,
            attack_options=options,
            config=config,
            r=rank,
            lora_alpha=lora_alpha,
            targets=targets,
            train_head=train_head,
            limit=limit,
            val_limit=val_limit,
            overwrite=overwrite,
            progress=progress,
            engine=engine,
            augment=augment,
        )
    if not main:
        return
    if json_out:
        emit_json(meta.model_dump(mode="json"))
        return
    if not quiet:
        console.print(
            kv_table(
                f"adapter {meta.name}",
                {
                    "attack": meta.attack,
                    "layers": len(meta.lora.targets),
                    "best epoch": int(meta.metrics["best_epoch"]),
                    "val clean acc": meta.metrics["val_clean_acc"],
                    "val robust acc": meta.metrics["val_robust_acc"],
                    "augment": meta.combination["run"]["augment"],
                    "device": meta.combination["run"]["device"],
                    "images/s": meta.combination["run"]["images_per_s"],
                },
            )
        )
    print(meta.name)
