"""`loradar list` and `loradar show`: browse the store."""

from typing import Annotated

import typer
from rich.table import Table

from loradar_cli.cli._common import JsonOpt, StoreOpt, console, emit_json, open_store, run_command
from loradar_cli.cli._tables import pct


@run_command
def list_cli(store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """List bases and adapters in the store."""
    the_store = open_store(store)
    bases = [the_store.base_meta(n) for n in the_store.base_names()]
    adapters = [the_store.adapter_meta(n) for n in the_store.adapter_names()]
    if json_out:
        emit_json(
            {
                "store": str(the_store.root),
                "bases": [b.model_dump(mode="json") for b in bases],
                "adapters": [a.model_dump(mode="json") for a in adapters],
            }
        )
        return
    table = Table(title=f"store {the_store.root}")
    for col in ("name", "kind", "model", "attack / data", "layers", "val clean", "val robust"):
        table.add_column(col)
    for b in bases:
        table.add_row(b.name, "base", b.timm_model, b.dataset, "", pct(b.metrics.get("val_clean_acc")), "")
    for a in adapters:
        kind = a.recipe or a.combination.get("method", "derived")
        table.add_row(
            a.name,
            kind,
            a.timm_model,
            a.attack or "",
            str(len(a.lora.targets)),
            pct(a.metrics.get("val_clean_acc")),
            pct(a.metrics.get("val_robust_acc")),
        )
    console.print(table)


@run_command
def show_cli(
    name: Annotated[str, typer.Argument(help="Adapter or base name.")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the full metadata of an adapter (or base)."""
    the_store = open_store(store)
    meta = (
        the_store.adapter_meta(name)
        if the_store.has_adapter(name) or not the_store.has_base(name)
        else the_store.base_meta(name)
    )
    data = meta.model_dump(mode="json")
    if json_out:
        emit_json(data)
        return
    console.print_json(data=data)
