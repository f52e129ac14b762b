"""The job behind `loradar train`: an attack-specialised LoRA on a frozen base, written to the store.

With `pool`, one adapter per value of an attack option (e.g. eps) is trained with the same recipe and the
members are recorded as one named pool (`<store>/pools/<name>.json`) that merge and eval accept by name.
Under torchrun every process trains its shard of each batch and rank 0 alone writes to the store.
"""

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loradar_cli.attacks import ATTACKS, build_attack
from loradar_cli.device import Engine
from loradar_cli.distributed import on_main
from loradar_cli.loader import resolve_augment
from loradar_cli.loading import build_model, model_source
from loradar_cli.lora.init import init_lora
from loradar_cli.lora.inject import capped_ranks, classifier_name, default_targets, inject_lora, select_targets
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.lora.state import base_state
from loradar_cli.metrics import Progress
from loradar_cli.models import ImageClassifier
from loradar_cli.recipes.base import build_recipe
from loradar_cli.recipes.checkpoint import Checkpoint, run_fingerprint
from loradar_cli.recipes.loop import TrainConfig, train_adapter
from loradar_cli.store.meta import AdapterMeta, BaseMeta
from loradar_cli.store.pools import PoolManifest, check_pool_free, load_pool, pool_path, save_pool
from loradar_cli.store.store import Store


