"""Writing a derived (merged or trimmed) adapter with its provenance; its tensors come from `lora.state.pack`."""

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from loradar_cli.lora.spec import LoraSpec
from loradar_cli.members import Members
from loradar_cli.store.meta import AdapterMeta
from loradar_cli.store.store import Store


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
