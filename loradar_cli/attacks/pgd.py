"""PGD with L-inf and L2 threat models, with random starts and restarts.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018, arXiv:1706.06083.
Threat models: "pgd" ||x_adv - x||_inf <= eps; "pgd-l2" ||x_adv - x||_2 <= eps per sample; x_adv in [0, 1].
Defaults [paper, CIFAR-10 training]: L-inf eps 8/255, alpha 2/255, 10 steps, uniform random start.
L2 defaults (eps 0.5, alpha 0.1) follow torchattacks' PGDL2 and the RobustBench L2 track.
`eot > 1` averages each step's gradient over that many passes (Expectation over Transformation: Athalye,
Carlini & Wagner, ICML 2018, arXiv:1802.00420), for models that are random in eval mode.
"""

from typing import ClassVar, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import (
    best_of_restarts,
    eot_input_grad,
    normalize_l2,
    project_l2,
    project_linf,
    random_init_l2,
    random_init_linf,
)
from loradar_cli.attacks.base import Attack, AttackConfig, ThreatModel, Tracker, register_attack, tracked_ascent


class PGDConfig(AttackConfig):
    """L-inf PGD options; with `restarts > 1` the strongest restart is kept per sample."""

    alpha: float = Field(2 / 255, gt=0)
    steps: int = Field(10, ge=1)
    random_start: bool = True
    restarts: int = Field(1, ge=1)
    eot: int = Field(1, ge=1)  # gradients averaged per step (EOT, for randomised models; 1: plain PGD)


class PGDL2Config(PGDConfig):
    """L2 PGD options: eps and alpha are L2 radii in pixel units."""

    eps: float = Field(0.5, ge=0)
    alpha: float = Field(0.1, gt=0)


P = TypeVar("P", bound=PGDConfig)


class _PGDBase(Attack[P]):
    """Shared loop: start, `steps` ascent steps on CE, best restart per sample; subclasses give start and step."""

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return best_of_restarts(model, y, lambda: self._run(model, x, y, generator), self.config.restarts)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        """One PGD run from a fresh start."""
        x_adv = self._start(x, generator) if self.config.random_start else x.clone()
        for _ in range(self.config.steps):
            x_adv = self._step(x_adv, x, eot_input_grad(model, x_adv, y, self.config.eot))
        return x_adv

    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: Tracker
    ) -> Tensor:
        """Each restart runs on the points no earlier restart fooled; starts are drawn for the whole batch."""
        out = x.clone()
        for _ in range(self.config.restarts):
            start = self._start(x, generator) if self.config.random_start else x.clone()
            idx = tracker.remaining()
            if len(idx):
                out[idx] = tracked_ascent(
                    model,
                    x[idx],
                    y[idx],
                    start[idx],
                    tracker,
                    idx,
                    self.config.steps,
                    lambda x_adv, x0, grad, _rows: self._step(x_adv, x0, grad),
                    self.config.eot,
                )
        return out

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random point of the threat model around `x`."""
        raise NotImplementedError

    def _step(self, x_adv: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """One ascent step along `grad`, projected back into the threat model."""
        raise NotImplementedError


@register_attack
class PGD(_PGDBase[PGDConfig]):
    """L-inf PGD: x_adv <- Proj_{eps, [0,1]}(x_adv + alpha * sign(grad))."""

    name: ClassVar[str] = "pgd"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = PGDConfig

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return random_init_linf(x, self.config.eps, generator)

    def _step(self, x_adv: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        return project_linf(x_adv + self.config.alpha * grad.sign(), x, self.config.eps)


@register_attack
class PGDL2(_PGDBase[PGDL2Config]):
    """L2 PGD: x_adv <- Proj_{eps, [0,1]}(x_adv + alpha * grad / ||grad||_2), norms per sample."""

    name: ClassVar[str] = "pgd-l2"
    threat_model: ClassVar[ThreatModel] = "l2"
    config_cls: ClassVar[type[AttackConfig]] = PGDL2Config

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return random_init_l2(x, self.config.eps, generator)

    def _step(self, x_adv: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        return project_l2(x_adv + self.config.alpha * normalize_l2(grad), x, self.config.eps)
