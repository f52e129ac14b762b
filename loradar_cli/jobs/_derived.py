"""Stored LoRA factors as ΔW per layer, and packing derived factors back into a stored adapter."""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from loradar_cli.loading import DENSE_SUFFIX
from loradar_cli.lora.inject import PEFT_PREFIX
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.members import Members
from loradar_cli.ops.merge import LoraFactors, factor_groups, factors_to_delta
from loradar_cli.store.meta import AdapterMeta
from loradar_cli.store.store import Adapter, Store


class Layer(NamedTuple):
    """One stored LoRA layer: factors A, B in PEFT layout and its lora_alpha, so ΔW = alpha/r·B·A."""

    a: Tensor
    b: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def dense_key(layer: str) -> str:
    """Tensor key of a dense ΔW stored with an adapter."""
    return f"{PEFT_PREFIX}{layer}.{DENSE_SUFFIX}"


def adapter_layers(adapter: Adapter) -> dict[str, Layer]:
    """The stored LoRA factors of every target layer (float32) with their lora_alpha."""
    spec, t = adapter.meta.lora, adapter.tensors
    return {
        name: Layer(
            t[f"{PEFT_PREFIX}{name}.lora_A.weight"].float(),
            t[f"{PEFT_PREFIX}{name}.lora_B.weight"].float(),
            spec.alpha_of(name),
        )
        for name in spec.targets
    }


def factors_of(layer: Layer) -> LoraFactors:
    """The layer as LoraFactors with scale alpha/r."""
    return LoraFactors(layer.a, layer.b, layer.alpha / layer.rank)


def adapter_deltas(adapter: Adapter) -> dict[str, Tensor]:
    """ΔW of every adapted layer (float32): s·B·A for LoRA layers plus any stored dense delta."""
    deltas = {name: factors_to_delta(factors_of(layer)) for name, layer in adapter_layers(adapter).items()}
    for name in adapter.meta.dense_deltas:
        dense = adapter.tensors[dense_key(name)].float()
        deltas[name] = deltas[name] + dense if name in deltas else dense
    return deltas


def layer_groups(adapter: Adapter) -> dict[str, int]:
    """Conv groups of every LoRA layer of an adapter."""
    return {name: factor_groups(layer.a, layer.b) for name, layer in adapter_layers(adapter).items()}


def pack(
    layers: Mapping[str, Layer], dense: Mapping[str, Tensor], head_name: str | None, head: Mapping[str, Tensor]
) -> tuple[LoraSpec, dict[str, Tensor]]:
    """LoraSpec with per-layer rank/alpha patterns, and the tensors under PEFT's key names."""
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.b.contiguous()
    tensors.update({dense_key(name): d.contiguous() for name, d in dense.items()})
    if head_name:
        tensors.update({f"{PEFT_PREFIX}{head_name}.{p}": t.contiguous() for p, t in head.items()})
    r = max((layer.rank for layer in layers.values()), default=1)
    spec = LoraSpec(
        r=r,
        lora_alpha=float(r),
        targets=list(layers),
        head=head_name if head else None,
        rank_pattern={n: layer.rank for n, layer in layers.items()},
        alpha_pattern={n: layer.alpha for n, layer in layers.items()},
    )
    return spec, tensors


def save_derived(
    store: Store,
    members: Members,
    name: str,
    spec: LoraSpec,
    tensors: dict[str, Tensor],
    *,
    parents: Sequence[str],
    combination: dict[str, Any],
    dense: Sequence[str] = (),
    attack: str | None = None,
    attack_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> AdapterMeta:
    """Write a derived adapter with its provenance and return the stored metadata."""
    base = members.base.meta
    meta = AdapterMeta(
        name=name,
        base=base.name,
        base_fingerprint=base.fingerprint,
        timm_model=base.timm_model,
        num_classes=base.num_classes,
        lora=spec,
        attack=attack,
        attack_config=dict(attack_config or {}),
        parents=list(parents),
        combination=combination,
        dense_deltas=list(dense),
    )
    store.save_adapter(meta, tensors, overwrite=overwrite)
    return store.adapter_meta(name)
