"""AMT: one member of a pool of adversarial LoRAs, SVD-initialised and trained with perturbed factors.

Yang, Liu, Wei, "Mixture of Adversarial LoRAs: Boosting Robust Generalization in Meta-Tuning", NeurIPS 2024.
Threat model: the training attack's (L-inf PGD on CE [paper]); a pool covers several budgets
(`loradar train --recipe amt --pool eps=...`), merged at test time by `merge --method tts`.
- [paper][code] LoRA initialised from the top-r SVD of each target weight with the residual frozen
  (`svd` initialisation), so the model equals the base at step 0; the factors carry the principal
  singular values and vectors.
- [code] outer loss TRADES-shaped: CE(f(x), y) + β·KL(p(x) ‖ p(x_adv)), β = λ_adv = 6.
- [code] adversarial perturbation of the factors (AWP-style): the gradient of the outer loss w.r.t. every
  LoRA factor w, rescaled to γ·‖w‖ per tensor, is added before the loss is computed and removed after the
  optimiser step. γ is not published (unverified); 5e-3 is the relative radius of Wu, Xia, Wang,
  "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020, arXiv:2004.05884.
- [ours] plain supervised classification: no episodes, prototypes or cosine head; the inner attack crafts
  against the current (unperturbed) factors.
"""

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.lora.inject import lora_layers
from loradar_cli.recipes.base import AttackFn, Recipe, RecipeConfig, StepOutput, register_recipe
from loradar_cli.recipes.losses import trades_loss

_TINY = 1e-20  # [code] guard of the per-tensor rescaling when a gradient is exactly zero


class AMTConfig(RecipeConfig):
    """β weighs the KL term of the outer loss; γ is the relative radius of the factor perturbation (0 = off)."""

    beta: float = Field(6.0, ge=0)
    gamma: float = Field(5e-3, ge=0)


def lora_factors(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (A and B of every layer), in module order."""
    return [w for layer in lora_layers(model).values() for w in (layer.lora_A.weight, layer.lora_B.weight)]


def factor_perturbation(loss: Tensor, factors: list[nn.Parameter], gamma: float) -> list[Tensor]:
    """γ·‖w‖·∇_w loss / ‖∇_w loss‖ per factor: the ascent direction at relative radius γ."""
    grads = torch.autograd.grad(loss, factors, allow_unused=True)
    out = []
    for w, g in zip(factors, grads, strict=True):
        g = torch.zeros_like(w) if g is None else g
        out.append(gamma * w.detach().norm() * g / (g.norm() + _TINY))
    return out


@register_recipe
class AMT(Recipe):
    """TRADES-shaped loss at adversarially perturbed LoRA factors; SVD-initialised with a frozen residual."""

    name = "amt"
    config_cls = AMTConfig
    config: AMTConfig
    lora_init = "svd"

    def __init__(self, config: RecipeConfig | None = None) -> None:
        super().__init__(config)
        self._restore: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        x_adv = attack(model, x, y)
        if self.config.gamma > 0:
            self.perturb(model, x, x_adv, y)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        return StepOutput(trades_loss(clean, adv, y, self.config.beta), adv)

    def perturb(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> None:
        """Add the factor perturbation (kept until `after_step`), computed at the current factors."""
        factors = lora_factors(model)
        logits = model(torch.cat([x, x_adv]))
        loss = trades_loss(logits[: len(x)], logits[len(x) :], y, self.config.beta)
        with torch.no_grad():
            for w, v in zip(factors, factor_perturbation(loss, factors, self.config.gamma), strict=True):
                saved = w.detach().clone()
                w.add_(v)
                self._restore.append((w, saved, w.detach().clone()))

    def after_step(self, model: nn.Module) -> None:
        """Remove the perturbation: each factor becomes its unperturbed value plus the optimiser's update."""
        with torch.no_grad():
            for w, saved, perturbed in self._restore:
                w.copy_(saved + (w - perturbed))
        self._restore.clear()
