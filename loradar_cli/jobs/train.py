"""The job behind `loradar train`: an attack-specialised LoRA on a frozen base, written to the store."""

import time
from collections.abc import Mapping
from typing import Any

import torch

from loradar_cli.attacks import build_attack
from loradar_cli.device import Engine
from loradar_cli.distributed import on_main
from loradar_cli.loader import resolve_augment
from loradar_cli.loading import build_model, model_source
from loradar_cli.lora.inject import classifier_name, default_targets, inject_lora, lora_state_dict, select_targets
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.metrics import Progress
from loradar_cli.models import ImageClassifier
from loradar_cli.recipes.loop import TrainConfig, train_adapter
from loradar_cli.store.meta import AdapterMeta
from loradar_cli.store.store import Store


def train_and_store_adapter(
    store: Store,
    name: str,
    *,
    base: str,
    attack: str,
    data: str,
    attack_options: Mapping[str, Any] | None = None,
    config: TrainConfig | None = None,
    r: int = 4,
    lora_alpha: float | None = None,
    targets: str | None = None,
    train_head: bool = True,
    limit: int | None = None,
    val_limit: int | None = 512,
    overwrite: bool = False,
    progress: Progress | None = None,
    engine: Engine | None = None,
    augment: str | None = None,
) -> AdapterMeta:
    """Train an attack-specialised LoRA on a frozen base and store it (nothing is written if training fails).

    Under torchrun every process trains its shard of each batch and rank 0 alone writes the adapter.
    """
    engine = engine or Engine()
    store.check_free("adapter", name, overwrite)
    config = config or TrainConfig()
    stored = store.load_base(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    train = model_source(data, "train", stored.meta, seed=config.seed, limit=limit)
    val = model_source(data, "val", stored.meta, seed=config.seed, limit=val_limit)
    augment = resolve_augment(augment, stored.meta.input_size[0])
    model = build_model(stored)
    spec = lora_spec_for(model, r=r, lora_alpha=lora_alpha, targets=targets, train_head=train_head)
    torch.manual_seed(config.seed)
    inject_lora(model.model, spec)
    start = time.perf_counter()
    result = train_adapter(model, attack_fn, train, val, config, progress, engine=engine, augment=augment)
    run = {"augment": augment, **engine.record(time.perf_counter() - start, config.epochs * len(train))}
    best = result.best
    meta = AdapterMeta(
        name=name,
        base=base,
        base_fingerprint=stored.meta.fingerprint,
        timm_model=stored.meta.timm_model,
        num_classes=stored.meta.num_classes,
        lora=spec,
        recipe=config.recipe,
        recipe_config=config.model_dump(),
        attack=attack,
        attack_config=attack_fn.describe(),
        seed=config.seed,
        metrics={
            "val_clean_acc": best.val_clean_acc,
            "val_robust_acc": best.val_robust_acc,
            "best_epoch": float(result.best_epoch),
            "train_loss": best.loss,
        },
        combination={
            "data": data,
            "limit": limit,
            "val_limit": val_limit,
            "history": [vars(h) for h in result.history],
            "run": run,
        },
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model.model, spec).items()}
    on_main(engine.world, lambda: store.save_adapter(meta, tensors, overwrite=overwrite))
    return store.adapter_meta(name) if engine.world.is_main else meta


def lora_spec_for(
    model: ImageClassifier, *, r: int, lora_alpha: float | None, targets: str | None, train_head: bool
) -> LoraSpec:
    """Resolve targets to exact module names; lora_alpha defaults to r (scale 1, the LoRADAR update)."""
    preset = targets or default_targets(model.model)
    return LoraSpec(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else float(r),
        targets=select_targets(model.model, preset),
        head=classifier_name(model.model) if train_head else None,
    )
