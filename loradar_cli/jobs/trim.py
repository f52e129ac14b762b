"""`trim`: singular-value trimming of an adapter's ΔW (by rank or energy) or of W0 + ΔW (AMT's full-weight trim)."""

import re
from typing import Any, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer
from torch import Tensor

from loradar_cli.device import active_engine
from loradar_cli.errors import IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.jobs._derived import save_derived
from loradar_cli.lora.state import (
    LoraFactors,
    dense_key,
    head_tensors,
    pack,
    stored_deltas,
    stored_factors,
    stored_groups,
)
from loradar_cli.members import Members, load_members
from loradar_cli.ops.trim import full_weight_trim, lowrank_or_dense, trim_deltas
from loradar_cli.store.meta import AdapterMeta
from loradar_cli.store.store import Adapter, Store

PEFT_NOTE = (
    "dense deltas are stored under '<layer>.weight_delta' and are not part of target_modules: "
    "PEFT ignores them, load this adapter with loradar"
)


class TrimReport(BaseModel):
    """What a trim kept per layer; `rank`/`energy` belong to the svd mode, `keep`/`layers_regex` to full-weight.

    The JSON holds the fields of its mode only (as the stored `combination` always did); `dense_deltas` (a note
    that PEFT cannot load them) only when some layer is stored dense.
    """

    name: str
    parent: str
    layers: dict[str, dict[str, Any]]
    mode: Literal["svd", "full-weight"]
    rank: int | None = None
    energy: float | None = None
    keep: float | None = None
    layers_regex: str | None = None
    dense_deltas: str | None = None

    @model_serializer(mode="wrap")
    def _mode_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        other = ("keep", "layers_regex") if self.mode == "svd" else ("rank", "energy")
        data = {k: v for k, v in handler(self).items() if k not in other}
        if data.get("dense_deltas") is None:
            data.pop("dense_deltas", None)
        return data

    def combination(self) -> dict[str, Any]:
        """The provenance stored with the trimmed adapter: method 'trim' and the report less name and parent."""
        return {
            "method": "trim",
            **{k: v for k, v in self.model_dump(mode="json").items() if k not in ("name", "parent")},
        }


def trim_adapter(
    store: Store,
    name: str,
    *,
    out_name: str,
    base: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    full_weight: bool = False,
    keep: float = 0.7,
    layers_regex: str | None = None,
    overwrite: bool = False,
) -> tuple[AdapterMeta, TrimReport]:
    """Singular-value trimming of ΔW (--rank/--energy) or of W0 + ΔW (--full-weight); returns metadata and report."""
    if full_weight and (rank is not None or energy is not None):
        raise InvalidValueError("--full-weight trims W0 + ΔW by --keep; it cannot be combined with --rank/--energy")
    if not full_weight and rank is None and energy is None:
        raise InvalidValueError("give --rank or --energy (or --full-weight with --keep)")
    store.check_free("adapter", out_name, overwrite)
    members = load_members(store, [name], base)
    adapter = members.adapters[0]
    if full_weight:
        layers, dense, layer_report = _full_weight_layers(members, keep, layers_regex)
        report = TrimReport(
            name=out_name,
            parent=name,
            layers=layer_report,
            mode="full-weight",
            keep=keep,
            layers_regex=layers_regex,
            dense_deltas=PEFT_NOTE if dense else None,
        )
    else:
        layers, layer_report = _svd_trim_layers(adapter, rank, energy)
        dense = {}
        report = TrimReport(name=out_name, parent=name, layers=layer_report, mode="svd", rank=rank, energy=energy)
    spec, tensors = pack(layers, dense, adapter.meta.lora.head, head_tensors(adapter.tensors, adapter.meta.lora))
    combination = report.combination()
    meta = save_derived(
        store,
        members,
        out_name,
        spec,
        tensors,
        parents=[name],
        combination=combination,
        dense=list(dense),
        attack=adapter.meta.attack,
        attack_config=adapter.meta.attack_config,
        overwrite=overwrite,
    )
    return meta, report


def _svd_trim_layers(
    adapter: Adapter, rank: int | None, energy: float | None
) -> tuple[dict[str, LoraFactors], dict[str, dict[str, Any]]]:
    """Keep the top triplets of each layer's ΔW by rank and/or energy."""
    spec, tensors = adapter.meta.lora, adapter.tensors
    deltas = stored_deltas(spec, tensors, adapter.meta.dense_deltas)
    factors, infos = trim_deltas(deltas, rank, energy, groups=stored_groups(spec, tensors))
    return factors, {name: info.model_dump() for name, info in infos.items()}


def _full_weight_layers(
    members: Members, keep: float, regex: str | None
) -> tuple[dict[str, LoraFactors], dict[str, Tensor], dict[str, dict[str, Any]]]:
    """AMT trim of W0 + ΔW on the selected layers; the rest are copied unchanged."""
    adapter = members.adapters[0]
    chosen = _select_layers(adapter, regex)
    spec, tensors = adapter.meta.lora, adapter.tensors
    groups = stored_groups(spec, tensors)
    layers = {n: f for n, f in stored_factors(spec, tensors).items() if n not in chosen}
    dense = {n: adapter.tensors[dense_key(n)] for n in adapter.meta.dense_deltas if n not in chosen}
    report: dict[str, dict[str, Any]] = {}
    deltas = stored_deltas(spec, tensors, adapter.meta.dense_deltas)
    for name in chosen:
        if groups.get(name, 1) != 1:
            raise IncompatibleError(f"layer {name!r} is a grouped conv; --full-weight supports groups == 1 only")
        w0 = members.base.state[f"{name}.weight"].float()
        device = active_engine().device
        new_delta, info = full_weight_trim(w0.to(device), deltas[name].to(device), keep)
        new_delta = new_delta.cpu()
        packed = lowrank_or_dense(new_delta, storage_rank(new_delta))
        if packed is None:
            dense[name] = new_delta
        else:
            layers[name] = packed[0]
        report[name] = {
            **info.model_dump(),
            "storage": "dense" if packed is None else "lora",
            "stored_rank": None if packed is None else packed[1].rank,
        }
    return layers, dense, report


def _select_layers(adapter: Adapter, regex: str | None) -> list[str]:
    """Adapter layers whose name matches `regex` (re.search), all of them by default."""
    names = [*adapter.meta.lora.targets, *(n for n in adapter.meta.dense_deltas if n not in adapter.meta.lora.targets)]
    if regex is None:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise InvalidValueError(f"--layers {regex!r} is not a valid regex: {err}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise NotFoundError(
            f"no layer of adapter {adapter.meta.name!r} matches --layers {regex!r}",
            hint=f"layers: {', '.join(names[:6])}",
        )
    return chosen


def storage_rank(delta: Tensor) -> int:
    """Largest rank r for which factors (r·(m + n) numbers) are no bigger than the dense ΔW (m·n)."""
    m, n = delta.shape[0], delta[0].numel()
    return max(1, (m * n) // (m + n))
