"""Target selection (presets, regex, suffixes) and LoRA injection; the tensors an adapter is stored with (PEFT's
key names, state dicts, ΔW) live in `loradar_cli.lora.state`.

Module names are relative to the timm model, as PEFT names them for `get_peft_model(timm_model, LoraConfig(...))`.
"""

import re
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from loradar_cli.errors import IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.lora.layers import LORA_CLASSES, LoraConv2d, LoraLayer
from loradar_cli.lora.spec import LoraSpec

_BLOCK_CONV1 = re.compile(r"(.*\.)?(layer\d+|stages\.\d+(\.blocks)?)\.\d+\.conv1")
_ATTN_MLP = re.compile(r"(.*\.)?(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")

PRESETS: dict[str, str] = {
    "block-conv1": "first conv of every residual block (the LoRADAR placement on ResNets)",
    "convs": "every non-grouped Conv2d",
    "attn-mlp": "attention qkv/proj and MLP fc1/fc2 linears (ViTs)",
    "all": "every non-grouped Conv2d and every Linear except the classifier head",
}


def classifier_name(model: nn.Module) -> str | None:
    """The timm classifier module name (pretrained_cfg['classifier']), if the model has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if name is None:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return name if isinstance(module, nn.Linear) else None


def _is_supported(module: nn.Module) -> bool:
    return type(module) in LORA_CLASSES


def _preset_match(preset: str, name: str, module: nn.Module) -> bool:
    grouped = isinstance(module, nn.Conv2d) and module.groups > 1
    if preset == "block-conv1":
        return isinstance(module, nn.Conv2d) and not grouped and bool(_BLOCK_CONV1.fullmatch(name))
    if preset == "convs":
        return isinstance(module, nn.Conv2d) and not grouped
    if preset == "attn-mlp":
        return isinstance(module, nn.Linear) and bool(_ATTN_MLP.fullmatch(name))
    if preset == "all":
        return not grouped
    raise AssertionError(preset)


def _is_regex(pattern: str) -> bool:
    return any(ch in pattern for ch in "*+?[]()|\\^$")


def _pattern_match(pattern: str, name: str) -> bool:
    """PEFT semantics: a pattern with regex characters is a full match; a comma list holds exact names or suffixes."""
    if _is_regex(pattern):
        return re.fullmatch(pattern, name) is not None
    return any(name == part or name.endswith("." + part) for part in (p.strip() for p in pattern.split(",")) if part)


def select_targets(model: nn.Module, targets: str, *, exclude: Iterable[str] = ()) -> list[str]:
    """Resolve a preset name, regex or suffix list to the exact names of supported layers (head excluded)."""
    if not targets.strip():
        raise InvalidValueError("targets must not be empty", hint=f"presets: {', '.join(PRESETS)}")
    if targets not in PRESETS and _is_regex(targets):
        try:
            re.compile(targets)
        except re.error as err:
            raise InvalidValueError(f"targets {targets!r} is not a valid regular expression: {err}") from None
    head = classifier_name(model)
    excluded = set(exclude) | ({head} if head else set())
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or name in excluded or not _is_supported(module):
            continue
        hit = _preset_match(targets, name, module) if targets in PRESETS else _pattern_match(targets, name)
        if hit:
            if isinstance(module, nn.Conv2d) and module.groups > 1 and targets not in PRESETS:
                _check_grouped(name, module)
            chosen.append(name)
    if not chosen:
        raise NotFoundError(
            f"no layer of this model matches targets {targets!r}",
            hint=f"presets: {', '.join(PRESETS)}; or a regex / comma list of module-name suffixes",
        )
    return chosen


def default_targets(model: nn.Module) -> str:
    """The preset that fits the family: block-conv1 on ResNets, attn-mlp on ViTs, else every plain conv."""
    for preset in ("block-conv1", "attn-mlp", "convs"):
        if any(_preset_match(preset, n, m) for n, m in model.named_modules() if n and _is_supported(m)):
            return preset
    return "all"


def _check_grouped(name: str, module: nn.Conv2d) -> None:
    if module.groups == module.in_channels:
        raise IncompatibleError(f"{name} is a depthwise conv (groups={module.groups}); depthwise convs are excluded")


def inject_lora(model: nn.Module, spec: LoraSpec) -> dict[str, LoraLayer]:
    """Wrap every target of `spec` in a LoRA layer (in place); freeze everything but LoRA factors and head."""
    check_allocatable(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LoraLayer] = {}
    for name in spec.targets:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise IncompatibleError(f"adapter targets layer {name!r}, which this model does not have") from None
        cls = LORA_CLASSES.get(type(base))
        if cls is None:
            raise IncompatibleError(f"layer {name!r} is a {type(base).__name__}; LoRA supports Linear and Conv2d")
        layer = cls(base, spec.rank_of(name), spec.alpha_of(name), spec.dropout)
        replace_module(model, name, layer)
        layers[name] = layer
    if spec.head:
        for p in model.get_submodule(spec.head).parameters():
            p.requires_grad_(True)
    return layers


def max_rank(module: nn.Module) -> int | None:
    """The largest useful LoRA rank of a layer: the rank ΔW can reach (None for unsupported modules)."""
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.out_channels, module.in_channels // module.groups * kh * kw)
    return None


def check_ranks(model: nn.Module, spec: LoraSpec) -> None:
    """Refuse a rank beyond what a target layer's ΔW can hold, before any factor is allocated."""
    for name in spec.targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # inject_lora names the missing layer
        limit = max_rank(module.base_layer if isinstance(module, LoraLayer) else module)
        if limit is not None and spec.rank_of(name) > limit:
            raise InvalidValueError(
                f"rank {spec.rank_of(name)} is more than layer {name!r} can use (at most {limit})",
                hint="pick a smaller --rank",
            )


