"""Recipe losses: LoRADAR (batch doubled with its adversarial copy) and PGD-AT (adversarial only)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loradar_cli.registry import Registry

RecipeLoss = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
RECIPES: Registry[RecipeLoss] = Registry("recipe")


@RECIPES.register("loradar")
def loradar_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """LoRADAR (methods.md §5.1): CE over the concatenation [x; x_adv], i.e. the mean of clean and adversarial CE."""
    logits = model(torch.cat([x, x_adv]))
    return F.cross_entropy(logits, torch.cat([y, y])), logits[len(x) :]


@RECIPES.register("pgd-at")
def pgd_at_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """PGD-AT (Madry et al., 2018): CE on the adversarial batch only."""
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def recipe_loss(name: str) -> RecipeLoss:
    return RECIPES.get(name)
