"""Adapter tensors, the one home of LoRA state: PEFT key names, the factor type, factors → ΔW for Linear and
(grouped) conv, dense deltas, head tensors, and packing factors into the tensors and spec an adapter is stored with.

Keys are PEFT's: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (module names relative to the timm
model), the classifier head's parameters under `base_model.model.<head>.<param>`, and loradar's dense deltas under
`base_model.model.<module>.weight_delta` (PEFT ignores them). Factors use PEFT's layout: Linear A [r, in], B [out, r];
Conv2d A [r, in/g, kh, kw], B [out, r/g, 1, 1]; ΔW = scale·B·A with scale = lora_alpha / r.

A layer with a frozen residual pair (A₀, B₀) and/or a trainable scale α computes
W₀ + s·(α·B·A − B₀·A₀) = W₀ + s·[α·B, −B₀]·[A; A₀]: an exact LoRA of rank 2r. It is stored as such (rank and
alpha per layer in `rank_pattern`/`alpha_pattern`, the scale s unchanged), so loradar and PEFT load it onto the
plain base, and every adapter initialised from the same base shares that base. Where 2r exceeds what the layer
can hold (min(d_out, d_in), e.g. the 3×3 conv of a 1-channel input), the same ΔW is re-factored exactly by SVD.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from loradar_cli.errors import IncompatibleError
from loradar_cli.lora.inject import lora_layers
from loradar_cli.lora.layers import conv_delta
from loradar_cli.lora.spec import LoraSpec

PEFT_PREFIX = "base_model.model."
DENSE_SUFFIX = "weight_delta"


def factor_keys(module: str) -> tuple[str, str]:
    """Keys of a module's LoRA factors (A, B) as PEFT stores them."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def dense_key(module: str) -> str:
    """Key of a dense ΔW stored with an adapter (loradar only: PEFT ignores it)."""
    return f"{PEFT_PREFIX}{module}.{DENSE_SUFFIX}"


def head_prefix(head: str) -> str:
    """Prefix of the keys of the classifier head's parameters stored with an adapter."""
    return f"{PEFT_PREFIX}{head}."


class LoraFactors(NamedTuple):
    """One layer's LoRA factors in PEFT layout; ΔW = scale·B·A (scale = lora_alpha / r)."""

    a: Tensor
    b: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def alpha(self) -> float:
        """PEFT's lora_alpha for these factors (scale·r)."""
        return self.scale * self.rank


