"""APGD and APGD-T: step-size-free PGD with momentum and checkpoints, L-inf and L2.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, arXiv:2003.01690; reference code `fra31/auto-attack` (`autoattack/autopgd_base.py`).
Threat model: ||x_adv - x||_inf <= eps (`apgd`, `apgd-t`) or ||x_adv - x||_2 <= eps (`apgd-l2`, `apgd-t-l2`),
x_adv in [0, 1].

Choices:
* Step size starts at 2 eps per point; momentum 0.75; the first step has no momentum [paper, code].
* Checkpoints after 0.22 N steps, then windows 0.03 N shorter down to 0.06 N, as integer window lengths
  [code]. At a checkpoint a point's step is halved and it restarts from its best iterate when the loss rose
  in at most rho = 75 % of the window's steps, or when its step was not halved at the previous checkpoint and
  its best loss has not improved since [paper, code].
* The first window counts increases from the loss at the starting point [paper, Alg. 1]; the reference code
  compares the first step with an unset (zero) entry, which counts it as an increase for CE and not for DLR.
* Random starts: L-inf x + eps * t / ||t||_inf with t ~ U[-1, 1]; L2 x + eps * g / ||g||_2 with g ~ N(0, I),
  clipped to [0, 1] [code]. Restarts (and APGD-T's targets) run only on points not yet fooled [code].
* A point stops being attacked once it is misclassified and keeps that first fooling iterate; the reference
  keeps iterating and returns its last fooling iterate. Points never fooled return their highest-loss iterate
  (the reference returns them unperturbed).
* APGD-T maximises the targeted DLR loss towards the 2nd, 3rd, ... most likely class at the clean input
  (`targets` of them, at most C - 1), `steps` each; success is misclassification [code].
* `eot > 1` averages loss, gradient and logits of each iterate over that many passes (Expectation over
  Transformation, Athalye, Carlini & Wagner, ICML 2018, arXiv:1802.00420); the reference code averages the
  gradient over `eot_iter` passes and keeps the last pass's loss [code].
"""

from collections.abc import Callable
from typing import ClassVar, Literal, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import (
    ce_each,
    clamp01,
    dlr,
    dlr_targeted,
    eot_losses_grad_logits,
    gaussian,
    normalize_l2,
    per_sample,
    project_l2,
    project_linf,
    uniform,
)
from loradar_cli.attacks.base import AttackConfig, ThreatModel, TrackedAttack, Tracker, register_attack
from loradar_cli.errors import InvalidValueError

Loss = Callable[[Tensor, Tensor], Tensor]


class _APGDOptions(AttackConfig):
    """Options shared by APGD and APGD-T."""

    steps: int = Field(100, ge=1)
    restarts: int = Field(1, ge=1)
    rho: float = Field(0.75, gt=0, le=1)
    momentum: float = Field(0.75, ge=0, le=1)
    eot: int = Field(1, ge=1)  # gradients averaged per iterate (EOT, for randomised models; 1: plain APGD)


class APGDConfig(_APGDOptions):
    """APGD options: the loss is cross-entropy (APGD-CE) or the DLR margin (APGD-DLR)."""

    loss: Literal["ce", "dlr"] = "ce"


class APGDL2Config(APGDConfig):
    """APGD options for L2: eps is an L2 radius in pixel units."""

    eps: float = Field(0.5, ge=0)


class APGDTConfig(_APGDOptions):
    """APGD-T options: targeted DLR towards each of the `targets` most likely wrong classes in turn."""

    targets: int = Field(9, ge=1)


class APGDTL2Config(APGDTConfig):
    """APGD-T options for L2."""

    eps: float = Field(0.5, ge=0)


def checkpoints(steps: int) -> list[int]:
    """Step counts after which APGD checks progress: windows of 0.22 N, then 0.03 N shorter, at least 0.06 N."""
    window, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, done = [], 0
    while done + window <= steps:
        done += window
        out.append(done)
        window = max(window - shrink, shortest)
    return out


