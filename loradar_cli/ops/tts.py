"""AMT test-time scoring of pool members ("Algorithm 2" as in the authors' code).

Yang, Liu & Wei, "Mixture of Adversarial LoRAs: Boosting Robust Generalization in Meta-Tuning", NeurIPS 2024.

Each adapter i is scored on a labelled support set by how compact (C_i) and how separated (V_i) the augmented
support features are around the clean-support class prototypes; the top-k scores become merge weights.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from loradar_cli.errors import InvalidValueError

__all__ = ["TTSResult", "augment_support", "tts_scores"]


class TTSResult(BaseModel):
    """Per-adapter AMT scores (JSON-serialisable): C, V, score = λC − (1−λ)V, raw w = exp(−β(1−score)), ζ."""

    model_config = ConfigDict(frozen=True)

    compactness: list[float]
    divergence: list[float]
    score: list[float]
    raw_weight: list[float]
    weight: list[float]
    selected: list[int]
    lam: float
    beta: float
    top_k: int


def _check_tts_inputs(features_clean: Tensor, labels: Tensor, features_aug: Tensor, top_k: int) -> None:
    """Shapes: clean and augmented features [P, S, D] alike, labels [S]; top_k >= 1."""
    if features_clean.dim() != 3 or features_clean.shape != features_aug.shape:
        raise InvalidValueError(
            f"features must both be [P, S, D], got {tuple(features_clean.shape)} and {tuple(features_aug.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != features_clean.shape[1]:
        raise InvalidValueError(f"labels must be [S={features_clean.shape[1]}], got {tuple(labels.shape)}")
    if top_k < 1:
        raise InvalidValueError(f"top_k must be >= 1, got {top_k}")


def tts_scores(
    features_clean: Tensor,
    labels: Tensor | Sequence[int],
    features_aug: Tensor,
    *,
    lam: float = 0.6,
    beta: float = 1.0,
    top_k: int = 2,
) -> TTSResult:
    """Score P adapters from their support features: clean [P, S, D], augmented [P, S, D], labels [S].

    Prototypes p_c are the clean class means; g_{s,c} = cos(f(x̃_s), p_c). C_i and V_i are class-balanced means
    (1/N Σ_c 1/K_c Σ_{s∈c}) of g_{s,y_s} and of the mean cosine to the N−1 other prototypes. The top_k raw
    weights (top_k capped at P; ties keep the lower index) are renormalised to sum 1, the others are exactly 0.
    """
    labels = torch.as_tensor(labels, device=features_clean.device).long()
    _check_tts_inputs(features_clean, labels, features_aug, top_k)
    classes, inverse = torch.unique(labels, return_inverse=True)
    n = classes.numel()
    if n < 2:
        raise InvalidValueError(f"test-time scoring needs at least 2 classes in the support set, got {n}")
    onehot = F.one_hot(inverse, n).to(torch.float64)  # [S, N]
    counts = onehot.sum(dim=0)  # [N]
    protos = torch.einsum("psd,sn->pnd", features_clean.to(torch.float64), onehot) / counts[None, :, None]
    aug = F.normalize(features_aug.to(torch.float64), dim=-1)
    g = aug @ F.normalize(protos, dim=-1).transpose(1, 2)  # [P, S, N]
    own = (g * onehot).sum(dim=-1)  # [P, S]
    others = (g.sum(dim=-1) - own) / (n - 1)
    balance = 1.0 / (n * counts[inverse])  # [S]: class-balanced averaging weights
    compact, diverge = own @ balance, others @ balance
    score = lam * compact - (1.0 - lam) * diverge
    raw = torch.exp(-beta * (1.0 - score))
    k = min(top_k, raw.numel())
    selected = torch.argsort(raw, descending=True, stable=True)[:k]
    weight = torch.zeros_like(raw)
    weight[selected] = raw[selected] / raw[selected].sum()
    return TTSResult(
        compactness=compact.tolist(),
        divergence=diverge.tolist(),
        score=score.tolist(),
        raw_weight=raw.tolist(),
        weight=weight.tolist(),
        selected=sorted(selected.tolist()),
        lam=lam,
        beta=beta,
        top_k=k,
    )


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """DiffAugment colour ops in order: x + b, saturation around the channel mean, contrast around the image mean."""
    x = x + brightness.view(-1, 1, 1, 1)
    x_mean = x.mean(dim=1, keepdim=True)
    x = (x - x_mean) * saturation.view(-1, 1, 1, 1) + x_mean
    x_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - x_mean) * contrast.view(-1, 1, 1, 1) + x_mean


def _translate(x: Tensor, shift_h: Tensor, shift_w: Tensor) -> Tensor:
    """out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]], zero where that falls outside (DiffAugment)."""
    _, _, h, w = x.shape
    padded = F.pad(x, [1, 1, 1, 1])
    rows = (torch.arange(h, device=x.device)[None, :] + shift_h[:, None] + 1).clamp(0, h + 1)  # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] + shift_w[:, None] + 1).clamp(0, w + 1)  # [B, W]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment_support(x: Tensor, generator: torch.Generator, *, prob: float = 0.9, ratio: float = 0.125) -> Tensor:
    """One augmented copy of a support batch [B, C, H, W] in [0, 1], deterministic given `generator`.

    With probability `prob` (one draw for the whole batch, else x is returned unchanged): per-sample horizontal
    flip (p = 0.5), brightness shift U[−0.5, 0.5), saturation scale U[0, 2), contrast scale U[0.5, 1.5), and a
    translation by up to round(ratio·side) pixels per axis with zero padding; the result is clamped to [0, 1].
    """
    if x.dim() != 4:
        raise InvalidValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    gen_device = generator.device

    def uniform(n: int) -> Tensor:
        return torch.rand(n, generator=generator, device=gen_device).to(device=x.device, dtype=x.dtype)

    if float(torch.rand(1, generator=generator, device=gen_device)) >= prob:
        return x
    b, _, h, w = x.shape
    flip = uniform(b) < 0.5
    brightness, saturation, contrast = uniform(b) - 0.5, uniform(b) * 2.0, uniform(b) + 0.5
    max_h, max_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    shift_h = torch.randint(-max_h, max_h + 1, (b,), generator=generator, device=gen_device).to(x.device)
    shift_w = torch.randint(-max_w, max_w + 1, (b,), generator=generator, device=gen_device).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = _color(x, brightness, saturation, contrast)
    return _translate(x, shift_h, shift_w).clamp(0.0, 1.0)
