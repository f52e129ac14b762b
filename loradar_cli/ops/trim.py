"""Singular-value trimming: of a LoRA update ΔW (re-factor to lower rank) or of the full weight W0 + ΔW (AMT §1.9).

`trim_delta`/`trim_deltas` keep the top triplets of ΔW itself (by rank or energy) and return LoRA factors.
`full_weight_trim` follows AMT's code: keep the top q = ⌊keep·min(d_out, d_in)⌋ triplets of the merged weight
and return the new update trimmed(W) − W0. That update is generally *dense* (it removes the tail of W0 too),
so it is no longer a LoRA; `lowrank_or_dense` re-factors it only when its numerical rank is small, otherwise
the caller stores it as a dense ΔW.
"""

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.lora.state import LoraFactors
from loradar_cli.ops._linalg import energy_fraction, flatten, svd64
from loradar_cli.ops.merge import RefactorInfo, refactor

__all__ = ["FullTrimInfo", "full_weight_trim", "lowrank_or_dense", "trim_delta", "trim_deltas"]


class FullTrimInfo(BaseModel):
    """What a full-weight trim kept: q triplets of min_dim, at ratio keep, and the energy (Σσ²) of W kept."""

    model_config = ConfigDict(frozen=True)

    q: int
    min_dim: int
    keep: float
    energy: float


def trim_delta(
    delta: Tensor, rank: int | None = None, energy: float | None = None, *, groups: int = 1
) -> tuple[LoraFactors, RefactorInfo]:
    """Trim one ΔW by SVD to `rank` and/or an `energy` fraction (see `merge.refactor`): factors with scale 1."""
    a, b, info = refactor(delta, rank=rank, energy=energy, groups=groups)
    return LoraFactors(a, b, 1.0), info


def trim_deltas(
    deltas: Mapping[str, Tensor],
    rank: int | None = None,
    energy: float | None = None,
    *,
    groups: Mapping[str, int] | None = None,
) -> tuple[dict[str, LoraFactors], dict[str, RefactorInfo]]:
    """Trim every module of an adapter; returns factors and the per-layer report (kept/original rank, energy)."""
    groups = groups or {}
    factors: dict[str, LoraFactors] = {}
    report: dict[str, RefactorInfo] = {}
    for name, delta in deltas.items():
        try:
            factors[name], report[name] = trim_delta(delta, rank, energy, groups=groups.get(name, 1))
        except IncompatibleError as err:
            raise IncompatibleError(f"layer {name!r}: {err.message}", hint=err.hint) from None
    return factors, report


def full_weight_trim(w0: Tensor, delta: Tensor, keep: float) -> tuple[Tensor, FullTrimInfo]:
    """AMT trim: W = W0 + ΔW (conv flattened), keep its top q = ⌊keep·min(d)⌋ triplets, return trimmed(W) − W0.

    Exact float64 SVD (AMT's code uses a randomised `svd_lowrank`; the exact one gives the same triplets, deterministically).
    q must be >= 1; the returned ΔW has the shape and dtype of `delta` and is dense in general.
    """
    if tuple(w0.shape) != tuple(delta.shape):
        raise IncompatibleError(f"base weight {tuple(w0.shape)} and ΔW {tuple(delta.shape)} differ in shape")
    if not 0.0 < keep <= 1.0:
        raise InvalidValueError(f"keep ratio must be in (0, 1], got {keep}")
    base = flatten(w0).double()
    weight = base + flatten(delta).double()
    min_dim = min(weight.shape)
    q = math.floor(keep * min_dim + 1e-9)  # 1e-9 guards products like 0.29·100 = 28.999…
    if q < 1:
        raise InvalidValueError(f"keep={keep} keeps no singular value of a weight with min dimension {min_dim}")
    u, s, vh = svd64(weight)
    trimmed = (u[:, :q] * s[:q]) @ vh[:q]
    new_delta = (trimmed - base).reshape(delta.shape).to(delta.dtype)
    return new_delta, FullTrimInfo(q=q, min_dim=min_dim, keep=keep, energy=energy_fraction(s, q))


def lowrank_or_dense(
    delta: Tensor, max_rank: int, *, rtol: float | None = None
) -> tuple[LoraFactors, RefactorInfo] | None:
    """Exact LoRA factors of ΔW if its numerical rank is <= max_rank, else None (store ΔW as dense)."""
    if max_rank < 1:
        raise InvalidValueError(f"max_rank must be >= 1, got {max_rank}")
    a, b, info = refactor(delta, rtol=rtol)
    if info.original_rank > max_rank:
        return None
    return LoraFactors(a, b, 1.0), info
