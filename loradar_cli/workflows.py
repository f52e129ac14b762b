"""End-to-end jobs behind the commands (fit a base, train an adapter, craft a set, evaluate), usable from Python.

Each job takes plain values, talks to the store, and returns pydantic metadata or reports; none prints.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loradar_cli.advset import AdvSet, labelled_adv_sets, save_adv_set
from loradar_cli.attacks import build_attack
from loradar_cli.data import ImageData, channel_stats, load_data
from loradar_cli.evaluation import EvalRow, evaluate, evaluate_group
from loradar_cli.loading import build_model, load_model, model_data, model_on
from loradar_cli.lora.inject import classifier_name, default_targets, inject_lora, lora_state_dict, select_targets
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.metrics import Progress, accuracy
from loradar_cli.models import ImageClassifier, create_timm_model, load_checkpoint, load_weights, pretrained_stats
from loradar_cli.recipes.loop import TrainConfig, adversarial, fit_classifier, train_adapter
from loradar_cli.store.meta import AdapterMeta, BaseMeta
from loradar_cli.store.store import Store


def finetune_base(
    store: Store,
    name: str,
    *,
    model: str,
    data: str,
    epochs: int = 5,
    lr: float = 2e-3,
    batch_size: int = 128,
    head_only: bool = False,
    pretrained: bool = False,
    checkpoint: Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    download: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BaseMeta:
    """Fit a timm model on clean data (full or head-only) and store it as a base."""
    store.check_free("base", name, overwrite)
    kwargs = dict(model_kwargs or {})
    probe = load_data(data, "train", seed=seed, limit=2, download=download)
    channels = in_chans or probe.x.shape[1]
    size = kwargs.get("img_size") or img_size or probe.x.shape[-1]
    train = load_data(data, "train", seed=seed, limit=limit, channels=channels, size=size)
    val = load_data(data, "val", seed=seed, channels=channels, size=size)
    torch.manual_seed(seed)
    net = create_timm_model(
        model, num_classes=train.num_classes, in_chans=channels, pretrained=pretrained, kwargs=kwargs
    )
    if checkpoint is not None:
        load_weights(net, load_checkpoint(checkpoint), str(checkpoint))
    mean, std = (pretrained and pretrained_stats(net, channels)) or channel_stats(train.x)
    classifier = ImageClassifier(net, mean, std)
    if head_only:
        head = classifier_name(net)
        for pname, p in net.named_parameters():
            p.requires_grad_(bool(head) and pname.startswith(f"{head}."))
    val_acc = (
        fit_classifier(
            classifier, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress
        )
        if epochs > 0
        else accuracy(classifier, val.x, val.y)
    )
    meta = BaseMeta(
        name=name,
        timm_model=model,
        model_kwargs=kwargs,
        num_classes=train.num_classes,
        input_size=(channels, size, size),
        mean=mean,
        std=std,
        dataset=data,
        pretrained=pretrained,
        head_only=head_only,
        metrics={"val_clean_acc": val_acc, "epochs": float(epochs)},
        seed=seed,
        fingerprint="",
    )
    store.save_base(meta, net.state_dict(), overwrite=overwrite)
    return store.base_meta(name)


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
) -> AdapterMeta:
    """Train an attack-specialised LoRA on a frozen base and store it (nothing is written if training fails)."""
    store.check_free("adapter", name, overwrite)
    config = config or TrainConfig()
    stored = store.load_base(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    train = model_data(data, "train", stored.meta, seed=config.seed, limit=limit)
    val = model_data(data, "val", stored.meta, seed=config.seed, limit=val_limit)
    model = build_model(stored)
    spec = lora_spec_for(model, r=r, lora_alpha=lora_alpha, targets=targets, train_head=train_head)
    torch.manual_seed(config.seed)
    inject_lora(model.model, spec)
    result = train_adapter(model, attack_fn, train, val, config, progress)
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
        },
    )
    store.save_adapter(meta, lora_state_dict(model.model, spec), overwrite=overwrite)
    return store.adapter_meta(name)


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


def craft_adv_set(
    store: Store,
    out: Path,
    *,
    base: str,
    attack: str,
    data: str,
    adapter: str | None = None,
    attack_options: Mapping[str, Any] | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> tuple[AdvSet, float]:
    """Attack the test split against base (+ adapter) and save the set; returns it and the target's accuracy on it."""
    model = load_model(store, base, adapter)
    stored_meta = store.base_meta(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    clean = model_data(data, split, stored_meta, seed=seed, limit=limit)
    torch.manual_seed(seed)
    x_adv = adversarial(attack_fn, model, clean.x, clean.y, batch_size)
    acc = accuracy(model, x_adv, clean.y)
    info = {
        "config": attack_fn.describe(),
        "target": {"base": base, "adapter": adapter, "base_fingerprint": stored_meta.fingerprint},
        "data": data,
        "split": split,
        "limit": limit,
        "seed": seed,
        "target_accuracy": acc,
    }
    adv = AdvSet(x_adv, clean.y, attack, info)
    save_adv_set(out, adv)
    return adv, acc


@dataclass(frozen=True)
class EnsembleRows:
    """Ensemble rows for `evaluate_models`: voters, methods (majority/weighted/soft/route) and their options."""

    members: Sequence[str]
    methods: Sequence[str]
    weights: Sequence[float] | None = None
    identifier: str | None = None


def evaluate_models(
    store: Store,
    *,
    base: str,
    adapters: Sequence[str | None],
    data: str,
    attacks: Mapping[str, Mapping[str, Any]],
    adv_sets: Sequence[Path] = (),
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    ensemble: EnsembleRows | None = None,
    progress: Progress | None = None,
) -> list[EvalRow]:
    """Evaluate the base (None), each adapter and each ensemble method: clean, attacks, saved sets, worst case.

    Attacks are white-box against each row's model; ensemble rows are attacked through the mean of their
    members' logits (the decision of a vote has no gradient), never transferred from the base.
    """
    stored = store.load_base(base)
    clean = model_data(data, split, stored.meta, seed=seed, limit=limit)
    sets = labelled_adv_sets(adv_sets, stored.meta.input_size)
    built = {name: build_attack(name, **dict(options)) for name, options in attacks.items()}
    rows = []
    for adapter in adapters:
        model = model_on(store, stored, adapter)
        torch.manual_seed(seed)
        rows.append(evaluate(model, adapter or "base", clean, built, sets, batch_size=batch_size, progress=progress))
    if ensemble is not None:
        rows += _evaluate_ensemble(store, base, ensemble, clean, built, sets, seed, batch_size, progress)
    return rows


def _evaluate_ensemble(
    store: Store,
    base: str,
    spec: EnsembleRows,
    clean: ImageData,
    attacks: Mapping[str, Any],
    sets: Mapping[str, AdvSet],
    seed: int,
    batch_size: int,
    progress: Progress | None,
) -> list[EvalRow]:
    """One row per ensemble method; all share the mean logits of the voters, so each attack is crafted once."""
    from loradar_cli.combine.ensemble import load_ensemble

    loaded = load_ensemble(
        store, spec.members, methods=spec.methods, base=base, weights=spec.weights, identifier=spec.identifier
    )
    classifiers = {
        method if method == "route" else f"vote:{method}": loaded.classifier(method) for method in loaded.decisions
    }
    torch.manual_seed(seed)
    return evaluate_group(
        classifiers,
        loaded.surrogate(),
        clean,
        attacks,
        sets,
        batch_size=batch_size,
        progress=progress,
        attacked=f"mean logits of {len(loaded.voters)} members",
    )


def attack_fields(name: str) -> set[str]:
    """Option names an attack's config accepts (to route shared --eps/--steps only where they apply)."""
    return set(type(build_attack(name).config).model_fields)


def route_attack_options(
    names: Sequence[str], shared: Mapping[str, Any], specific: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per attack: shared options it accepts, then `name.key=value` options for it alone."""
    routed: dict[str, dict[str, Any]] = {}
    for name in names:
        fields = attack_fields(name)
        routed[name] = {k: v for k, v in shared.items() if k in fields and v is not None}
        routed[name].update(specific.get(name, {}))
    return routed
