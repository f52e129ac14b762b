"""`loradar trim`: singular-value trimming of an adapter's ΔW, or AMT's trim of the full weight W0 + ΔW."""

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from loradar_cli.cli._combine import BaseOpt, OptDataOpt, SplitOpt
from loradar_cli.cli._common import (
    BatchOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    QuietOpt,
    StoreOpt,
    console,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from
from loradar_cli.cli._options import fraction, regex
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import kv_table, layers_table


@run_command
def trim_cli(
    adapter: Annotated[str, typer.Argument(help="Adapter to trim ('-' reads its name from stdin).")],
    name: Annotated[str, typer.Option("--name", help="Name of the trimmed adapter.")],
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="Keep the top R triplets of each ΔW.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy", callback=fraction, help="Keep the fewest triplets holding this fraction of each ΔW's Σσ²."
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
        float, typer.Option("--keep", callback=fraction, help="--full-weight: fraction p of min(d_out, d_in) kept.")
    ] = 0.7,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            callback=regex,
            help="--full-weight: regex (searched in the layer name) choosing the layers; default all.",
        ),
    ] = None,
    base: BaseOpt = None,
    data: OptDataOpt = None,
    split: SplitOpt = "test",
    limit: LimitOpt = 256,
    batch_size: BatchOpt = 128,
    device: DeviceOpt = None,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trim an adapter by singular values into a new (smaller) adapter; reports kept rank and energy per layer."""
    from loradar_cli.device import using
    from loradar_cli.errors import InvalidValueError
    from loradar_cli.jobs.trim import trim_adapter

    names = read_names([adapter])
    if len(names) != 1:
        raise InvalidValueError(f"trim takes one adapter, got {len(names)}: {', '.join(names[:4])}")
    the_store = open_store(store)
    with using(engine_from(device)) as engine:  # --full-weight's SVDs and the accuracy checks run on the device
        check = _Accuracy(the_store, names[0], data, split, limit, batch_size) if data else None
        before = check.of(names[0]) if check else None  # first: bad --data fails before anything is written
        meta, report = trim_adapter(
            the_store,
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
        result = report.model_dump(mode="json")
        if check and before is not None:
            result["accuracy"] = {"before": before, "after": check.of(meta.name), **check.describe()}
    result["energy_kept"] = energy_kept(report.layers)

    def human() -> None:
        console.print(layers_table(f"{names[0]} trimmed → {meta.name}", report.layers))
        kept = result["energy_kept"]
        console.print(
            f"energy kept: {kept['mean']:.1%} on average, {kept['min']:.1%} at least ({kept['layers']} layers)"
        )
        if "accuracy" in result:
            console.print(kv_table(f"accuracy before → after on {data} {split}", _before_after(result["accuracy"])))
        if meta.dense_deltas:
            console.print(f"{len(meta.dense_deltas)} layer(s) stored as dense deltas: not loadable by PEFT")

    show_result(json_out, {**result, "run": engine.describe()}, quiet=quiet, human=human, result=meta.name)


def energy_kept(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean and minimum over layers of the fraction of Σσ² kept (what a user weighs against the rank saved)."""
    values = [float(info["energy"]) for info in layers.values()]
    return {"mean": sum(values) / len(values), "min": min(values), "layers": len(values)} if values else {}


class _Accuracy:
    """Clean and robust accuracy of adapters on one data split; robust under the parent's own stored attack."""

    def __init__(self, store: Any, parent: str, data: str, split: str, limit: int | None, batch_size: int) -> None:
        meta = store.adapter_meta(parent)
        config = (meta.attack_config or {}).get("config", {})
        self.attacks = {meta.attack: {k: v for k, v in config.items() if v is not None}} if meta.attack else {}
        self.store, self.base, self.data, self.split, self.limit = store, meta.base, data, split, limit
        self.batch_size = batch_size

    def of(self, adapter: str) -> dict[str, float | None]:
        from loradar_cli.jobs.evaluate import evaluate_models

        (row,) = evaluate_models(
            self.store,
            base=self.base,
            adapters=[adapter],
            data=self.data,
            attacks=self.attacks,
            split=self.split,
            limit=self.limit,
            batch_size=self.batch_size,
        )
        return {"clean": row.clean, "robust": next(iter(row.attacks.values()), None), "n": row.n}

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "split": self.split, "limit": self.limit, "attack": self.attacks or None}


def _before_after(accuracy: Mapping[str, Any]) -> dict[str, str]:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f} %"

    before, after = accuracy["before"], accuracy["after"]
    attack = next(iter(accuracy["attack"] or {}), None)
    rows = {"clean": f"{pct(before['clean'])} → {pct(after['clean'])}"}
    if attack:
        rows[f"robust ({attack}, the adapter's own attack)"] = f"{pct(before['robust'])} → {pct(after['robust'])}"
    return rows