def resume_folder(store: Store, name: str) -> Path:
    """The hidden folder holding an interrupted run's state, beside the entry it will become."""
    return store.root / f".resume-{name}"


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
    resume: bool = False,
    progress: Progress | None = None,
    engine: Engine | None = None,
    augment: str | None = None,
) -> AdapterMeta | BaseMeta:
    """Train an adapter on a frozen base and store it (nothing is written if training fails).

    A recipe whose output is a full model (AutoLoRa) is stored as a new base instead, with its provenance.
    The run state is checkpointed after every epoch in a hidden folder beside the entry; `resume` continues
    from it (same options required) and the folder is removed once the adapter is stored.
    """
    engine = engine or Engine()
    config = config or TrainConfig()
    recipe = build_recipe(config.recipe, config.recipe_options)
    for suffix in recipe.output_suffixes:
        store.check_free(recipe.output, name + suffix, overwrite)
    stored = store.load_base(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    train = model_source(data, "train", stored.meta, seed=config.seed, limit=limit)
    val = model_source(data, "val", stored.meta, seed=config.seed, limit=val_limit, report_limit=False)
    augment = resolve_augment(augment, stored.meta.input_size[0])
    model = build_model(stored)
    targets = targets or recipe.default_targets
    spec = lora_spec_for(model, r=r, lora_alpha=lora_alpha, targets=targets, train_head=train_head)
    torch.manual_seed(config.seed)
    layers = inject_lora(model.model, spec)
    init_lora(layers, recipe.lora_init)
    recipe_config = {**config.model_dump(), "recipe_options": recipe.config.model_dump(mode="json")}
    run_options = [stored.meta.fingerprint, attack_fn.describe(), recipe_config, spec.model_dump(), data, limit]
    checkpoint = Checkpoint(resume_folder(store, name), run_fingerprint([*run_options, val_limit, augment]))
    if not resume:
        checkpoint.clear()
    start = time.perf_counter()
    result = train_adapter(
        model, attack_fn, train, val, config, progress, recipe=recipe, checkpoint=checkpoint, engine=engine,
        augment=augment,
    )  # fmt: skip
    run = {"augment": augment, **engine.record(time.perf_counter() - start, config.epochs * len(train))}
    best = result.best
    metrics = {
        "val_clean_acc": best.val_clean_acc,
        "val_robust_acc": best.val_robust_acc,
        "best_epoch": float(result.best_epoch),
        "train_loss": best.loss,
    }
    training = {
        "data": data,
        "limit": limit,
        "val_limit": val_limit,
        "history": [vars(h) for h in result.history],
        "run": run,
    }
    if recipe.output == "base":
        provenance = {
            "command": "train",
            "from_base": base,
            "from_fingerprint": stored.meta.fingerprint,
            "recipe": config.recipe,
            "recipe_config": {**recipe_config, "lora_init": recipe.lora_init, "lora": spec.model_dump()},
            "attack": attack,
            "attack_config": attack_fn.describe(),
            **training,
        }
        state = base_state(model.model)
        on_main(
            engine.world,
            lambda: _save_base(store, name, stored.meta, state, metrics, config.seed, provenance, overwrite),
        )
        if engine.world.is_main:
            checkpoint.clear()
        return store.base_meta(name)
    for suffix, out in recipe.export(model, spec).items():
        meta = AdapterMeta(
            name=name + suffix,
            base=base,
            base_fingerprint=stored.meta.fingerprint,
            timm_model=stored.meta.timm_model,
            num_classes=stored.meta.num_classes,
            lora=out.spec,
            recipe=config.recipe,
            recipe_config={**recipe_config, "lora_init": recipe.lora_init, "trained_rank": spec.r},
            attack=attack,
            attack_config=attack_fn.describe(),
            seed=config.seed,
            metrics=metrics,
            parents=[name + p for p in out.extra.get("parents", [])],
            combination={**training, **out.extra.get("combination", {})},
        )
        tensors = {k: v.detach().cpu().contiguous() for k, v in out.tensors.items()}
        on_main(engine.world, lambda meta=meta, tensors=tensors: store.save_adapter(meta, tensors, overwrite=overwrite))
    if engine.world.is_main:
        checkpoint.clear()
    return store.adapter_meta(name)


def member_name(pool: str, key: str, text: str) -> str:
    """The adapter name of the pool member trained with `key=text` (e.g. P-eps-8_255)."""
    return f"{pool}-{key}-{text.strip().replace('/', '_')}"


def train_pool(
    store: Store,
    name: str,
    key: str,
    values: Sequence[tuple[str, Any]],
    *,
    attack: str,
    attack_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> tuple[PoolManifest, list[AdapterMeta]]:
    """One adapter per (text, value) of attack option `key` (alpha defaults to eps/4), then the pool manifest.

    Members are independent runs (each may be resumed, or trained in its own process with the same
    command and `--pool` of one value); the manifest is written last, atomically.
    """
    names = [member_name(name, key, text) for text, _ in values]
    resume = bool(kwargs.get("resume"))
    rerun = resume and pool_path(store.root, name).exists() and load_pool(store.root, name).members == names
    if not rerun:  # a resumed run whose manifest was written already finds the same pool again
        check_pool_free(store.root, name, overwrite)
    for member in names:
        if not (resume and store.has_adapter(member)):
            store.check_free("adapter", member, overwrite)
    members: list[AdapterMeta] = []
    for member, (_, value) in zip(names, values, strict=True):
        if resume and store.has_adapter(member):  # finished before the interruption
            members.append(store.adapter_meta(member))
            continue
        options = {**dict(attack_options or {}), key: value}
        takes_alpha = "alpha" in ATTACKS.get(attack).config_cls.model_fields
        if key == "eps" and takes_alpha and "alpha" not in (attack_options or {}) and isinstance(value, (int, float)):
            options["alpha"] = value / 4  # a step of ε/4 per member (our choice; AMT publishes none)
        members.append(
            train_and_store_adapter(store, member, attack=attack, attack_options=options, overwrite=overwrite, **kwargs)
        )
    manifest = PoolManifest(
        name=name, key=key, values=[text for text, _ in values], members=names, recipe=members[0].recipe
    )
    save_pool(store.root, manifest, overwrite=overwrite or rerun)
    return manifest, members


def lora_spec_for(
    model: ImageClassifier, *, r: int, lora_alpha: float | None, targets: str | None, train_head: bool
) -> LoraSpec:
    """Resolve targets to exact module names; lora_alpha defaults to r (scale 1, the LoRADAR update).

    A layer that cannot use rank r (ΔW of a 1-channel 3×3 conv has rank ≤ 9) gets its largest useful rank, with
    alpha scaled alike so every layer keeps the scale alpha / r; the caps are recorded as PEFT's rank_pattern.
    """
    preset = targets or default_targets(model.model)
    names = select_targets(model.model, preset)
    alpha = lora_alpha if lora_alpha is not None else float(r)
    caps = capped_ranks(model.model, names, r)
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
        targets=names,
        head=classifier_name(model.model) if train_head else None,
        rank_pattern=caps,
        alpha_pattern={name: alpha * cap / r for name, cap in caps.items()},
    )


def _save_base(
    store: Store,
    name: str,
    source: BaseMeta,
    state: dict[str, Any],
    metrics: dict[str, float],
    seed: int,
    provenance: dict[str, Any],
    overwrite: bool,
) -> None:
    """A recipe's full-model result as a new base: the source base's geometry, its own weights and provenance."""
    update = {"name": name, "metrics": metrics, "seed": seed, "origin": provenance, "fingerprint": ""}
    meta = BaseMeta.model_validate(source.model_copy(update=update).model_dump())
    store.save_base(meta, state, overwrite=overwrite)