class StepSchedule:
    """APGD's per-point step size: fed the loss of each new iterate, it halves steps at checkpoints that stall."""

    def __init__(self, steps: int, eta: Tensor, loss0: Tensor, rho: float) -> None:
        self.window = max(int(0.22 * steps), 1)
        self.shrink, self.shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
        self.rho, self.count = rho, 0
        self.eta, self.last, self.best, self.best_at_check = eta.clone(), loss0.clone(), loss0.clone(), loss0.clone()
        self.increases = torch.zeros_like(loss0)
        self.reduced = torch.ones_like(loss0, dtype=torch.bool)

    def update(self, loss: Tensor) -> Tensor:
        """Record the next iterate's loss `[B]`; the points whose step is halved now (all False between checkpoints)."""
        self.increases += (loss > self.last).to(self.increases.dtype)
        self.last, self.best = loss, torch.maximum(self.best, loss)
        self.count += 1
        if self.count < self.window:
            return torch.zeros_like(self.reduced)
        stalled = self.increases <= self.rho * self.window
        halve = stalled | (~self.reduced & (self.best_at_check >= self.best))
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.reduced, self.best_at_check = halve, self.best.clone()
        self.count, self.increases = 0, torch.zeros_like(self.increases)
        self.window = max(self.window - self.shrink, self.shortest)
        return halve

    def keep(self, mask: Tensor) -> None:
        """Drop the points where `mask` is False (they stopped being attacked)."""
        for name in ("eta", "last", "best", "best_at_check", "increases", "reduced"):
            setattr(self, name, getattr(self, name)[mask])


def check_classes(num_classes: int, needed: int, what: str) -> None:
    """DLR divides by gaps between the 1st and 3rd (targeted: 4th) largest logits, so it needs enough classes."""
    if num_classes < needed:
        raise InvalidValueError(f"{what} needs at least {needed} classes, the model has {num_classes}")


P = TypeVar("P", bound=_APGDOptions)


class _APGDBase(TrackedAttack[P]):
    """The APGD loop; subclasses choose the norm (start, direction, projection) and the loss."""

    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: Tracker
    ) -> Tensor:
        out = x.clone()
        for loss in self._losses(model, x, y):
            for _ in range(self.config.restarts):
                start = self._start(x, generator)  # drawn for the whole batch: the same with or without early stop
                idx = tracker.remaining()
                if len(idx):
                    out[idx] = self._run(model, x[idx], y[idx], start[idx], loss(idx), tracker, idx)
        return out

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Callable[[Tensor], Loss]]:
        """One loss per pass; each maps the indices of the points attacked to their loss `(logits, y) -> [b]`."""
        raise NotImplementedError

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, loss_fn: Loss, tracker: Tracker, idx: Tensor
    ) -> Tensor:
        """One APGD run from `x_adv`; returns each point's highest-loss iterate (fooled ones are in `tracker`)."""
        loss, grad, logits = eot_losses_grad_logits(model, x_adv, y, loss_fn, self.config.eot)
        keep = tracker.observe(idx, x_adv, logits)
        sched = StepSchedule(self.config.steps, torch.full_like(loss, 2 * self.config.eps), loss, self.config.rho)
        x_best, grad_best, x_prev = x_adv.clone(), grad.clone(), x_adv.clone()
        out, pos = x_adv.clone(), torch.arange(len(x), device=x.device)
        for i in range(self.config.steps):
            if not keep.all():
                out[pos] = x_best
                pos, idx, x, y, x_adv, x_prev, x_best, grad, grad_best = (
                    t[keep] for t in (pos, idx, x, y, x_adv, x_prev, x_best, grad, grad_best)
                )
                loss_fn = _subset_loss(loss_fn, keep)
                sched.keep(keep)
                if not len(idx):
                    return out
            a = 1.0 if i == 0 else self.config.momentum
            z = self._project(x_adv + per_sample(sched.eta) * self._direction(grad), x)
            x_prev, x_adv = x_adv, self._project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x)
            loss, grad, logits = eot_losses_grad_logits(model, x_adv, y, loss_fn, self.config.eot)
            keep = tracker.observe(idx, x_adv, logits)
            better = per_sample(loss > sched.best)
            x_best, grad_best = torch.where(better, x_adv, x_best), torch.where(better, grad, grad_best)
            halve = per_sample(sched.update(loss))
            x_adv, grad = torch.where(halve, x_best, x_adv), torch.where(halve, grad_best, grad)
        out[pos] = x_best
        return out

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _direction(self, grad: Tensor) -> Tensor:
        raise NotImplementedError

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError


