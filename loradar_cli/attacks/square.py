"""Square attack: score-based random search with square-shaped updates, L-inf and L2 (forward passes only).

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020, arXiv:1912.00049; reference code `max-andr/square-attack` and the PyTorch port in
`fra31/auto-attack` (`autoattack/square.py`).
Threat model: ||x_adv - x||_inf <= eps (`square`) or ||x_adv - x||_2 <= eps (`square-l2`), x_adv in [0, 1].

Choices:
* Margin loss z_y - max_{j != y} z_j, minimised; an update is kept when it lowers the loss [paper, code].
* `queries` counts iterations after the initialisation (the reference's n_queries); p_init 0.8 and the
  piecewise-constant schedule of p rescaled to 10,000 iterations, as in AutoAttack's standard version [code].
* Each iteration draws one square position for the whole batch and per-sample, per-channel signs [code];
  positions range over every placement that fits (the reference never places a square on the last row or
  column).
  All random draws are made for the whole batch and then sliced, so the points stopped early (fooled ones)
  do not change what the others draw.
* L-inf: vertical-stripe initialisation, square side round(sqrt(p * H * W)) >= 1 [code]. L2: a grid of
  pseudo-Gaussian squares as initialisation, and updates moving mass between two squares of odd side >= 3 [code].
* Gradients are never computed: the model only runs forward, under `torch.no_grad()`.
"""

import math
from typing import ClassVar, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import clamp01, l2_norm, margin, per_sample, project_linf
from loradar_cli.attacks.base import AttackConfig, ThreatModel, TrackedAttack, Tracker, register_attack

_TINY = 1e-12


class SquareConfig(AttackConfig):
    """Square options: iterations (queries after the first), the initial square fraction and restarts."""

    queries: int = Field(5000, ge=1)
    p_init: float = Field(0.8, gt=0, le=1)
    restarts: int = Field(1, ge=1)


class SquareL2Config(SquareConfig):
    """Square options for L2: eps is an L2 radius in pixel units."""

    eps: float = Field(0.5, ge=0)


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """Fraction of pixels changed at iteration `it`: p_init halved at fixed points of a 10,000-step schedule."""
    it = int(it / queries * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8), (50, 4)):
        if it > bound:
            return p_init / div
    return p_init / 2 if it > 10 else p_init


def _randint(high: int, generator: torch.Generator | None, device: torch.device) -> int:
    """One integer uniform in [0, high) (0 when high <= 0), drawn on `device` from `generator`."""
    return int(torch.randint(max(high, 1), (1,), generator=generator, device=device).item())


