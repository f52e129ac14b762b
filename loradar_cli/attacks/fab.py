"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf.

Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary Attack", ICML 2020,
arXiv:1907.02044; the targeted version as run by AutoAttack (Croce & Hein, ICML 2020, arXiv:2003.01690;
reference code `fra31/auto-attack`, `autoattack/fab_pt.py`).
Threat model: ||x_adv - x||_inf <= eps, x_adv in [0, 1]; FAB searches for the smallest perturbation and a point
counts as broken only by an iterate inside the eps ball.

Choices:
* Each step linearises the margin z_t - z_y at the iterate, projects both the iterate and the clean input onto
  that hyperplane (the smallest L-inf step that stays in [0, 1]), and moves to the convex combination
  (1 - a) (x_k + eta d_k) + a (x + eta d_0), a = min(|d_k| / (|d_k| + |d_0|), alpha_max) [paper, Alg. 1];
  eta 1.05, alpha_max 0.1, beta 0.9 [paper, code].
* An adversarial iterate is pulled back towards the clean input, x + beta (x_k - x) [paper, code].
* Targets are the 2nd, 3rd, ... most likely classes at the clean input, `targets` of them (at most C - 1),
  `steps` each [code]; success is any misclassification [code].
* The first restart starts at the clean input, later ones at a random point of the eps/2 ball [code, whose
  radius is min(best distance so far, eps) / 2: eps for every point still attacked].
* The hyperplane projection is solved exactly by sorting the coordinates' room to move (below); where the box
  cannot reach the hyperplane the step goes as far as the box allows towards it. The reference code solves the
  same problem by a bisection over the same sort.
* A point stops being attacked once an iterate inside the ball fools the model, keeping that example (FAB
  would go on shrinking it). Points misclassified clean come back unchanged, as in the reference; points never
  fooled come back as their last iterate projected into the ball (the reference returns them unchanged).
"""

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import clamp01, per_sample, project_linf, uniform
from loradar_cli.attacks.apgd import check_classes
from loradar_cli.attacks.base import AttackConfig, ThreatModel, TrackedAttack, Tracker, register_attack

_TINY = 1e-12


class FABTConfig(AttackConfig):
    """FAB-T options: `targets` target classes tried in turn, `steps` steps and `restarts` starts each."""

    steps: int = Field(100, ge=1)
    targets: int = Field(9, ge=1)
    restarts: int = Field(1, ge=1)
    alpha_max: float = Field(0.1, ge=0, le=1)
    eta: float = Field(1.05, gt=0)
    beta: float = Field(0.9, gt=0, lt=1)


def project_hyperplane_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row of `t` `[n, d]` (in [0, 1]), the smallest L-inf step `d` with w.(t + d) = b and t + d in [0, 1].

    With room_i the distance coordinate i can move in the direction that helps (sign of w_i), a step of L-inf
    size lam changes w.z by at most g(lam) = sum_i |w_i| min(lam, room_i), a piecewise linear increasing
    function with kinks at the sorted rooms: find the piece where g crosses the needed change and solve on it.
    When even g(inf) falls short, the step is the box corner nearest the hyperplane (every coordinate at its room).
    """
    need = b - (w * t).sum(1)
    sign = torch.where(need < 0, -1.0, 1.0).to(t.dtype)
    w, need = w * sign[:, None], need * sign  # now w.d = need >= 0
    room = torch.where(w > 0, 1 - t, t) * (w != 0)
    caps, order = room.sort(1)
    weight = w.abs().gather(1, order)
    total = weight.sum(1, keepdim=True)
    below, cum_weight = torch.cumsum(weight * caps, 1), torch.cumsum(weight, 1)
    reach = below + caps * (total - cum_weight)  # g at each kink
    k = (reach < need[:, None]).sum(1, keepdim=True).clamp(max=t.shape[1] - 1)  # the piece [cap_{k-1}, cap_k]
    prev = (k - 1).clamp(min=0)
    below_prev = torch.where(k > 0, below.gather(1, prev), torch.zeros_like(need[:, None]))
    slope = total - torch.where(k > 0, cum_weight.gather(1, prev), torch.zeros_like(need[:, None]))
    lam = ((need[:, None] - below_prev) / slope.clamp_min(_TINY)).clamp_min(0)
    lam = torch.where(reach[:, -1:] >= need[:, None], lam, caps[:, -1:])
    return torch.sign(w) * torch.minimum(room, lam)


