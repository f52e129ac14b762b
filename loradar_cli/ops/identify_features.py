"""Per-input features that carry an attack's signature, as a registry of named feature groups.

Two kinds of group. Member groups read the K members' probabilities [K, B, C] (adapters, and the base when it is a
member): confidences, full probability vectors, disagreement. Input groups read the image alone [B, C, H, W] in
[0, 1] and need no clean reference: the residual after a 3×3 median filter (Xu, Evans, Qi, "Feature Squeezing:
Detecting Adversarial Examples in Deep Neural Networks", NDSS 2018, arXiv 1704.01155, uses the median filter as a
squeezer), plateaus left by sign steps (FGSM's single ±ε step vs PGD's iterated, projected steps and a momentum
sign attack's steps), local concentration of the residual (a pasted rectangle, as in ROA), and high-frequency
energy. Souri et al., "Identification of Attack-Specific Signatures in Adversarial Examples" (arXiv 2110.06802)
show that attack families leave such signatures in the perturbation.

Every group is a pure function of its inputs, so a fitted identifier reproduces its features exactly. Features
are differentiable almost everywhere except `plateau` (counts of exact values: zero gradient, an adaptive attacker
needs a surrogate such as BPDA for them).
"""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.registry import Registry

__all__ = [
    "DEFAULT_CANDIDATES",
    "IDENTIFY_FEATURES",
    "FeatureGroup",
    "FeatureInputs",
    "compute_features",
    "feature_names",
    "median_residual",
    "neighbour_steps",
    "patch_concentration",
    "plateau_stats",
]

EPS_LOG = 1e-6
"""Floor inside logarithms of probabilities and energies (keeps features finite on exact zeros)."""


@dataclass(frozen=True)
class FeatureInputs:
    """What a feature group may read: members' probabilities [K, B, C], the inputs [B, C, H, W], the base's index."""

    probs: Tensor
    x: Tensor | None = None
    base_index: int | None = None
    member_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureGroup:
    """A named block of feature columns: `compute` gives [B, F], `names` the F column names."""

    compute: Callable[[FeatureInputs], Tensor]
    names: Callable[[FeatureInputs], list[str]]
    needs_input: bool
    doc: str


IDENTIFY_FEATURES: Registry[FeatureGroup] = Registry("identification feature group")


def _member_names(inputs: FeatureInputs) -> list[str]:
    """Short member labels for column names: the given names, else m0, m1, ..."""
    k = inputs.probs.shape[0]
    return list(inputs.member_names) if len(inputs.member_names) == k else [f"m{i}" for i in range(k)]


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


# ------------------------------------------------------------------ member groups


def confidence_features(inputs: FeatureInputs) -> Tensor:
    """Per member: max probability, entropy (nats), top1 − top2; per pair: same prediction (1.0 / 0.0)."""
    p = inputs.probs.to(torch.float32)
    top2 = p.topk(2, dim=-1).values  # [K, B, 2]
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    per_member = torch.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1]], dim=-1)  # [K, B, 3]
    columns = [per_member.permute(1, 0, 2).reshape(p.shape[1], -1)]
    pred = p.argmax(dim=-1)
    pairs = [(pred[i] == pred[j]).float() for i, j in _pairs(p.shape[0])]
    if pairs:
        columns.append(torch.stack(pairs, dim=1))
    return torch.cat(columns, dim=1)


def _confidence_names(inputs: FeatureInputs) -> list[str]:
    k = inputs.probs.shape[0]
    names = [f"{stat}_{i}" for i in range(k) for stat in ("maxprob", "entropy", "margin")]
    return names + [f"agree_{i}_{j}" for i, j in _pairs(k)]


def log_odds_features(inputs: FeatureInputs) -> Tensor:
    """Per member: log-odds of its max probability, log p − log(1 − p); resolves confidences near 1."""
    top = inputs.probs.to(torch.float32).max(dim=-1).values.clamp(EPS_LOG, 1 - EPS_LOG)  # [K, B]
    return (top.log() - (-top).log1p()).T


