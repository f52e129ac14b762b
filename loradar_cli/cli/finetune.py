"""`loradar finetune`: fit a timm base on clean data and store it."""

from pathlib import Path
from typing import Annotated

import typer

from loradar_cli.cli._common import (
    BatchOpt,
    DataOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    open_store,
    parse_key_values,
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
from loradar_cli.cli._options import positive
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import kv_table

MAX_IMG_SIZE = 8192  # a side beyond this is a typo, not an image a CPU or one GPU can hold in batches


@run_command
def finetune_cli(
    name: Annotated[str, typer.Option("--name", help="Name of the base in the store.")],
    model: Annotated[str, typer.Option("--model", help="timm model name, e.g. resnet18, test_resnet.")] = "test_resnet",
    data: DataOpt = "digits",
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="0 stores the (checkpoint) weights unfitted.")] = 5,
    lr: Annotated[float, typer.Option("--lr", callback=positive)] = 2e-3,
    batch_size: BatchOpt = 128,
    head_only: Annotated[bool, typer.Option("--head-only", help="Train only the classifier head.")] = False,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Start from timm's pretrained weights (online).")
    ] = False,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Start from weights (.safetensors, .pt).")
    ] = None,
    model_kwarg: Annotated[
        list[str] | None, typer.Option("--model-kwarg", help="timm kwarg KEY=VALUE, e.g. img_size=32.")
    ] = None,
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            min=1,
            max=MAX_IMG_SIZE,
            help="Input size (image folders: resize + centre crop; default: the model's).",
        ),
    ] = None,
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", min=1, help="Input channels (default: the data's).")
    ] = None,
    download: Annotated[bool, typer.Option("--download", help="Download the dataset first (online).")] = False,
    augment: AugmentOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = 0,
    nproc: NprocOpt = 1,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run of the same command from its last epoch.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a base model on clean data and store it (weights, timm name and kwargs, mean/std, fingerprint)."""
    from loradar_cli.jobs.finetune import finetune_base
    from loradar_cli.models import check_model_kwargs

    model_kwargs = check_model_kwargs(parse_key_values(model_kwarg, "--model-kwarg"))

    launch_nproc(nproc)
    engine = engine_from(device, precision, channels_last, workers)
    main = engine.world.is_main
    with progress_bar(not quiet and main) as progress:
        meta = finetune_base(
            open_store(store),
            name,
            model=model,
            data=data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            head_only=head_only,
            pretrained=pretrained,
            checkpoint=checkpoint,
            model_kwargs=model_kwargs,
            img_size=img_size,
            in_chans=in_chans,
            limit=limit,
            seed=seed,
            download=download,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            engine=engine,
            augment=augment,
        )
    if not main:
        return
    rows = {
        "model": meta.timm_model,
        "input": meta.input_size,
        "val clean acc": meta.metrics["val_clean_acc"],
        "augment": meta.training.get("augment"),
        "device": meta.training.get("device"),
        "images/s": meta.training.get("images_per_s"),
    }
    show_result(
        json_out,
        meta.model_dump(mode="json"),
        quiet=quiet,
        human=lambda: console.print(kv_table(f"base {meta.name}", rows)),
        result=meta.name,
    )