def _subset_loss(loss_fn: Loss, keep: Tensor) -> Loss:
    """The loss of the kept points: per-point state such as APGD-T's targets is subset along with them."""
    subset = getattr(loss_fn, "subset", None)
    return subset(keep) if subset is not None else loss_fn


class _Targeted:
    """Targeted DLR towards per-point classes; `subset` keeps the targets aligned with the points attacked."""

    def __init__(self, target: Tensor) -> None:
        self.target = target

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        return dlr_targeted(logits, y, self.target)

    def subset(self, keep: Tensor) -> "_Targeted":
        return _Targeted(self.target[keep])


class _Linf:
    """L-inf geometry: random start in the ball, signed-gradient direction, box projection."""

    config: AttackConfig

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        t = uniform(x, generator) * 2 - 1
        return clamp01(x + self.config.eps * t / per_sample(t.flatten(1).abs().amax(1).clamp_min(1e-12)))

    def _direction(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return project_linf(x_adv, x, self.config.eps)


class _L2:
    """L2 geometry: random start on the sphere, normalised-gradient direction, ball projection."""

    config: AttackConfig

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return clamp01(x + self.config.eps * normalize_l2(gaussian(x, generator)))

    def _direction(self, grad: Tensor) -> Tensor:
        return normalize_l2(grad)

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return project_l2(x_adv, x, self.config.eps)


class _Untargeted(_APGDBase[P]):
    """APGD with CE or untargeted DLR."""

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Callable[[Tensor], Loss]]:
        if self.config.loss == "dlr":  # type: ignore[attr-defined]
            with torch.no_grad():
                check_classes(model(x[:1]).shape[1], 3, "the DLR loss")
            return [lambda idx: dlr]
        return [lambda idx: ce_each]


class _TargetedBase(_APGDBase[P]):
    """APGD-T: one targeted-DLR pass per target rank (2nd, 3rd, ... most likely class at the clean input)."""

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor) -> list[Callable[[Tensor], Loss]]:
        with torch.no_grad():
            order = model(x).argsort(dim=1, descending=True)
        check_classes(order.shape[1], 4, "the targeted DLR loss")
        ranks = range(1, min(self.config.targets, order.shape[1] - 1) + 1)  # type: ignore[attr-defined]
        return [lambda idx, r=r: _Targeted(order[idx, r]) for r in ranks]


@register_attack
class APGD(_Linf, _Untargeted[APGDConfig]):
    """L-inf APGD with CE (default) or DLR loss."""

    name: ClassVar[str] = "apgd"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = APGDConfig


@register_attack
class APGDL2(_L2, _Untargeted[APGDL2Config]):
    """L2 APGD with CE (default) or DLR loss."""

    name: ClassVar[str] = "apgd-l2"
    threat_model: ClassVar[ThreatModel] = "l2"
    config_cls: ClassVar[type[AttackConfig]] = APGDL2Config


@register_attack
class APGDT(_Linf, _TargetedBase[APGDTConfig]):
    """L-inf APGD-T: targeted DLR over the top-`targets` wrong classes."""

    name: ClassVar[str] = "apgd-t"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = APGDTConfig


@register_attack
class APGDTL2(_L2, _TargetedBase[APGDTL2Config]):
    """L2 APGD-T: targeted DLR over the top-`targets` wrong classes."""

    name: ClassVar[str] = "apgd-t-l2"
    threat_model: ClassVar[ThreatModel] = "l2"
    config_cls: ClassVar[type[AttackConfig]] = APGDTL2Config