def _log_odds_names(inputs: FeatureInputs) -> list[str]:
    return [f"logodds_{m}" for m in _member_names(inputs)]


def prob_features(inputs: FeatureInputs) -> Tensor:
    """Every member's full log-probability vector [B, K·C] (log p floored at 1e-6)."""
    p = inputs.probs.to(torch.float32)
    return p.clamp_min(EPS_LOG).log().permute(1, 0, 2).reshape(p.shape[1], -1)


def _prob_names(inputs: FeatureInputs) -> list[str]:
    return [f"logp_{m}_{c}" for m in _member_names(inputs) for c in range(inputs.probs.shape[2])]


def disagreement_features(inputs: FeatureInputs) -> Tensor:
    """Pairwise symmetric KL, log1p-compressed; per member, whether it changes the reference's prediction.

    The reference is the base when it is a member, else the most common prediction across members.
    """
    p = inputs.probs.to(torch.float32).clamp_min(EPS_LOG)
    logp = p.log()
    k = p.shape[0]
    columns = [
        torch.log1p(0.5 * ((p[i] - p[j]) * (logp[i] - logp[j])).sum(dim=-1)) for i, j in _pairs(k)
    ]  # 0.5 (KL(i‖j) + KL(j‖i)) = 0.5 Σ (p_i − p_j)(log p_i − log p_j)
    pred = p.argmax(dim=-1)  # [K, B]
    reference = pred[inputs.base_index] if inputs.base_index is not None else pred.mode(dim=0).values
    columns += [(pred[i] != reference).float() for i in range(k) if i != inputs.base_index]
    return torch.stack(columns, dim=1) if columns else torch.zeros(p.shape[1], 0)


def _disagreement_names(inputs: FeatureInputs) -> list[str]:
    names = _member_names(inputs)
    out = [f"skl_{names[i]}_{names[j]}" for i, j in _pairs(len(names))]
    return out + [f"changes_{names[i]}" for i in range(len(names)) if i != inputs.base_index]


# ------------------------------------------------------------------ input statistics (no clean image needed)


def median_residual(x: Tensor) -> Tensor:
    """x − median3×3(x) per channel [B, C, H, W], reflect-padded borders; zero on locally constant images."""
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect") if min(h, w) > 1 else F.pad(x, (1, 1, 1, 1), mode="replicate")
    patches = F.unfold(padded.reshape(b * c, 1, h + 2, w + 2), kernel_size=3)  # [B·C, 9, H·W]
    return x - patches.median(dim=1).values.reshape(b, c, h, w)


RESIDUAL_BIN_CENTRES = tuple(-3.0 + 0.25 * i for i in range(13))
"""log10 |r| bin centres from 1e-3 to 1 (quarter decades); smaller residuals fall in the first bin."""


def _soft_histogram(u: Tensor, centres: Sequence[float]) -> Tensor:
    """Triangular-kernel histogram [B, n_bins] of values u [B, N] (fraction per bin; clamped to the outer bins)."""
    c = torch.tensor(centres, dtype=u.dtype, device=u.device)
    width = float(c[1] - c[0])
    u = u.clamp(float(c[0]), float(c[-1]))
    return F.relu(1 - (u[..., None] - c).abs() / width).mean(dim=1)


def residual_features(inputs: FeatureInputs) -> Tensor:
    """Median-filter residual r: log mean |r|, log RMS r, and the soft histogram of log10 |r| (quarter decades)."""
    r = median_residual(_images(inputs)).flatten(1)
    mean_abs = (r.abs().mean(dim=1) + EPS_LOG).log()
    rms = (r.pow(2).mean(dim=1) + EPS_LOG).log() / 2
    hist = _soft_histogram((r.abs() + 1e-4).log10(), RESIDUAL_BIN_CENTRES)
    return torch.cat([mean_abs[:, None], rms[:, None], hist], dim=1)


def _residual_names(inputs: FeatureInputs) -> list[str]:
    return ["res_logmean", "res_logrms", *(f"res_hist_{c:+.2f}" for c in RESIDUAL_BIN_CENTRES)]


