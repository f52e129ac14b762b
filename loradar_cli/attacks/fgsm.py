"""FGSM, L-inf: one signed-gradient step of size eps.

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015, arXiv:1412.6572.
Threat model: ||x_adv - x||_inf <= eps, x_adv in [0, 1]. Deterministic (the config's seed is unused).
"""

from typing import ClassVar

import torch
from torch import Tensor, nn

from loradar_cli.attacks._functional import clamp01, input_grad
from loradar_cli.attacks.base import Attack, AttackConfig, ThreatModel, register_attack


@register_attack
class FGSM(Attack[AttackConfig]):
    """x_adv = clip(x + eps * sign(grad_x CE)) to [0, 1]."""

    name: ClassVar[str] = "fgsm"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return clamp01(x + self.config.eps * input_grad(model, x, y).sign())