def _signs(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform random signs +-1 of `shape` on the device and dtype of `x`."""
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def _eta(h: int, w: int, like: Tensor) -> Tensor:
    """`[h, w]` pseudo-Gaussian bump: nested rectangles weighted 1 / (k + 1)^2 around (h // 2, w // 2), unit L2 norm."""
    delta = torch.zeros(h, w, dtype=like.dtype, device=like.device)
    ch, cw = h // 2, w // 2
    for k in range(max(h // 2, w // 2) + 1):
        delta[max(ch, 0) : min(ch + 2 * k + 1, h), max(cw, 0) : min(cw + 2 * k + 1, w)] += 1.0 / (k + 1) ** 2
        ch, cw = ch - 1, cw - 1
    return delta / delta.square().sum().sqrt().clamp_min(_TINY)


def meta_pseudo_gaussian(s: int, like: Tensor, flip: bool) -> Tensor:
    """`[s, s]` unit-norm pattern: a bump on the top half and its negative below (transposed when `flip`)."""
    delta = torch.cat([_eta(s // 2, s, like), -_eta(s - s // 2, s, like)])
    delta = delta / delta.square().sum().sqrt().clamp_min(_TINY)
    return delta.T if flip else delta


S = TypeVar("S", bound=SquareConfig)


class _SquareBase(TrackedAttack[S]):
    """Random search shared by both norms; subclasses give the initialisation and the candidate update."""

    @torch.no_grad()
    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: Tracker
    ) -> Tensor:
        out = x.clone()
        for _ in range(self.config.restarts):
            start = self._init(x, generator)  # whole batch
            idx = tracker.remaining()
            if len(idx):
                out[idx] = self._run(model, x, y, start, tracker, idx, generator)
        return out

    def _run(
        self,
        model: nn.Module,
        x_all: Tensor,
        y_all: Tensor,
        start: Tensor,
        tracker: Tracker,
        idx: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Random search on points `idx`; returns their lowest-margin iterate (fooled ones are in `tracker`)."""
        x_best = start[idx]
        logits = model(x_best)
        loss = margin(logits, y_all[idx])
        keep = tracker.observe(idx, x_best, logits)
        out, pos = x_best.clone(), torch.arange(len(idx), device=x_all.device)
        for it in range(self.config.queries):
            if not keep.all():
                out[pos] = x_best
                pos, idx, x_best, loss = pos[keep], idx[keep], x_best[keep], loss[keep]
                if not len(idx):
                    return out
            cand = self._candidate(x_all, x_best, idx, it, generator)
            logits = model(cand)
            cand_loss = margin(logits, y_all[idx])
            better = cand_loss < loss
            x_best, loss = torch.where(per_sample(better), cand, x_best), torch.where(better, cand_loss, loss)
            keep = tracker.observe(idx, cand, logits)
        out[pos] = x_best
        return out

    def _init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _candidate(
        self, x_all: Tensor, x_best: Tensor, idx: Tensor, it: int, generator: torch.Generator | None
    ) -> Tensor:
        """A new candidate for the points `idx`, from their current best `x_best`."""
        raise NotImplementedError

    def _side(self, x: Tensor, it: int, smallest: int) -> int:
        """Side of the square at iteration `it`: sqrt(p * H * W), at least `smallest`, at most the image side."""
        p = p_schedule(self.config.p_init, it, self.config.queries)
        side = max(round(math.sqrt(p * x.shape[2] * x.shape[3])), smallest)
        return min(side, x.shape[2], x.shape[3])


@register_attack
class Square(_SquareBase[SquareConfig]):
    """L-inf Square: each iteration sets one random square, per channel, to x +- eps."""

    name: ClassVar[str] = "square"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = SquareConfig

    def _init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        stripes = _signs((x.shape[0], x.shape[1], 1, x.shape[3]), x, generator)
        return clamp01(x + self.config.eps * stripes)

    def _candidate(
        self, x_all: Tensor, x_best: Tensor, idx: Tensor, it: int, generator: torch.Generator | None
    ) -> Tensor:
        s = self._side(x_all, it, 1)
        top = _randint(x_all.shape[2] - s + 1, generator, x_all.device)
        left = _randint(x_all.shape[3] - s + 1, generator, x_all.device)
        signs = _signs((x_all.shape[0], x_all.shape[1], 1, 1), x_all, generator)[idx]
        cand = x_best.clone()
        cand[:, :, top : top + s, left : left + s] += 2 * self.config.eps * signs
        return project_linf(cand, x_all[idx], self.config.eps)


@register_attack
class SquareL2(_SquareBase[SquareL2Config]):
    """L2 Square: each iteration moves perturbation mass into one random square and out of another."""

    name: ClassVar[str] = "square-l2"
    threat_model: ClassVar[ThreatModel] = "l2"
    config_cls: ClassVar[type[AttackConfig]] = SquareL2Config

    def _init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """A grid of pseudo-Gaussian squares with random signs per sample and channel, scaled to radius eps."""
        b, c, h, w = x.shape
        s = max(h // 5, 1)
        first = (h - s * 5) // 2 if h >= s * 5 else 0
        delta = torch.zeros_like(x)
        for top in range(first, h - s + 1, s):
            for left in range(first, w - s + 1, s):
                flip = bool(torch.rand(1, generator=generator, device=x.device).item() > 0.5)
                signs = _signs((b, c, 1, 1), x, generator)
                delta[:, :, top : top + s, left : left + s] += meta_pseudo_gaussian(s, x, flip) * signs
        return clamp01(x + self.config.eps * _unit(delta))

    def _candidate(
        self, x_all: Tensor, x_best: Tensor, idx: Tensor, it: int, generator: torch.Generator | None
    ) -> Tensor:
        x, c, h, w = x_all[idx], x_all.shape[1], x_all.shape[2], x_all.shape[3]
        s = self._side(x_all, it, 3)
        s = s + 1 if s % 2 == 0 and s < min(h, w) else s
        (t1, l1), (t2, l2) = [
            (_randint(h - s + 1, generator, x.device), _randint(w - s + 1, generator, x.device)) for _ in range(2)
        ]
        flip = bool(torch.rand(1, generator=generator, device=x.device).item() > 0.5)
        signs = _signs((x_all.shape[0], c, 1, 1), x_all, generator)[idx]
        delta = x_best - x
        win1 = delta[:, :, t1 : t1 + s, l1 : l1 + s]
        both = torch.zeros_like(delta[:1, :1])
        both[..., t1 : t1 + s, l1 : l1 + s] = 1
        both[..., t2 : t2 + s, l2 : l2 + s] = 1
        room = (self.config.eps**2 - l2_norm(delta).square()).clamp_min(0) / c + l2_norm(delta * both).square()
        new = meta_pseudo_gaussian(s, x, flip) * signs + win1 / (win1.square().sum((2, 3), keepdim=True).sqrt() + _TINY)
        new = new / (new.square().sum((2, 3), keepdim=True).sqrt() + _TINY) * per_sample(room.sqrt())
        delta = delta.clone()
        delta[:, :, t2 : t2 + s, l2 : l2 + s] = 0
        delta[:, :, t1 : t1 + s, l1 : l1 + s] = new
        return clamp01(x + self.config.eps * _unit(delta))


def _unit(delta: Tensor) -> Tensor:
    """Scale each sample to unit L2 norm (zero samples stay zero)."""
    return delta / per_sample(l2_norm(delta).clamp_min(_TINY))