def neighbour_steps(x: Tensor) -> Tensor:
    """|differences| between horizontal and vertical neighbours, flattened per image [B, N]."""
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1)
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
    return torch.cat([dh, dv], dim=1)


def plateau_stats(x: Tensor, levels: int = 255) -> Tensor:
    """Sign-step plateaus [B, 6] on a grid of `levels` steps (1/255: one 8-bit grey level).

    Columns: fraction of neighbour steps that are non-zero; the share of non-zero steps in the most common
    step size (a ±ε sign step leaves steps of 0 and 2ε on flat ground: one dominant size), in the three most
    common; that size in pixel units; the share of distinct pixel values among all pixels; and the share of
    pixels on the 1/`levels` grid (8-bit images before an attack).
    """
    steps = neighbour_steps(x)
    index = (steps * levels).round().long().clamp_(0, levels)  # [B, N]
    counts = torch.zeros(x.shape[0], levels + 1, device=x.device).scatter_add_(1, index, torch.ones_like(steps))
    moving = counts[:, 1:]
    nonzero = moving.sum(dim=1).clamp_min(1)
    top = moving.topk(min(3, levels), dim=1)
    flat = x.flatten(1)
    ordered = flat.sort(dim=1).values
    distinct = 1 + (ordered.diff(dim=1) > 1e-6).sum(dim=1)
    on_grid = ((flat * levels - (flat * levels).round()).abs() < 1e-3).float().mean(dim=1)
    return torch.stack(
        [
            moving.sum(dim=1) / steps.shape[1],
            top.values[:, 0] / nonzero,
            top.values.sum(dim=1) / nonzero,
            (top.indices[:, 0] + 1).float() / levels,
            distinct.float() / flat.shape[1],
            on_grid,
        ],
        dim=1,
    )


def plateau_features(inputs: FeatureInputs) -> Tensor:
    """`plateau_stats` of the inputs (counts of exact values: zero gradient)."""
    return plateau_stats(_images(inputs).detach())


def _plateau_names(inputs: FeatureInputs) -> list[str]:
    return ["step_nonzero", "step_mode_share", "step_top3_share", "step_mode_size", "distinct_values", "on_8bit_grid"]


def patch_windows(height: int, width: int) -> tuple[int, int]:
    """Window sides for the patch features: about 1/8 and 1/4 of the shorter image side (at least 2 and 3)."""
    side = min(height, width)
    return max(2, round(side / 8)), max(3, round(side / 4))


