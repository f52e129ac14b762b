"""`loradar train`: train an attack-specialised LoRA adapter on a frozen base."""

from typing import Annotated, Any

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
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StepsOpt,
    StoreOpt,
    attack_options,
    console,
    open_store,
    parse_value,
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
from loradar_cli.cli._options import non_blank, positive
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import kv_table

RecipeOptOpt = Annotated[
    list[str] | None,
    typer.Option("--recipe-opt", help="Recipe option KEY=VALUE (e.g. beta=6 for trades); repeatable."),
]


@run_command
def train_cli(
    base: Annotated[str, typer.Option("--base", help="Base model in the store.")],
    attack: Annotated[
        str, typer.Option("--attack", help=f"Attack to specialise against: {names.choices(names.ATTACKS)}.")
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the new adapter.")],
    data: DataOpt = "digits",
    recipe: Annotated[
        str, typer.Option("--recipe", help=f"Training recipe: {names.choices(names.RECIPES)}.")
    ] = "loradar",
    recipe_opt: RecipeOptOpt = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="Train one adapter per value of an attack option, e.g. 'eps=1/255,2/255,4/255,8/255' "
            "(alpha = eps/4 unless given); --name then names the pool.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run of the same command from its last epoch.")
    ] = False,
    eps: EpsOpt = None,
    alpha: AlphaOpt = None,
    steps: StepsOpt = None,
    attack_opt: AttackOptOpt = None,
    static_attack: Annotated[
        bool, typer.Option("--static-attack", help="Craft attacks once against the base.")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    lr: Annotated[float, typer.Option("--lr", callback=positive)] = 1e-3,
    step_size: Annotated[int, typer.Option("--step-size", min=1, help="StepLR period in epochs.")] = 10,
    batch_size: BatchOpt = 128,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1)] = 4,
    lora_alpha: Annotated[
        float | None, typer.Option("--lora-alpha", callback=positive, help="Default: the rank (scale 1).")
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets",
            callback=non_blank,
            help=f"Preset ({names.choices(names.TARGET_PRESETS)}), regex or comma list of module suffixes.",
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

    from loradar_cli.cli._common import parse_key_values
    from loradar_cli.errors import InvalidValueError, validation_message
    from loradar_cli.jobs.train import train_and_store_adapter
    from loradar_cli.recipes.loop import TrainConfig

    try:
        config = TrainConfig(
            recipe=recipe,
            recipe_options=parse_key_values(recipe_opt, "--recipe-opt"),
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
        raise InvalidValueError(f"invalid training option: {validation_message(err, first=True)}") from None
    options = attack_options([attack], eps, alpha, steps, attack_opt)[attack]
    launch_nproc(nproc)
    engine = engine_from(device, precision, channels_last, workers)
    main = engine.world.is_main
    if pool is not None:
        _train_pool_cli(
            name,
            pool,
            options,
            store,
            overwrite,
            json_out,
            quiet,
            **{
                "base": base,
                "attack": attack,
                "data": data,
                "config": config,
                "r": rank,
                "lora_alpha": lora_alpha,
                "targets": targets,
                "train_head": train_head,
                "limit": limit,
                "val_limit": val_limit,
                "resume": resume,
                "engine": engine,
                "augment": augment,
            },
        )
        return
    with progress_bar(not quiet and main) as progress:
        meta = train_and_store_adapter(
            open_store(store),
            name,
            base=base,
            attack=attack,
            data=data,
            attack_options=options,
            config=config,
            resume=resume,
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
    show_result(
        json_out, meta.model_dump(mode="json"), quiet=quiet, human=lambda: _summary(meta, attack), result=meta.name
    )


def _summary(meta: Any, attack: str) -> None:
    """The trained result's table on stderr: what was stored, its best epoch, validation accuracies, the run."""
    is_base = not hasattr(meta, "lora")  # recipes whose result is a full model (autolora) store a base
    run = (meta.origin if is_base else meta.combination).get("run", {})
    console.print(
        kv_table(
            f"{'base' if is_base else 'adapter'} {meta.name}",
            {
                "stored as": "a base (use it with --base)" if is_base else "an adapter",
                "attack": attack,
                "layers": "all (full model)" if is_base else len(meta.lora.targets),
                "best epoch": int(meta.metrics["best_epoch"]),
                "val clean acc": meta.metrics["val_clean_acc"],
                "val robust acc": meta.metrics["val_robust_acc"],
                "augment": run.get("augment"),
                "device": run.get("device"),
                "images/s": run.get("images_per_s"),
            },
        )
    )


def _train_pool_cli(
    name: str, pool: str, options: dict, store: Any, overwrite: bool, json_out: bool, quiet: bool, **kwargs: Any
) -> None:
    """`--pool KEY=V1,V2,...`: train the members, write the manifest, print the pool."""
    from loradar_cli.jobs.train import train_pool

    key, values = parse_pool(pool)
    with progress_bar(not quiet) as progress:
        manifest, members = train_pool(
            open_store(store),
            name,
            key,
            values,
            attack_options=options,
            overwrite=overwrite,
            progress=progress,
            **kwargs,
        )

    def human() -> None:
        rows = {
            f"{m.name} ({key}={v})": f"val clean {m.metrics['val_clean_acc']:.3f}, robust "
            f"{m.metrics['val_robust_acc']:.3f}"
            for m, v in zip(members, manifest.values, strict=True)
        }
        console.print(kv_table(f"pool {manifest.name}", rows))

    show_result(
        json_out,
        {"pool": manifest.model_dump(mode="json"), "members": [m.model_dump(mode="json") for m in members]},
        quiet=quiet,
        human=human,
        result=manifest.name,
    )


def parse_pool(spec: str) -> tuple[str, list[tuple[str, Any]]]:
    """'eps=1/255,2/255' -> ('eps', [('1/255', 1/255), ('2/255', 2/255)]): the varied attack option and values."""
    from loradar_cli.errors import InvalidValueError

    key, sep, values = spec.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise InvalidValueError(f"--pool expects KEY=V1,V2,... (e.g. eps=1/255,2/255), got {spec!r}")
    return key.strip().replace("-", "_"), [(text, parse_value(text)) for text in items]
