"""`loradar import` (a bundle or a PEFT LoRA folder) and `loradar import-base` (a checkpoint fitted elsewhere)."""

from pathlib import Path
from typing import Annotated

import typer

from loradar_cli.cli._common import (
    JsonOpt,
    OverwriteOpt,
    StoreOpt,
    console,
    open_store,
    parse_key_values,
    run_command,
)
from loradar_cli.cli._output import show_result
from loradar_cli.errors import InvalidValueError


@run_command
def import_cli(
    path: Annotated[Path, typer.Argument(help="A bundle (.tar, .tar.gz, .zip) or a PEFT LoRA folder.")],
    base: Annotated[str | None, typer.Option("--base", help="PEFT folder: the base it was trained on.")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="PEFT folder: adapter name (default: folder name).")
    ] = None,
    attack: Annotated[
        str | None, typer.Option("--attack", help="PEFT folder: the attack it is specialised to, if known.")
    ] = None,
    overwrite: OverwriteOpt = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Import a bundle (every hash and the base fingerprint checked first) or a PEFT LoRA folder (checked
    against the base: target modules, shapes, rank/alpha patterns, head)."""
    from loradar_cli.jobs.import_ import import_bundle, import_peft

    the_store = open_store(store)
    if path.is_dir():
        if base is None:
            raise InvalidValueError("importing a PEFT folder needs --base (the base it was trained on)")
        meta = import_peft(the_store, path, base=base, name=name, attack=attack, overwrite=overwrite)
        show_result(
            json_out,
            meta.model_dump(mode="json"),
            human=lambda: console.print(f"imported adapter {meta.name} on base {meta.base}", highlight=False),
            result=meta.name,
        )
        return
    if base or name or attack:
        raise InvalidValueError("--base, --name and --attack apply to PEFT folders; a bundle carries its own")
    report = import_bundle(the_store, path, overwrite=overwrite)

    def human() -> None:
        for entry in report.imported:
            console.print(f"imported {entry}", highlight=False)
        for entry in report.skipped:
            console.print(f"already present, identical: {entry}", highlight=False)

    show_result(json_out, report.model_dump(), human=human)


@run_command
def import_base_cli(
    checkpoint: Annotated[Path, typer.Argument(help="Weights: .safetensors, or .pt/.pth (weights_only loading).")],
    model: Annotated[str, typer.Option("--model", help="timm model name the weights belong to.")],
    name: Annotated[str, typer.Option("--name", help="Name of the base in the store.")],
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Classes of the checkpoint's head.")],
    in_chans: Annotated[int, typer.Option("--in-chans", min=1, help="Input channels.")] = 3,
    img_size: Annotated[int | None, typer.Option("--img-size", min=1, help="Input size (default: timm's).")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Per-channel mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.25,0.25,0.25.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="What it was fitted on (provenance).")] = "unknown",
    model_kwarg: Annotated[list[str] | None, typer.Option("--model-kwarg", help="timm kwarg KEY=VALUE.")] = None,
    overwrite: OverwriteOpt = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Store a timm model fitted elsewhere as a base (its weights must fit the model exactly)."""
    from loradar_cli.jobs.import_ import import_base

    meta = import_base(
        open_store(store),
        checkpoint,
        model=model,
        name=name,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        dataset=dataset,
        model_kwargs=parse_key_values(model_kwarg, "--model-kwarg"),
        overwrite=overwrite,
    )
    show_result(
        json_out,
        meta.model_dump(mode="json"),
        human=lambda: console.print(
            f"imported base {meta.name} ({meta.timm_model}, sha256 {meta.fingerprint[:12]})", highlight=False
        ),
        result=meta.name,
    )


def _floats(text: str | None, what: str) -> list[float] | None:
    import math

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidValueError(f"{what} expects comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InvalidValueError(f"{what} expects finite numbers, got {text!r}")
    return values