def patch_concentration(energy: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """For energy maps [B, H, W]: log of the largest window mean, and log of its ratio to the image mean.

    A pasted rectangle puts its residual energy into one window; a perturbation spread over the image does not.
    """
    pooled = F.avg_pool2d(energy[:, None], kernel_size=min(window, *energy.shape[-2:]), stride=1).flatten(1)
    peak = pooled.max(dim=1).values
    mean = energy.flatten(1).mean(dim=1)
    return (peak + EPS_LOG).log(), ((peak + EPS_LOG) / (mean + EPS_LOG)).log()


def _laplacian(x: Tensor) -> Tensor:
    """4-neighbour Laplacian per channel [B, C, H, W], replicate-padded."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device)
    b, c, h, w = x.shape
    padded = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel[None, None]).reshape(b, c, h, w)


def patch_features(inputs: FeatureInputs) -> Tensor:
    """Local concentration of |median residual| and |Laplacian| in windows of 1/8 and 1/4 of the image side."""
    x = _images(inputs)
    maps = (median_residual(x).abs().sum(dim=1), _laplacian(x).abs().sum(dim=1))
    columns = [f for energy in maps for w in patch_windows(*x.shape[-2:]) for f in patch_concentration(energy, w)]
    return torch.stack(columns, dim=1)


def _patch_names(inputs: FeatureInputs) -> list[str]:
    return [f"patch_{m}_{w}_{s}" for m in ("res", "lap") for w in ("w8", "w4") for s in ("peak", "ratio")]


FREQUENCY_BANDS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)
"""Radial frequency band edges in cycles per pixel (the corner of the spectrum is at √2/2 ≈ 0.71)."""


def frequency_features(inputs: FeatureInputs) -> Tensor:
    """log mean Laplacian², and the log share of spectral energy (DC removed) in each radial frequency band."""
    x = _images(inputs)
    lap = (_laplacian(x).pow(2).flatten(1).mean(dim=1) + EPS_LOG).log()
    power = torch.fft.rfft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().pow(2).sum(dim=1)  # [B, H, W//2+1]
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device)[:, None]
    fx = torch.fft.rfftfreq(x.shape[-1], device=x.device)[None, :]
    radius = (fy.pow(2) + fx.pow(2)).sqrt()
    total = power.flatten(1).sum(dim=1) + EPS_LOG
    edges = [*FREQUENCY_BANDS[:-1], math.inf]
    bands = [
        ((power * ((radius >= lo) & (radius < hi))).flatten(1).sum(dim=1) + EPS_LOG) / total
        for lo, hi in itertools.pairwise(edges)
    ]
    return torch.stack([lap, *(b.log() for b in bands)], dim=1)


def _frequency_names(inputs: FeatureInputs) -> list[str]:
    edges = [*FREQUENCY_BANDS[:-1], "inf"]
    return ["lap_logenergy", *(f"band_{lo}_{hi}" for lo, hi in itertools.pairwise(edges))]


def _images(inputs: FeatureInputs) -> Tensor:
    """The inputs as float [B, C, H, W]; an input feature without inputs is a caller error."""
    if inputs.x is None:
        raise IncompatibleError("these identification features read the input images; none were given")
    x = inputs.x.to(torch.float32)
    if x.dim() != 4 or x.shape[0] != inputs.probs.shape[1]:
        raise InvalidValueError(f"expected inputs [B, C, H, W] with B = {inputs.probs.shape[1]}, got {tuple(x.shape)}")
    return x


for _name, _compute, _names, _needs_input in (
    ("confidence", confidence_features, _confidence_names, False),
    ("log-odds", log_odds_features, _log_odds_names, False),
    ("probs", prob_features, _prob_names, False),
    ("disagreement", disagreement_features, _disagreement_names, False),
    ("residual", residual_features, _residual_names, True),
    ("plateau", plateau_features, _plateau_names, True),
    ("patch", patch_features, _patch_names, True),
    ("frequency", frequency_features, _frequency_names, True),
):
    IDENTIFY_FEATURES.register(_name)(
        FeatureGroup(_compute, _names, _needs_input, (_compute.__doc__ or "").split("\n")[0])
    )

DEFAULT_CANDIDATES = tuple(IDENTIFY_FEATURES.names())
"""Groups that feature selection starts from when none are given: all of them."""


def feature_names(groups: Sequence[str], inputs: FeatureInputs) -> list[str]:
    """Column names of `compute_features(groups, inputs)`, prefixed by group."""
    return [f"{g}.{n}" for g in groups for n in IDENTIFY_FEATURES.get(g).names(inputs)]


def compute_features(groups: Sequence[str], inputs: FeatureInputs) -> Tensor:
    """Concatenated feature columns [B, F] of the named groups, in the given order."""
    if inputs.probs.dim() != 3 or inputs.probs.shape[0] < 1 or inputs.probs.shape[2] < 2:
        raise InvalidValueError(f"expected probabilities [K, B, C] with C >= 2, got shape {tuple(inputs.probs.shape)}")
    if not groups:
        raise InvalidValueError(f"no feature groups given (valid: {', '.join(IDENTIFY_FEATURES.names())})")
    chunks = [
        FeatureInputs(inputs.probs[:, i : i + CHUNK], _rows(inputs.x, i), inputs.base_index, inputs.member_names)
        for i in range(0, inputs.probs.shape[1], CHUNK)
    ]
    return torch.cat([torch.cat([IDENTIFY_FEATURES.get(g).compute(c) for g in groups], dim=1) for c in chunks])


CHUNK = 256
"""Inputs per feature computation: the 3×3 median unfolds nine copies of each image."""


def _rows(x: Tensor | None, start: int) -> Tensor | None:
    return None if x is None else x[start : start + CHUNK]
