"""LoRADAR: each batch doubled with its adversarial copy, CE over both (the mean of clean and adversarial CE).

LoRADAR project write-up ("Low-Rank Adaptation Defense with Robustness"; no paper). Threat model: whatever
the training attack is (any registered attack, crafted against the current adapted model by default).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loradar_cli.recipes.base import AttackFn, Recipe, StepOutput, register_recipe


@register_recipe
class LORADAR(Recipe):
    """CE over the concatenation [x; x_adv]; the logits returned are the adversarial half."""

    name = "loradar"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        x_adv = attack(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        return StepOutput(F.cross_entropy(logits, torch.cat([y, y])), logits[len(x) :])
