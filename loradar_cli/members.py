"""Adapters to combine, their merged models, and the labelled input sets that votes and identifiers read."""

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loradar_cli.advset import labelled_adv_sets
from loradar_cli.device import active_engine
from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.files import atomic_path
from loradar_cli.loading import (
    apply_adapter,
    build_model,
    check_adapter_fits,
    model_data,
    resolve_base_for,
)
from loradar_cli.lora.inject import lora_layers, replace_module
from loradar_cli.metrics import predict_logits
from loradar_cli.models import ImageClassifier
from loradar_cli.store.meta import BaseMeta
from loradar_cli.store.store import Adapter, Base, Store

BASE_MEMBER = ":base"
"""Stands for the base model among identifier members (no adapter name can start with ':')."""
CLEAN = "clean"


@dataclass(frozen=True)
class Members:
    """Adapters to combine and the one base they were all trained on."""

    base: Base
    adapters: list[Adapter]

    @property
    def names(self) -> list[str]:
        return [a.meta.name for a in self.adapters]


def load_members(store: Store, names: Sequence[str], base: str | None = None) -> Members:
    """Load adapters and their common base; refuse adapters of different bases or class counts."""
    if not names:
        raise InvalidValueError("no adapters given")
    metas = [store.adapter_meta(n) for n in names]
    if len({m.base_fingerprint for m in metas}) > 1:
        listing = ", ".join(f"{m.name} (base {m.base!r})" for m in metas)
        raise IncompatibleError(
            f"adapters were trained on different bases: {listing}", hint="only adapters of one base can be combined"
        )
    stored = store.load_base(resolve_base_for(store, list(names), base))
    adapters = [store.load_adapter(n) for n in names]
    for adapter in adapters:
        check_adapter_fits(adapter, stored.meta)
        if adapter.meta.num_classes != stored.meta.num_classes:
            raise IncompatibleError(
                f"adapter {adapter.meta.name!r} has {adapter.meta.num_classes} classes, "
                f"base {stored.meta.name!r} has {stored.meta.num_classes}"
            )
    return Members(stored, adapters)


def merged_model(template: ImageClassifier, adapter: Adapter, base: BaseMeta) -> ImageClassifier:
    """A copy of `template` with the adapter's ΔW folded into its weights (plain layers, no LoRA branches)."""
    model = apply_adapter(copy.deepcopy(template), adapter, base)
    for name, layer in lora_layers(model.model).items():
        layer.merge()
        replace_module(model.model, name, layer.base_layer)
    return model.eval()


def member_models(members: Members, extra: Sequence[str] = ()) -> dict[str, ImageClassifier]:
    """Merged models keyed by adapter name, plus the base itself under BASE_MEMBER if asked for in `extra`."""
    template = active_engine().model(build_model(members.base))
    models = {a.meta.name: merged_model(template, a, members.base.meta) for a in members.adapters}
    if BASE_MEMBER in extra:
        models[BASE_MEMBER] = template
    return models


def adapter_models(store: Store, base: str | None, names: Sequence[str]) -> list[ImageClassifier]:
    """One merged model per adapter (ΔW folded into a copy of the base weights once)."""
    models = member_models(load_members(store, names, base))
    return [models[n] for n in names]


@torch.no_grad()
def ensemble_probs(models: Sequence[torch.nn.Module], x: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax outputs [K, N, C] of K models on batched inputs: K merged forwards."""
    return torch.stack([predict_logits(m, x, batch_size).softmax(dim=-1) for m in models])


@dataclass(frozen=True)
class InputSet:
    """Labelled inputs to vote on or identify; `attack` is the true attack family ('clean' for clean data)."""

    label: str
    x: Tensor
    y: Tensor
    attack: str


def input_sets(
    base: BaseMeta,
    *,
    data: str | None = None,
    split: str = "test",
    adv_sets: Sequence[Path] = (),
    limit: int | None = None,
    seed: int = 0,
) -> list[InputSet]:
    """The --data split (labelled 'clean') and each adversarial set (labelled by its file name)."""
    if data is None and not adv_sets:
        raise InvalidValueError("give --data SPEC and/or --adv-set FILE")
    sets: list[InputSet] = []
    if data is not None:
        clean = model_data(data, split, base, seed=seed, limit=limit)
        sets.append(InputSet(CLEAN, clean.x, clean.y, CLEAN))
    for label, adv in labelled_adv_sets(
        adv_sets, base.input_size, taken=[CLEAN] if data is not None else [], num_classes=base.num_classes
    ).items():
        sets.append(InputSet(label, adv.x[:limit], adv.y[:limit], adv.label))
    return sets


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename): a failed run leaves no partial file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data) + "\n")
    return path
