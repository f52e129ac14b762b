"""The jobs behind `loradar import` and `loradar import-base`: bundles, PEFT LoRA folders and fitted bases.

A PEFT folder is what `PeftModel.save_pretrained` writes for `get_peft_model(timm_model, LoraConfig(...))`:
adapter_config.json and adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight`.
Its target_modules, rank_pattern and alpha_pattern are resolved the way PEFT resolves them (a string is a
full-match regex, a list holds exact names or dotted suffixes; pattern keys match a module name's tail).
"""

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.files import read_file
from loradar_cli.lora.state import PEFT_PREFIX
from loradar_cli.store.manifest import sha256
from loradar_cli.store.meta import AdapterMeta, BaseMeta
from loradar_cli.store.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Store, check_name

# LoraConfig switches whose effect loradar's LoRA layers do not reproduce: refused rather than silently dropped
UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
}


class ImportReport(BaseModel):
    imported: list[str]
    skipped: list[str]
    source: str
    sha256: str


# ---------------------------------------------------------------------------------------------------- bundles
def import_bundle(store: Store, path: Path, *, overwrite: bool = False) -> ImportReport:
    """Check every hash, path and base fingerprint of a bundle, then write its entries."""
    from loradar_cli.store.bundle import check_bases, install_bundle, read_bundle

    manifest, entries = read_bundle(path)
    check_bases(store, manifest, entries)
    imported, skipped = install_bundle(store, entries, overwrite=overwrite)
    return ImportReport(imported=imported, skipped=skipped, source=str(path), sha256=sha256(path.read_bytes()))


