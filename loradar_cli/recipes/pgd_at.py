"""PGD-AT: cross-entropy on the adversarial batch only.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018, arXiv:1706.06083. Threat model: the training attack's (L-inf PGD in the paper).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from loradar_cli.recipes.base import AttackFn, Recipe, StepOutput, register_recipe


@register_recipe
class PGDAT(Recipe):
    """min E[CE(f(x_adv), y)] with x_adv from the training attack."""

    name = "pgd-at"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        logits = model(attack(model, x, y))
        return StepOutput(F.cross_entropy(logits, y), logits)