def factor_groups(a: Tensor, b: Tensor) -> int:
    """Infer the groups of LoRA factors from their shapes: 1 for Linear, r / (r/g) for conv (B [out, r/g, 1, 1])."""
    if a.dim() == 2:
        return 1
    r, r_per_group = a.shape[0], b.shape[1]
    if r_per_group == 0 or r % r_per_group or b.shape[2:] != (1, 1):
        raise IncompatibleError(f"conv LoRA factors do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return r // r_per_group


def factors_to_delta(factors: LoraFactors | tuple) -> Tensor:
    """ΔW = scale·B·A for Linear (2-D) or Conv2d (4-D, groups inferred) factors."""
    f = LoraFactors(*factors)
    if f.a.dim() == 2 and f.b.dim() == 2:
        if f.b.shape[1] != f.a.shape[0]:
            raise IncompatibleError(f"LoRA factors do not fit: A {tuple(f.a.shape)}, B {tuple(f.b.shape)}")
        return (f.b @ f.a) * f.scale
    if f.a.dim() == 4 and f.b.dim() == 4:
        return conv_delta(f.a, f.b, factor_groups(f.a, f.b)) * f.scale
    raise IncompatibleError(f"LoRA factors must be both 2-D or both 4-D: A {tuple(f.a.shape)}, B {tuple(f.b.shape)}")


def stored_factors(spec: LoraSpec, tensors: Mapping[str, Tensor]) -> dict[str, LoraFactors]:
    """The stored LoRA factors of every target layer (float32) with their scale lora_alpha / r."""
    out = {}
    for name in spec.targets:
        a_key, b_key = factor_keys(name)
        out[name] = LoraFactors(
            tensors[a_key].float(), tensors[b_key].float(), spec.alpha_of(name) / spec.rank_of(name)
        )
    return out


def stored_groups(spec: LoraSpec, tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Conv groups of every LoRA layer of a stored adapter (1 for Linear)."""
    return {name: factor_groups(f.a, f.b) for name, f in stored_factors(spec, tensors).items()}


def stored_deltas(spec: LoraSpec, tensors: Mapping[str, Tensor], dense: Sequence[str] = ()) -> dict[str, Tensor]:
    """ΔW of every adapted layer of a stored adapter (float32): s·B·A per LoRA layer plus the dense deltas named."""
    deltas = {name: factors_to_delta(f) for name, f in stored_factors(spec, tensors).items()}
    for name in dense:
        delta = tensors[dense_key(name)].float()
        deltas[name] = deltas[name] + delta if name in deltas else delta
    return deltas


def head_tensors(tensors: Mapping[str, Tensor], spec: LoraSpec) -> dict[str, Tensor]:
    """The classifier parameters stored with an adapter, keyed by parameter name ('weight', 'bias')."""
    if not spec.head:
        return {}
    prefix = head_prefix(spec.head)
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def pack(
    layers: Mapping[str, LoraFactors], dense: Mapping[str, Tensor], head_name: str | None, head: Mapping[str, Tensor]
) -> tuple[LoraSpec, dict[str, Tensor]]:
    """LoraSpec with per-layer rank/alpha patterns, and the tensors under PEFT's key names."""
    tensors: dict[str, Tensor] = {}
    for name, f in layers.items():
        a_key, b_key = factor_keys(name)
        tensors[a_key], tensors[b_key] = f.a.contiguous(), f.b.contiguous()
    tensors.update({dense_key(name): d.contiguous() for name, d in dense.items()})
    if head_name:
        tensors.update({f"{head_prefix(head_name)}{p}": t.contiguous() for p, t in head.items()})
    r = max((f.rank for f in layers.values()), default=1)
    spec = LoraSpec(
        r=r,
        lora_alpha=float(r),
        targets=list(layers),
        head=head_name if head else None,
        rank_pattern={n: f.rank for n, f in layers.items()},
        alpha_pattern={n: f.alpha for n, f in layers.items()},
    )
    return spec, tensors


def _named_adapter_params(model: nn.Module, spec: LoraSpec) -> Iterable[tuple[str, Tensor]]:
    """(key, parameter) of every factor of an injected model and of its head, under PEFT's key names."""
    for name, layer in lora_layers(model).items():
        a_key, b_key = factor_keys(name)
        yield a_key, layer.lora_A.weight
        yield b_key, layer.lora_B.weight
    if spec.head:
        for pname, p in model.get_submodule(spec.head).named_parameters():
            yield f"{head_prefix(spec.head)}{pname}", p


def lora_state_dict(model: nn.Module, spec: LoraSpec) -> dict[str, Tensor]:
    """LoRA factors (and head) under PEFT's key names, detached, contiguous, on the CPU."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in _named_adapter_params(model, spec)}


def lora_state_dict_shapes(model: nn.Module, spec: LoraSpec) -> Iterable[tuple[str, torch.Size]]:
    """(key, shape) of every tensor `lora_state_dict` would return, without copying."""
    return ((k, p.shape) for k, p in _named_adapter_params(model, spec))


def load_lora_state_dict(model: nn.Module, spec: LoraSpec, tensors: Mapping[str, Tensor]) -> None:
    """Copy stored factors (and head) into an injected model; missing, extra or misshaped keys are errors."""
    expected = dict(lora_state_dict_shapes(model, spec))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise IncompatibleError(f"adapter tensors do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, param in _named_adapter_params(model, spec):
            value = tensors[key]
            if value.shape != param.shape:
                raise IncompatibleError(f"{key}: stored shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def adapter_tensors(model: nn.Module, spec: LoraSpec) -> tuple[LoraSpec, dict[str, Tensor]]:
    """(spec, tensors) to store for an injected `model`: plain factors as they are, extended layers folded."""
    layers = lora_layers(model)
    tensors = lora_state_dict(model, spec)
    if all(layer.plain for layer in layers.values()):
        return spec, tensors
    ranks, alphas = dict(spec.rank_pattern), dict(spec.alpha_pattern)
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = within_rank(*layer.factors())
            a_key, b_key = factor_keys(name)
            tensors[a_key] = a.detach().cpu().contiguous().clone()
            tensors[b_key] = b.detach().cpu().contiguous().clone()
            ranks[name] = a.shape[0]
            alphas[name] = layer.scaling * a.shape[0]
    r = max(ranks.values())
    lora_alpha = next(alphas[n] for n in ranks if ranks[n] == r)
    ranks = {n: k for n, k in ranks.items() if k != r}
    alphas = {n: v for n, v in alphas.items() if v != lora_alpha}
    stored = spec.model_copy(update={"r": r, "lora_alpha": lora_alpha, "rank_pattern": ranks, "alpha_pattern": alphas})
    return LoraSpec.model_validate(stored.model_dump()), tensors


def within_rank(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (A, B) of the same ΔW = B·A with at most min(d_out, d_in) rows of A (an exact SVD re-factoring)."""
    d_out, d_in = b.shape[0], a[0].numel()
    m = min(d_out, d_in)
    if a.shape[0] <= m or b.shape[1] != a.shape[0]:  # grouped conv factors (B holds r/groups columns): as they are
        return a, b
    u, s, vh = torch.linalg.svd(b.flatten(1).double() @ a.flatten(1).double(), full_matrices=False)
    root = s[:m].sqrt()
    new_b = (u[:, :m] * root).to(b.dtype).reshape(d_out, m, *b.shape[2:])
    new_a = (root[:, None] * vh[:m]).to(a.dtype).reshape(m, *a.shape[1:])
    return new_a, new_b


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's state dict of an injected `model`, LoRA branches dropped (their base weights kept)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value.detach().cpu().contiguous().clone()
    return out