# ---------------------------------------------------------------------------------------------------- PEFT folders
def import_peft(
    store: Store,
    folder: Path,
    *,
    base: str,
    name: str | None = None,
    attack: str | None = None,
    overwrite: bool = False,
) -> AdapterMeta:
    """A PEFT LoRA folder trained on `base` becomes a store adapter; every mismatch with the base is reported."""
    import torch
    from safetensors.torch import load

    from loradar_cli.loading import build_model
    from loradar_cli.lora.inject import classifier_name, inject_lora
    from loradar_cli.lora.spec import LoraSpec
    from loradar_cli.lora.state import load_lora_state_dict, lora_state_dict_shapes

    name = check_name(name or folder.name)
    config_bytes, weight_bytes = _peft_files(folder)
    store.check_free("adapter", name, overwrite)
    config = _peft_config(config_bytes, folder / ADAPTER_CONFIG)
    try:
        raw = load(weight_bytes)
    except Exception as err:
        raise CorruptError(
            f"{folder / ADAPTER_WEIGHTS} is not a readable safetensors file ({type(err).__name__})"
        ) from None
    stored = store.load_base(base)
    model = build_model(stored).model
    head = classifier_name(model)
    ranks, heads, problems = _split_keys(raw, model, config, head)
    spec_args = _spec_args(config, ranks)
    problems += _check_targets(model, config, ranks)
    if problems:
        raise IncompatibleError(f"{folder} does not fit base {base!r}: " + "; ".join(problems))
    spec = LoraSpec(targets=list(ranks), head=head if heads else None, **spec_args)
    tensors = {k: v.contiguous() for k, v in raw.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CorruptError(f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} holds NaN or infinite values")
    inject_lora(model, spec)
    expected = dict(lora_state_dict_shapes(model, spec))
    wrong = [
        f"{k[len(PEFT_PREFIX) :]} has shape {tuple(v.shape)}, the base needs {tuple(expected[k])}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k]
    ]
    if wrong:
        raise IncompatibleError(f"{folder} does not fit base {base!r}: " + "; ".join(wrong))
    load_lora_state_dict(model, spec, tensors)
    meta = AdapterMeta(
        name=name,
        base=base,
        base_fingerprint=stored.meta.fingerprint,
        timm_model=stored.meta.timm_model,
        num_classes=stored.meta.num_classes,
        lora=spec,
        recipe="imported",
        recipe_config={
            "origin": str(folder.resolve()),
            "format": "peft",
            "sha256": {ADAPTER_CONFIG: sha256(config_bytes), ADAPTER_WEIGHTS: sha256(weight_bytes)},
            "use_rslora": bool(config.get("use_rslora")),
        },
        attack=attack,
    )
    store.save_adapter(meta, tensors, overwrite=overwrite)
    return store.adapter_meta(name)


def _peft_files(folder: Path) -> tuple[bytes, bytes]:
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a folder or a bundle file")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        other = " (only safetensors weights are read, never pickles)" if (folder / "adapter_model.bin").exists() else ""
        raise NotFoundError(f"{folder} has no {ADAPTER_WEIGHTS}{other}")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise NotFoundError(f"{folder} has no {ADAPTER_CONFIG}")
    return read_file(folder / ADAPTER_CONFIG), read_file(folder / ADAPTER_WEIGHTS)


def _peft_config(data: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except ValueError:
        raise CorruptError(f"{path} is not JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise IncompatibleError(f"{path} is not a LoRA config (peft_type {config.get('peft_type')!r})")
    refused = [k for k, ok in UNSUPPORTED.items() if config.get(k) not in (ok, None, [], {})]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise IncompatibleError(f"{path}: LoRA variants not supported by loradar: {', '.join(refused)}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
            raise CorruptError(f"{path}: {key} must be a positive number, got {value!r}")
    return config


def _split_keys(
    raw: Mapping[str, Any], model: Any, config: Mapping[str, Any], head: str | None
) -> tuple[dict[str, int], list[str], list[str]]:
    """Module -> rank from the factor keys, the head keys, and one line per key or rank that does not fit."""
    ranks: dict[str, int] = {}
    heads, problems = [], []
    saved = list(config.get("modules_to_save") or [])
    for module in saved:
        if module != head:
            problems.append(f"modules_to_save {module!r} is not the classifier head {head!r}")
    for key, value in raw.items():
        rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest or "")
        if match:
            module, factor = match.groups()
            r = value.shape[0] if factor == "A" else (value.shape[1] if value.dim() > 1 else -1)
            if ranks.setdefault(module, r) != r:
                problems.append(f"{module}: lora_A and lora_B disagree on the rank")
        elif rest and head and rest.startswith(f"{head}.") and head in saved:
            heads.append(key)
        else:
            problems.append(f"unexpected tensor {key!r}")
    for module in ranks:
        want = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if ranks[module] != want:
            problems.append(f"{module}: rank {ranks[module]} in the tensors, {want} in the config")
        has_both = {f"{PEFT_PREFIX}{module}.lora_{f}.weight" for f in "AB"} <= set(raw)
        if not has_both:
            problems.append(f"{module}: lora_A or lora_B is missing")
    if head in saved and not heads:
        problems.append(f"modules_to_save names {head!r} but its weights are missing")
    return ranks, heads, problems


def _spec_args(config: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """r, lora_alpha, dropout and per-module patterns; rsLoRA's alpha/sqrt(r) is folded into alpha' = alpha*sqrt(r)."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    rs = bool(config.get("use_rslora"))
    alphas = {m: float(_pattern_value(config.get("alpha_pattern") or {}, m, alpha)) for m in ranks}
    if rs:
        alphas = {m: a * math.sqrt(ranks[m]) for m, a in alphas.items()}
        alpha = alpha * math.sqrt(r)
    dropout = float(config.get("lora_dropout") or 0.0)
    if not 0 <= dropout < 1:
        raise CorruptError(f"lora_dropout must be in [0, 1), got {dropout}")
    return {
        "r": r,
        "lora_alpha": alpha,
        "dropout": dropout,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
    }


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_targets(model: Any, config: Mapping[str, Any], ranks: Mapping[str, int]) -> list[str]:
    """Tensors and target_modules must name the same layers, all present in the base and LoRA-capable."""
    from loradar_cli.lora.layers import LORA_CLASSES

    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    modules = dict(model.named_modules())
    matched = {n for n in modules if n and _targeted(targets, n) and not (excluded and _targeted(excluded, n))}
    problems = []
    for module in ranks:
        if module not in modules:
            problems.append(f"{module}: the base has no such layer")
        elif type(modules[module]) not in LORA_CLASSES:
            problems.append(f"{module}: a {type(modules[module]).__name__}; LoRA supports Linear and Conv2d")
        elif module not in matched:
            problems.append(f"{module}: has factors but target_modules does not match it")
    for module in sorted(matched - set(ranks)):
        if type(modules[module]) in LORA_CLASSES:
            problems.append(f"{module}: matched by target_modules but has no factors")
    if not ranks:
        problems.append("no LoRA factors in the tensors")
    return problems


def _targeted(targets: Any, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets or [])


# ---------------------------------------------------------------------------------------------------- bases
def import_base(
    store: Store,
    checkpoint: Path,
    *,
    model: str,
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    dataset: str = "unknown",
    model_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> BaseMeta:
    """A checkpoint fitted elsewhere (safetensors, or .pt through torch.load(weights_only=True)) as a base."""
    import torch

    from loradar_cli.models import create_timm_model, load_checkpoint, load_weights, pretrained_stats

    store.check_free("base", name, overwrite)
    kwargs = dict(model_kwargs or {})
    state = load_checkpoint(checkpoint)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CorruptError(f"{checkpoint}: entries {bad[:3]} are not tensors")
    net = create_timm_model(model, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs)
    load_weights(net, state, str(checkpoint))
    for key, value in net.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CorruptError(f"{checkpoint}: tensor {key!r} holds NaN or infinite values")
    if mean is None or std is None:
        stats = pretrained_stats(net, in_chans)
        if stats is None:
            raise InvalidValueError(
                f"timm has no normalisation for {model!r} with {in_chans} channels: give --mean/--std"
            )
        mean, std = mean or stats[0], std or stats[1]
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise InvalidValueError(f"--mean/--std need {in_chans} values each (std > 0)")
    size = img_size or int((getattr(net, "pretrained_cfg", None) or {}).get("input_size", (in_chans, 224, 224))[-1])
    meta = BaseMeta(
        name=name,
        timm_model=model,
        model_kwargs=kwargs,
        num_classes=num_classes,
        input_size=(in_chans, size, size),
        mean=list(mean),
        std=list(std),
        dataset=dataset,
        fingerprint="",
        origin={"imported": str(checkpoint.resolve()), "sha256": sha256(read_file(checkpoint))},
    )
    store.save_base(meta, net.state_dict(), overwrite=overwrite)
    return store.base_meta(name)
