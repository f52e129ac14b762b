"""The job behind `loradar finetune`: fit a timm model on clean data and store it as a base."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loradar_cli.data import channel_stats, load_data
from loradar_cli.lora.inject import classifier_name
from loradar_cli.metrics import Progress, accuracy
from loradar_cli.models import ImageClassifier, create_timm_model, load_checkpoint, load_weights, pretrained_stats
from loradar_cli.recipes.checkpoint import Checkpoint, run_fingerprint
from loradar_cli.recipes.loop import fit_classifier
from loradar_cli.store.meta import BaseMeta
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
    resume: bool = False,
    progress: Progress | None = None,
) -> BaseMeta:
    """Fit a timm model on clean data (full or head-only) and store it as a base.

    The run is checkpointed after every epoch in `<store>/.resume-base-<name>/`; `resume` continues from it
    (same options required); the folder is removed once the base is stored.
    """
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
    options = [model, data, epochs, lr, batch_size, head_only, pretrained, str(checkpoint), kwargs, limit, seed]
    state = Checkpoint(store.root / f".resume-base-{name}", run_fingerprint([*options, img_size, in_chans]))
    if not resume:
        state.clear()
    val_acc = (
        fit_classifier(
            classifier,
            train,
            val,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            checkpoint=state,
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
    state.clear()
    return store.base_meta(name)
