"""The job behind `loradar finetune`: fit a timm model on clean data and store it as a base."""

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loradar_cli.data import channel_stats, load_data, parse_spec
from loradar_cli.device import Engine
from loradar_cli.distributed import on_main
from loradar_cli.loader import DEFAULT_CROP_PCT, TensorSource, crop_pct_of, open_split, resolve_augment
from loradar_cli.lora.inject import classifier_name
from loradar_cli.metrics import Progress
from loradar_cli.models import ImageClassifier, create_timm_model, load_checkpoint, load_weights, pretrained_stats
from loradar_cli.recipes.checkpoint import Checkpoint, run_fingerprint
from loradar_cli.recipes.loop import fit_classifier, validate
from loradar_cli.signals import import_held
from loradar_cli.store.meta import BaseMeta
from loradar_cli.store.store import Store

STATS_SAMPLE = 2048  # images a streamed folder's mean/std is estimated from


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
    resume: bool = False,
    progress: Progress | None = None,
    engine: Engine | None = None,
    augment: str | None = None,
) -> BaseMeta:
    """Fit a timm model on clean data (full or head-only) and store it as a base.

    The run is checkpointed after every epoch in `<store>/.resume-base-<name>/`; `resume` continues from it
    (same options required); the folder is removed once the base is stored. `augment` defaults to crop-flip
    for 3-channel data and none otherwise; image folders are resized and centre-cropped to `img_size`
    (default: the timm model's input size).
    """
    engine = engine or Engine()
    store.check_free("base", name, overwrite)
    kwargs = dict(model_kwargs or {})
    channels, size, crop_pct = _geometry(data, model, kwargs, img_size, in_chans, seed, download)
    augment = resolve_augment(augment, channels)
    train = open_split(data, "train", seed=seed, limit=limit, channels=channels, size=size, crop_pct=crop_pct)
    val = open_split(data, "val", seed=seed, channels=channels, size=size, crop_pct=crop_pct)
    torch.manual_seed(seed)
    net = create_timm_model(
        model, num_classes=train.num_classes, in_chans=channels, pretrained=pretrained, kwargs=kwargs
    )
    if checkpoint is not None:
        load_weights(net, load_checkpoint(checkpoint), str(checkpoint))
    mean, std = (pretrained and pretrained_stats(net, channels)) or _stats(train)
    classifier = ImageClassifier(net, mean, std)
    if head_only:
        head = classifier_name(net)
        for pname, p in net.named_parameters():
            p.requires_grad_(bool(head) and pname.startswith(f"{head}."))
    options = [model, data, epochs, lr, batch_size, head_only, pretrained, str(checkpoint), kwargs, limit, seed]
    state = Checkpoint(store.root / f".resume-base-{name}", run_fingerprint([*options, img_size, in_chans, augment]))
    if not resume:
        state.clear()
    start = time.perf_counter()
    if epochs > 0:
        val_acc = fit_classifier(
            classifier,
            train,
            val,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            checkpoint=state,
            engine=engine,
            augment=augment,
        )
    else:
        val_acc = validate(engine.model(classifier), val, batch_size, engine)[0]
    wall = time.perf_counter() - start
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
        training={"augment": augment, **engine.record(wall, epochs * len(train))},
        fingerprint="",
    )
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    on_main(engine.world, lambda: store.save_base(meta, weights, overwrite=overwrite))
    if engine.world.is_main:
        state.clear()
    return store.base_meta(name) if engine.world.is_main else meta


def _geometry(
    data: str,
    model: str,
    kwargs: Mapping[str, Any],
    img_size: int | None,
    in_chans: int | None,
    seed: int,
    download: bool,
) -> tuple[int, int, float]:
    """Channels, square input size and crop fraction: a folder's come from the timm model, others from the data."""
    if parse_spec(data)[0] == "imagefolder":
        size = kwargs.get("img_size") or img_size or _timm_input_size(model)
        return in_chans or 3, int(size), crop_pct_of(model)
    probe = load_data(data, "train", seed=seed, limit=2, download=download)
    return in_chans or probe.x.shape[1], int(kwargs.get("img_size") or img_size or probe.x.shape[-1]), DEFAULT_CROP_PCT


def _timm_input_size(model: str) -> int:
    """The input size of a timm model's pretrained config (224 when it has none)."""
    timm = import_held("timm")

    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except (RuntimeError, ValueError):
        cfg = None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def _stats(train: Any) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training split (of its first STATS_SAMPLE images when streamed)."""
    if isinstance(train, TensorSource):
        return channel_stats(train.data.x)
    _, x, _ = train[list(range(min(len(train), STATS_SAMPLE)))]
    return channel_stats(x)