def check_allocatable(model: nn.Module, spec: LoraSpec) -> None:
    """Refuse a rank beyond a layer's largest dimension before any factor is allocated (a typo, not an adapter).

    Ranks between the useful maximum (`max_rank`) and that bound are wasteful but valid, as in adapters stored
    by earlier versions, so they load; new adapters get capped ranks (`capped_ranks`).
    """
    for name in spec.targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # inject_lora names the missing layer
        module = module.base_layer if isinstance(module, LoraLayer) else module
        weight = getattr(module, "weight", None)
        bound = max(weight.shape[0], weight[0].numel()) if isinstance(weight, Tensor) and weight.dim() >= 2 else None
        if bound is not None and spec.rank_of(name) > bound:
            raise InvalidValueError(
                f"rank {spec.rank_of(name)} is more than layer {name!r} can hold (its largest dimension is {bound})",
                hint="pick a smaller --rank",
            )


def capped_ranks(model: nn.Module, targets: list[str], r: int) -> dict[str, int]:
    """Per-layer ranks for a uniform `r` that some targets cannot use: each capped at its layer's `max_rank`.

    A rank beyond what every target can hold is a typo (or a request for terabytes of factors): refused.
    """
    limits = {name: max_rank(model.get_submodule(name)) for name in targets}
    known = [limit for limit in limits.values() if limit is not None]
    if known and r > max(known):
        raise InvalidValueError(
            f"rank {r} is more than any target layer can use (at most {max(known)})", hint="pick a smaller --rank"
        )
    return {name: limit for name, limit in limits.items() if limit is not None and r > limit}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA wrappers inside `model`, keyed by the name of the layer they wrap."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` (dotted path) is: the one place the LoRA code rewires a model."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


_MOVED_TO_STATE = ("PEFT_PREFIX", "head_tensors", "load_lora_state_dict", "lora_state_dict", "lora_state_dict_shapes")


def __getattr__(name: str) -> Any:
    """Old import path of the state-dict helpers (kept one release): they live in `loradar_cli.lora.state`."""
    if name in _MOVED_TO_STATE:
        from loradar_cli.lora import state

        return getattr(state, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "LoraConv2d",
    "capped_ranks",
    "check_allocatable",
    "check_ranks",
    "classifier_name",
    "default_targets",
    "inject_lora",
    "lora_layers",
    "max_rank",
    "replace_module",
    "select_targets",
    "trainable_parameters",
]
