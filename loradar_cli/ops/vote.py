"""Ensemble votes over K attack-specific adapters (the LoRADAR ensemble); probs are [K, B, C] softmax outputs."""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from loradar_cli.errors import InvalidValueError
from loradar_cli.ops._linalg import check_probs, check_weights
from loradar_cli.registry import Registry

__all__ = [
    "DEFAULT_RELIABILITY_KEYS",
    "VOTE_METHODS",
    "Reliability",
    "VoteMethod",
    "majority_vote",
    "normalise_weights",
    "reliability_weights",
    "soft_vote",
    "vote",
    "weighted_vote",
]

DEFAULT_RELIABILITY_KEYS = ("val_robust_acc", "robust_acc", "val_acc")


def majority_vote(probs: Tensor) -> Tensor:
    """ŷ [B] = the class most adapters predict; ties go to the tied class with the largest summed probability."""
    check_probs(probs)
    counts = torch.nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).sum(dim=0)  # [B, C]
    tied = counts == counts.max(dim=-1, keepdim=True).values
    summed = probs.to(torch.float64).sum(dim=0)
    return torch.where(tied, summed, torch.full_like(summed, -math.inf)).argmax(dim=-1)


def normalise_weights(weights: Sequence[float] | Tensor, k: int) -> Tensor:
    """K non-negative, finite, not-all-zero weights scaled to sum 1 (float64)."""
    w = torch.tensor(check_weights(weights, k, convex=True), dtype=torch.float64)
    return w / w.sum()


def weighted_vote(probs: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """ŷ [B] = argmax_c Σᵢ wᵢ·P[i, b, c] with weights normalised to sum 1."""
    check_probs(probs)
    w = normalise_weights(weights, probs.shape[0]).to(probs.device)
    return torch.einsum("k,kbc->bc", w, probs.to(torch.float64)).argmax(dim=-1)


def soft_vote(probs: Tensor) -> Tensor:
    """ŷ [B] = argmax of the mean probability over adapters."""
    check_probs(probs)
    return probs.to(torch.float64).mean(dim=0).argmax(dim=-1)


@dataclass(frozen=True)
class VoteMethod:
    """A registered vote: `decide(probs [K, B, C], weights or None) -> labels [B]`; some need one weight per voter."""

    name: str
    summary: str
    decide: Callable[[Tensor, Sequence[float] | Tensor | None], Tensor]
    needs_weights: bool = False


VOTE_METHODS: Registry[VoteMethod] = Registry("vote method")
for _method in (
    VoteMethod("majority", "the class most voters predict", lambda probs, _: majority_vote(probs)),
    VoteMethod("soft", "argmax of the mean probability", lambda probs, _: soft_vote(probs)),
    VoteMethod("weighted", "argmax of the weighted mean probability", weighted_vote, needs_weights=True),
):
    VOTE_METHODS.add(_method.name, _method)


def vote(probs: Tensor, method: str, weights: Sequence[float] | Tensor | None = None) -> Tensor:
    """Decide with a registered vote method; "weighted" needs weights (e.g. from `reliability_weights`)."""
    if method not in VOTE_METHODS:
        raise InvalidValueError(f"unknown vote method {method!r} (valid: {', '.join(VOTE_METHODS)})")
    spec = VOTE_METHODS.get(method)
    if spec.needs_weights and weights is None:
        raise InvalidValueError(f"the {method} vote needs one weight per adapter")
    return spec.decide(probs, weights)


class Reliability(BaseModel):
    """Per-adapter reliability weights (sum 1), the metric used, and whether uniform weights were a fallback."""

    model_config = ConfigDict(frozen=True)

    weights: list[float]
    key: str | None
    uniform_fallback: bool


def reliability_weights(
    metrics: Sequence[Mapping[str, float]], key_preference: Sequence[str] = DEFAULT_RELIABILITY_KEYS
) -> Reliability:
    """Weights from stored validation metrics: the first key present for every adapter, normalised to sum 1.

    One key is used for all adapters so the numbers are comparable. Without such a key, or when the values are
    not finite and >= 0 or sum to 0, the weights are uniform and `uniform_fallback` is set.
    """
    k = len(metrics)
    if k == 0:
        raise InvalidValueError("no adapters to weight")
    uniform = Reliability(weights=[1.0 / k] * k, key=None, uniform_fallback=True)
    key = next((name for name in key_preference if all(name in m for m in metrics)), None)
    if key is None:
        return uniform
    values = [float(m[key]) for m in metrics]
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) == 0.0:
        return uniform.model_copy(update={"key": key})
    total = sum(values)
    return Reliability(weights=[v / total for v in values], key=key, uniform_fallback=False)
