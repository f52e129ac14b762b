"""`loradar merge`: merge adapters of one base in ΔW space (tts, linear, ties, cat) into a new adapter."""

from typing import Annotated

import typer

from loradar_cli import names
from loradar_cli.cli._combine import BaseOpt, parse_weights
from loradar_cli.cli._common import (
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from
from loradar_cli.cli._options import fraction, non_negative, unit_interval
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import layers_table, weights_table


@run_command
def merge_cli(
    adapters: Annotated[
        list[str], typer.Argument(help="Adapters or pools (pool:NAME) to merge ('-' reads names from stdin).")
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the merged adapter.")],
    method: Annotated[
        str,
        typer.Option(
            "--method", help=f"{names.choices(names.MERGE_METHODS)} (tts: AMT test-time scores on --support)."
        ),
    ] = "linear",
    base: BaseOpt = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="One weight per adapter, e.g. 0.5,0.5 (default: 1/K each; ties: 1 each)."),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            help="Keep at most R singular triplets per layer (default: exact, at most the sum of ranks).",
        ),
    ] = None,
    density: Annotated[
        float, typer.Option("--density", callback=fraction, help="ties: fraction of each ΔW's entries kept.")
    ] = 0.2,
    support: Annotated[
        str | None,
        typer.Option(
            "--support",
            help="tts: labelled support set, a data spec (digits, mnist:DIR, ...) or an adversarial-set file.",
        ),
    ] = None,
    support_split: Annotated[str, typer.Option("--support-split", help="tts: split of a data-spec support.")] = "val",
    shots: Annotated[int, typer.Option("--shots", min=1, help="tts: support examples per class.")] = 5,
    lam: Annotated[
        float, typer.Option("--lam", callback=unit_interval, help="tts: score = lam·C − (1 − lam)·V.")
    ] = 0.6,
    beta: Annotated[
        float, typer.Option("--beta", callback=non_negative, help="tts: weight = exp(−beta·(1 − score)).")
    ] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="tts: keep the k best-scored adapters.")] = 2,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="tts: score on an augmented copy of the support (AMT).")
    ] = True,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge adapters into one: Σ wᵢ·ΔWᵢ per layer, re-factored by SVD; weights [1, 0, …] give the first back."""
    from loradar_cli.device import using
    from loradar_cli.jobs.merge import TTSOptions, merge_adapters
    from loradar_cli.store.pools import expand_pools

    tts = (
        TTSOptions(
            support=support,
            split=support_split,
            shots=shots,
            lam=lam,
            beta=beta,
            top_k=top_k,
            augment=augment,
            seed=seed,
        )
        if support
        else None
    )
    the_store = open_store(store)
    with using(engine_from(device)) as engine:  # the device scores tts members; the other methods are weight arithmetic
        meta, report = merge_adapters(
            the_store,
            expand_pools(the_store, read_names(adapters)),
            name=name,
            base=base,
            method=method,
            weights=parse_weights(weights),
            rank=rank,
            density=density,
            tts=tts,
            overwrite=overwrite,
        )

    def human() -> None:
        console.print(weights_table(report.model_dump()))
        console.print(layers_table(f"layers of {meta.name}", report.layers))

    show_result(
        json_out,
        {**report.model_dump(mode="json"), "run": engine.describe()},
        quiet=quiet,
        human=human,
        result=meta.name,
    )
