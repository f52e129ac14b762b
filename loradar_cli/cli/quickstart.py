"""`loradar quickstart`: the whole job on scikit-learn's bundled digits, offline."""

import time
from typing import Annotated

import typer

from loradar_cli.cli._common import (
    JsonOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    open_store,
    progress_bar,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, WorkersOpt, engine_from
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import eval_table


@run_command
def quickstart_cli(
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Adapter training epochs.")] = 4,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Test images to evaluate.")] = 200,
    device: DeviceOpt = None,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a small timm base on digits, train PGD/ROA/FIA adapters, print the robustness matrix."""
    from loradar_cli.jobs.quickstart import run_quickstart

    start = time.perf_counter()
    the_store = open_store(store)
    engine = engine_from(device, workers=workers)
    with progress_bar(not quiet) as progress:
        report = run_quickstart(
            the_store, epochs=epochs, eval_limit=eval_limit, seed=seed, progress=progress, engine=engine
        )
    elapsed = time.perf_counter() - start

    def human() -> None:
        console.print(eval_table(report.rows, title=f"digits test accuracy (%), n={report.rows[0].n}"))
        console.print(f"done in {elapsed:.0f} s; adapters in {the_store.root}: {', '.join(report.adapters)}")

    show_result(
        json_out,
        {**report.model_dump(), "seconds": elapsed, "store": str(the_store.root), "run": engine.describe()},
        human=human,
    )
