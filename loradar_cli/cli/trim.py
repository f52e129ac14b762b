"""`loradar trim`: singular-value trimming of an adapter's ΔW, or AMT's trim of the full weight W0 + ΔW."""

from typing import Annotated

import typer

from loradar_cli.cli._combine import BaseOpt, layers_table
from loradar_cli.cli._common import (
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    StoreOpt,
    console,
    emit_json,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from


@run_command
def trim_cli(
    adapter: Annotated[str, typer.Argument(help="Adapter to trim ('-' reads its name from stdin).")],
    name: Annotated[str, typer.Option("--name", help="Name of the trimmed adapter.")],
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="Keep the top R triplets of each ΔW.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy", min=0.0, max=1.0, help="Keep the fewest triplets holding this fraction of each ΔW's Σσ²."
        ),
    ] = None,
    full_weight: Annotated[
        bool,
        typer.Option(
            "--full-weight",
            help="AMT: trim W0 + ΔW to its top floor(keep·min(d_out, d_in)) triplets; stored as the "
            "delta to W0 (dense where it is not low-rank).",
        ),
    ] = False,
    keep: Annotated[
        float, typer.Option("--keep", min=0.0, max=1.0, help="--full-weight: fraction p of min(d_out, d_in) kept.")
    ] = 0.7,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="--full-weight: regex (searched in the layer name) choosing the layers; default all."
        ),
    ] = None,
    base: BaseOpt = None,
    device: DeviceOpt = None,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trim an adapter by singular values into a new (smaller) adapter; reports kept rank and energy per layer."""
    from loradar_cli.combine import trim_adapter
    from loradar_cli.device import using
    from loradar_cli.errors import InvalidValueError

    names = read_names([adapter])
    if len(names) != 1:
        raise InvalidValueError(f"trim takes one adapter, got {len(names)}: {', '.join(names[:4])}")
    with using(engine_from(device)) as engine:  # --full-weight's SVDs run on the device
        meta, report = trim_adapter(
            open_store(store),
            names[0],
            out_name=name,
            base=base,
            rank=rank,
            energy=energy,
            full_weight=full_weight,
            keep=keep,
            layers_regex=layers,
            overwrite=overwrite,
        )
    if json_out:
        emit_json({**report, "run": engine.describe()})
        return
    if not quiet:
        console.print(layers_table(f"{names[0]} trimmed → {meta.name}", report["layers"]))
        if meta.dense_deltas:
            console.print(f"{len(meta.dense_deltas)} layer(s) stored as dense deltas: not loadable by PEFT")
    print(meta.name)
