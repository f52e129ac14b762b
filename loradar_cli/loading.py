"""Rebuild stored bases as models and put adapters on them, refusing adapters of another base."""

from collections.abc import Sequence

import torch

from loradar_cli.data import ImageData, check_provenance
from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.loader import DEFAULT_CROP_PCT, FolderSource, TensorSource, crop_pct_of, materialize, open_split
from loradar_cli.lora.inject import inject_lora
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.lora.state import dense_key, load_lora_state_dict
from loradar_cli.metrics import predict_logits  # noqa: F401  (old import path, kept one release)
from loradar_cli.models import ImageClassifier, create_timm_model, freeze, load_weights
from loradar_cli.store.meta import BaseMeta
from loradar_cli.store.store import Adapter, Base, Store


def build_model(base: Base) -> ImageClassifier:
    """The stored base as an eval-mode, frozen ImageClassifier (inputs in [0, 1])."""
    meta = base.meta
    timm_model = create_timm_model(
        meta.timm_model, num_classes=meta.num_classes, in_chans=meta.input_size[0], kwargs=meta.model_kwargs
    )
    load_weights(timm_model, base.state, f"base {meta.name!r}")
    return freeze(ImageClassifier(timm_model, meta.mean, meta.std)).eval()


def check_adapter_fits(adapter: Adapter, base: BaseMeta) -> None:
    """An adapter is only valid on the exact base weights it was trained on."""
    meta = adapter.meta
    if meta.base_fingerprint != base.fingerprint:
        raise IncompatibleError(
            f"adapter {meta.name!r} was trained on base {meta.base!r} (sha256 {meta.base_fingerprint[:12]}), "
            f"not on base {base.name!r} (sha256 {base.fingerprint[:12]})"
        )


def apply_adapter(model: ImageClassifier, adapter: Adapter, base: BaseMeta) -> ImageClassifier:
    """Inject the adapter's LoRA layers into `model` and load its factors (and head), in place."""
    check_adapter_fits(adapter, base)
    dense = {dense_key(name): name for name in adapter.meta.dense_deltas}
    factors = {k: v for k, v in adapter.tensors.items() if k not in dense}
    inject_lora(model.model, adapter.meta.lora)
    load_lora_state_dict(model.model, adapter.meta.lora, factors)
    with torch.no_grad():
        for key, name in dense.items():
            weight = _base_weight(model.model, name)
            if adapter.tensors[key].shape != weight.shape:
                raise IncompatibleError(f"dense delta for {name!r} does not match the layer's weight shape")
            weight.add_(adapter.tensors[key].to(weight.device, weight.dtype))
    return freeze(model).eval()


def _base_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return module.base_layer.weight if isinstance(module, LoraLayer) else module.weight


def load_model(store: Store, base_name: str, adapter_name: str | None = None) -> ImageClassifier:
    """Base (+ adapter) from the store, ready for inference or attack."""
    return model_on(store, store.load_base(base_name), adapter_name)


def model_on(store: Store, base: Base, adapter_name: str | None = None) -> ImageClassifier:
    """A fresh model of an already loaded base, with the named adapter applied (several models, one base read)."""
    model = build_model(base)
    return model if adapter_name is None else apply_adapter(model, store.load_adapter(adapter_name), base.meta)


def resolve_base_for(store: Store, adapters: Sequence[str], base_name: str | None) -> str:
    """The base to use: the one given, else the one the adapters were trained on (all must agree)."""
    if base_name:
        return base_name
    bases = {store.adapter_meta(a).base for a in adapters}
    if len(bases) != 1:
        raise IncompatibleError(
            "pass --base: " + ("no adapter given" if not bases else f"adapters come from bases {sorted(bases)}")
        )
    return bases.pop()


def model_source(
    spec: str,
    split: str,
    base: BaseMeta,
    *,
    seed: int = 0,
    limit: int | None = None,
    download: bool = False,
    report_limit: bool = True,
) -> "TensorSource | FolderSource":
    """A split as a loader source in the base's channels and input size (image folders stream, centre-cropped).

    In-memory data unlike the base's own (kind, classes, image statistics) is warned about (an error under --strict).
    """
    c, h, w = base.input_size
    source = open_split(
        spec,
        split,
        seed=seed,
        limit=limit,
        channels=c,
        size=(h, w),
        crop_pct=crop_pct_of(base.timm_model) if spec.startswith("imagefolder:") else DEFAULT_CROP_PCT,
        download=download,
        report_limit=report_limit,
    )
    if source.num_classes > base.num_classes:
        raise InvalidValueError(
            f"{spec} has {source.num_classes} classes but base {base.name!r} has {base.num_classes}"
        )
    if isinstance(source, TensorSource):
        check_provenance(
            source.data, dataset=base.dataset, num_classes=base.num_classes, mean=base.mean, std=base.std,
            stats=not base.pretrained,
        )  # fmt: skip
    return source


def model_data(
    spec: str,
    split: str,
    base: BaseMeta,
    *,
    seed: int = 0,
    limit: int | None = None,
    download: bool = False,
    report_limit: bool = True,
) -> ImageData:
    """A split converted to the base's channels and input size, in memory; data unlike the base's is warned about."""
    return materialize(
        model_source(spec, split, base, seed=seed, limit=limit, download=download, report_limit=report_limit)
    )