def _linf(t: Tensor) -> Tensor:
    """Per-sample L-inf norm `[B]`."""
    return t.flatten(1).abs().amax(1)


@register_attack
class FABT(TrackedAttack[FABTConfig]):
    """L-inf FAB-T: minimal-distortion targeted boundary steps; a point is broken by a fooling iterate within eps."""

    name: ClassVar[str] = "fab-t"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = FABTConfig

    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: Tracker
    ) -> Tensor:
        with torch.no_grad():
            logits = model(x)
        check_classes(logits.shape[1], 3, "FAB-T")
        tracker.observe(tracker.all, x[tracker.all], logits[tracker.all])  # unfooled points come back as x
        order, out = logits.argsort(dim=1, descending=True), x.clone()
        for rank in range(1, min(self.config.targets, logits.shape[1] - 1) + 1):
            for restart in range(self.config.restarts):
                start = self._start(x, generator) if restart else x  # drawn for the whole batch
                idx = tracker.remaining()
                if len(idx):
                    last, left = self._run(model, x[idx], y[idx], order[idx, rank], start[idx], tracker, idx)
                    out[left] = project_linf(last, x[left], self.config.eps)
        idx = tracker.remaining()
        tracker.observe(idx, out[idx], None)
        return out

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random point at L-inf distance eps / 2 from `x`, clipped to [0, 1]."""
        t = uniform(x, generator) * 2 - 1
        return clamp01(x + 0.5 * self.config.eps * t / per_sample(_linf(t).clamp_min(_TINY)))

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, x_k: Tensor, tracker: Tracker, idx: Tensor
    ) -> tuple[Tensor, Tensor]:
        """FAB steps towards `target`; fooling iterates within eps go to `tracker`, which drops their points.

        Returns the last iterates of the points still attacked at the end, and their indices in the batch.
        """
        cfg, shape = self.config, x.shape
        for _ in range(cfg.steps):
            margin, grad = self._margin_grad(model, x_k, y, target)
            w, flat = grad.flatten(1), x_k.flatten(1)
            b = (w * flat).sum(1) - margin  # the linearised boundary z_t - z_y = 0 as w.z = b
            d_k = project_hyperplane_linf(flat, w, b).view(shape)
            d_0 = project_hyperplane_linf(x.flatten(1), w, b).view(shape)
            a_k, a_0 = _linf(d_k).clamp_min(1e-8), _linf(d_0).clamp_min(1e-8)
            alpha = per_sample((a_k / (a_k + a_0)).clamp(0, cfg.alpha_max))
            x_k = clamp01((x_k + cfg.eta * d_k) * (1 - alpha) + (x + cfg.eta * d_0) * alpha)
            with torch.no_grad():
                logits = model(x_k)
            wrong = logits.argmax(1) != y
            inside = _linf(x_k - x) <= cfg.eps
            keep = torch.ones_like(wrong)
            if (wrong & inside).any():
                seen = (wrong & inside).nonzero().flatten()
                keep[seen] = tracker.observe(idx[seen], x_k[seen], logits[seen])
            x_k = torch.where(per_sample(wrong), x + cfg.beta * (x_k - x), x_k)
            if not keep.all():
                x, y, target, x_k, idx = x[keep], y[keep], target[keep], x_k[keep], idx[keep]
                shape = x.shape
                if not len(idx):
                    break
        return x_k, idx

    @staticmethod
    def _margin_grad(model: nn.Module, x_k: Tensor, y: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(z_t - z_y `[B]`, its input gradient) from one forward and backward."""
        inp = x_k.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inp)
            margin = logits.gather(1, target[:, None])[:, 0] - logits.gather(1, y[:, None])[:, 0]
            (grad,) = torch.autograd.grad(margin.sum(), inp)
        return margin.detach(), grad.detach()
