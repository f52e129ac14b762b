"""Shared helpers for ΔW-space maths: flattening conv kernels, exact float64 SVD, numerical rank, weights, and the
shape check of stacked member probabilities (votes and identification)."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from loradar_cli.errors import IncompatibleError, InvalidValueError

ENERGY_TOL = 1e-12
"""Slack when comparing cumulative energy fractions, so `energy=1.0` is reachable despite float64 rounding."""


def flatten(w: Tensor) -> Tensor:
    """View a Linear [out, in] or Conv2d [out, in/g, kh, kw] weight as the matrix [out, in/g·kh·kw]."""
    if w.dim() not in (2, 4):
        raise IncompatibleError(f"expected a 2-D (Linear) or 4-D (Conv2d) weight, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def svd64(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float64 (exact and deterministic, unlike randomised low-rank SVD): U [m, k], S [k], Vh [k, n]."""
    return torch.linalg.svd(m.to(torch.float64), full_matrices=False)


def numerical_rank(s: Tensor, shape: Sequence[int], dtype: torch.dtype, rtol: float | None = None) -> int:
    """Count singular values above rtol·σ_max (default rtol = max(m, n)·eps(dtype), numpy's matrix_rank rule)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    if rtol is None:
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
        rtol = max(shape) * eps
    return int((s > rtol * s[0]).sum())


def energy_fraction(s: Tensor, k: int) -> float:
    """Fraction of squared-singular-value energy kept by the top k triplets (1.0 for an all-zero matrix)."""
    total = float((s * s).sum())
    return 1.0 if total == 0.0 else float((s[:k] * s[:k]).sum()) / total


def check_weights(
    weights: Sequence[float] | Tensor, n: int, what: str = "adapters", *, convex: bool = False
) -> list[float]:
    """The one weight validator: one finite weight per item, as Python floats.

    `convex` also requires them >= 0 and not all zero (votes and mixtures, which are normalised to sum 1).
    """
    values = [float(w) for w in (weights.flatten().tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != n:
        raise InvalidValueError(f"got {len(values)} weights for {n} {what}")
    if not all(math.isfinite(w) for w in values):
        raise InvalidValueError(f"weights must be finite, got {values}")
    if convex and (any(w < 0 for w in values) or sum(values) == 0.0):
        raise InvalidValueError(f"weights must be >= 0 and not all zero, got {values}")
    return values


def check_probs(probs: Tensor, min_classes: int = 1) -> None:
    """The one shape check of member probabilities: [K, B, C] with K >= 1 and C >= `min_classes`."""
    if probs.dim() != 3 or probs.shape[0] < 1 or probs.shape[2] < min_classes:
        more = f" with C >= {min_classes}" if min_classes > 1 else ""
        raise InvalidValueError(f"expected probabilities [K, B, C]{more}, got shape {tuple(probs.shape)}")
