"""Merging LoRA adapters in ΔW space: linear, TIES, exact concatenation, SVD re-factoring; the merge registry.

Every adapter is a dict `deltas: {module name: ΔW}` with ΔW already scaled (ΔW = s·B·A; Linear [out, in],
Conv2d [out, in/g, kh, kw]). Merging ΔW directly avoids the cross terms of a factor-wise linear merge (averaging A
and B separately); weights [1, 0, …] reproduce the first adapter exactly. Factors are `lora.state.LoraFactors`
(PEFT's layout). AMT's test-time scoring lives in `ops.tts` and is re-exported here.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.lora.state import LoraFactors, factor_groups, factors_to_delta
from loradar_cli.ops._linalg import ENERGY_TOL, check_weights, energy_fraction, flatten, numerical_rank, svd64
from loradar_cli.ops.tts import TTSResult, augment_support, tts_scores
from loradar_cli.registry import Registry

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "RefactorInfo",
    "TTSResult",
    "augment_support",
    "cat_merge",
    "check_compatible",
    "linear_merge",
    "merge_heads",
    "refactor",
    "ties_merge",
    "tts_scores",
]

DEFAULT_TIES_DENSITY = 0.2
"""TIES keeps the top 20 % magnitudes of each task vector (the paper's k = 20 %)."""


class RefactorInfo(BaseModel):
    """What an SVD re-factoring kept: rank, numerical rank of the input, energy (Σσ²) kept, relative error."""

    model_config = ConfigDict(frozen=True)

    rank: int
    original_rank: int
    energy: float
    rel_error: float


def check_compatible(deltas_list: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise IncompatibleError naming the first module or shape that differs from the first adapter."""
    if not deltas_list:
        raise InvalidValueError("nothing to merge: no adapters given")
    label = list(names) if names is not None else [f"adapter #{i}" for i in range(len(deltas_list))]
    ref = deltas_list[0]
    for i, other in enumerate(deltas_list[1:], start=1):
        missing = [k for k in ref if k not in other]
        if missing:
            raise IncompatibleError(f"{label[i]} has no module {missing[0]!r}, which {label[0]} adapts")
        extra = [k for k in other if k not in ref]
        if extra:
            raise IncompatibleError(f"{label[i]} adapts module {extra[0]!r}, which {label[0]} does not")
        for key, value in ref.items():
            if tuple(other[key].shape) != tuple(value.shape):
                raise IncompatibleError(
                    f"module {key!r}: {label[i]} has shape {tuple(other[key].shape)}, "
                    f"{label[0]} has {tuple(value.shape)}"
                )


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ wᵢ·tᵢ accumulated in float64, skipping zero weights so [1, 0, …] returns t₀ bit-exactly."""
    acc: Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if w == 0.0:
            continue
        term = t.to(torch.float64) * w
        acc = term if acc is None else acc + term
    ref = tensors[0]
    return torch.zeros_like(ref) if acc is None else acc.to(ref.dtype)


def linear_merge(deltas_list: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Exact task arithmetic in ΔW space: Σ wᵢ·ΔWᵢ per module (negative weights subtract an adapter)."""
    check_compatible(deltas_list)
    w = check_weights(weights, len(deltas_list))
    return {key: _weighted_sum([d[key] for d in deltas_list], w) for key in deltas_list[0]}


def _ties_layer(stack: Tensor, density: float) -> Tensor:
    """TIES on one layer: trim each row to its top-k |entries|, elect sign by summed mass, disjoint mean."""
    flat = stack.reshape(stack.shape[0], -1)
    k = max(1, int(density * flat.shape[1] + 1e-9))
    if k < flat.shape[1]:
        # A stable sort makes the kept set deterministic when magnitudes tie (earlier entries win).
        order = torch.argsort(flat.abs(), dim=1, descending=True, stable=True)[:, :k]
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
        flat = flat * keep
    elected = torch.where(flat.sum(dim=0) >= 0, 1.0, -1.0).to(flat.dtype)
    agree = torch.sign(flat) == elected  # zeros (trimmed or absent) never agree
    count = agree.sum(dim=0)
    total = (flat * agree).sum(dim=0)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged.reshape(stack.shape[1:])


def ties_merge(
    deltas_list: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    density: float = DEFAULT_TIES_DENSITY,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """TIES-Merging (Yadav et al., NeurIPS 2023) on ΔW: τᵢ = wᵢ·ΔWᵢ, trim, elect, disjoint mean, times `scale`.

    Per module: keep the top ⌊density·numel⌋ magnitudes of each τᵢ (at least one; TIES trims per model, this
    trims per layer as mergekit does), elect the sign of Σᵢ τ̂ᵢ (≥ 0 → +, mergekit's "sum" rule), then average
    the non-zero τ̂ᵢ entries with the elected sign (entries nobody agrees on are 0) and multiply by `scale`
    (TIES' λ). Unlike mergekit, weights scale ΔW before TIES, so the mean is a plain mean over agreeing adapters.
    """
    if not 0.0 < density <= 1.0:
        raise InvalidValueError(f"TIES density must be in (0, 1], got {density}")
    check_compatible(deltas_list)
    w = check_weights(weights, len(deltas_list))
    out: dict[str, Tensor] = {}
    for key, ref in deltas_list[0].items():
        stack = torch.stack([d[key].to(torch.float64) * wi for d, wi in zip(deltas_list, w, strict=True)])
        out[key] = (_ties_layer(stack, density) * scale).to(ref.dtype)
    return out


def _cat_layer(parts: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Concatenate one layer's factors along the rank dim; conv ranks are interleaved per group to stay grouped."""
    bs = [p.b * (w * p.scale) for p, w in zip(parts, weights, strict=True)]
    if parts[0].a.dim() == 2:
        return LoraFactors(torch.cat([p.a for p in parts], dim=0), torch.cat(bs, dim=1), 1.0)
    groups = {factor_groups(p.a, p.b) for p in parts}
    if len(groups) != 1:
        raise IncompatibleError(f"cannot concatenate conv factors with different groups {sorted(groups)}")
    g = groups.pop()
    a_blocks = [p.a.reshape(g, -1, *p.a.shape[1:]) for p in parts]  # [g, r_i/g, in/g, kh, kw]
    a = torch.cat(a_blocks, dim=1).reshape(-1, *parts[0].a.shape[1:])
    return LoraFactors(a, torch.cat(bs, dim=1), 1.0)


def cat_merge(
    factors_list: Sequence[Mapping[str, LoraFactors | tuple]], weights: Sequence[float]
) -> dict[str, LoraFactors]:
    """Exact merge by concatenation: A' = cat(Aᵢ), B' = cat(wᵢ·sᵢ·Bᵢ), rank Σrᵢ, scale 1, so B'A' = Σ wᵢ·ΔWᵢ."""
    if not factors_list:
        raise InvalidValueError("nothing to merge: no adapters given")
    w = check_weights(weights, len(factors_list))
    parsed = [{k: LoraFactors(*v) for k, v in f.items()} for f in factors_list]
    check_compatible([{k: factors_to_delta(v) for k, v in f.items()} for f in parsed])
    return {key: _cat_layer([f[key] for f in parsed], w) for key in parsed[0]}


def _choose_rank(s: Tensor, full: int, min_dim: int, rank: int | None, energy: float | None) -> int:
    """Rank to keep: exact numerical rank by default; smallest k reaching `energy`; capped by `rank`."""
    k = max(full, 1)
    if energy is not None:
        total = float((s * s).sum())
        if total > 0.0:
            cum = torch.cumsum(s * s, dim=0) / total
            k = min(int((cum < energy - ENERGY_TOL).sum()) + 1, k)
        k = min(k, rank) if rank is not None else k
    elif rank is not None:
        k = min(rank, min_dim)
    return max(1, k)


def refactor(
    delta: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    groups: int = 1,
    rtol: float | None = None,
) -> tuple[Tensor, Tensor, RefactorInfo]:
    """Re-factor ΔW into balanced LoRA factors (scale 1) by exact float64 SVD of the flattened ΔW.

    Energy means squared singular values: kept energy = Σσ²_kept / Σσ². With neither `rank` nor `energy` the
    exact numerical rank is kept (σ > rtol·σ_max, rtol default max(m, n)·eps(dtype); at least 1), which
    reconstructs ΔW to float tolerance. `rank=k` keeps the top k triplets (capped at min(m, n); zero triplets
    are kept if k exceeds the numerical rank). `energy=e` keeps the smallest k with kept energy ≥ e (never past
    the numerical rank); given both, `rank` caps that k. Factors: B = U_k·√σ, A = √σ·V_kᵀ, returned in ΔW's
    dtype, conv layout A [k, in, kh, kw], B [out, k, 1, 1]. Grouped convs are refused (block structure).
    """
    if groups != 1:
        raise IncompatibleError(f"SVD re-factoring supports groups == 1 only, got groups={groups}")
    if rank is not None and rank < 1:
        raise InvalidValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InvalidValueError(f"energy must be in (0, 1], got {energy}")
    m = flatten(delta)
    u, s, vh = svd64(m)
    full = numerical_rank(s, m.shape, delta.dtype, rtol)
    k = _choose_rank(s, full, min(m.shape), rank, energy)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(delta.dtype)
    a = (root[:, None] * vh[:k]).to(delta.dtype)
    if delta.dim() == 4:
        a = a.reshape(k, *delta.shape[1:])
        b = b.reshape(delta.shape[0], k, 1, 1)
    kept = energy_fraction(s, k)
    info = RefactorInfo(rank=k, original_rank=full, energy=kept, rel_error=math.sqrt(max(0.0, 1.0 - kept)))
    return a, b, info


def merge_heads(heads_list: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted sum Σ wᵢ·headᵢ of classifier heads ({"weight": [C, D], "bias": [C]}); shapes must agree."""
    if not heads_list:
        raise InvalidValueError("nothing to merge: no heads given")
    check_compatible(heads_list, names=[f"head #{i}" for i in range(len(heads_list))])
    w = check_weights(weights, len(heads_list), what="heads")
    return {key: _weighted_sum([h[key] for h in heads_list], w) for key in heads_list[0]}


# ---------------------------------------------------------------- the merge-method registry

DeltaMerge = Callable[[Sequence[Mapping[str, Tensor]], Sequence[float], float], dict[str, Tensor]]


def _uniform(k: int) -> list[float]:
    return [1.0 / k] * k


def _ones(k: int) -> list[float]:
    return [1.0] * k


def _sum_to_one(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum 1 (if they can be): for methods that average rather than add."""
    total = sum(weights)
    return [w / total for w in weights] if total != 0.0 else list(weights)


@dataclass(frozen=True)
class MergeMethod:
    """One way of merging adapters, everything the merge job needs to know about it.

    `merge(deltas_list, weights, density)` combines ΔWs (re-factored by SVD afterwards); None means the method
    concatenates the LoRA factors exactly instead. `default_weights(k)` applies when the user gives none;
    `head_weights` maps the merge weights to the classifier heads' weights; `scored` methods take their weights
    from AMT's test-time scores on a support set, never from the user.
    """

    name: str
    summary: str
    merge: DeltaMerge | None
    default_weights: Callable[[int], list[float]] = _uniform
    head_weights: Callable[[Sequence[float]], list[float]] = list
    scored: bool = False
    uses_density: bool = False


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a merge method (and its name to `loradar_cli.names.MERGE_METHODS`)."""
    return MERGE_METHODS.add(method.name, method)


def _linear(deltas_list: Sequence[Mapping[str, Tensor]], weights: Sequence[float], density: float) -> dict[str, Tensor]:
    return linear_merge(deltas_list, weights)


register_merge_method(MergeMethod("linear", "task arithmetic Σ wᵢ·ΔWᵢ (exact in ΔW space)", _linear))
register_merge_method(
    MergeMethod(
        "tts",
        "AMT test-time scores on a support set weight a linear merge (Liu et al.)",
        _linear,
        scored=True,
    )
)
register_merge_method(
    MergeMethod(
        "ties",
        "TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023)",
        ties_merge,
        default_weights=_ones,
        head_weights=_sum_to_one,
        uses_density=True,
    )
)
register_merge_method(MergeMethod("cat", "exact concatenation of the LoRA factors (rank Σ rᵢ)", None))
