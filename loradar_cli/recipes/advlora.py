"""AdvLoRA: clustering-initialised LoRA with a per-layer trainable scale, adversarially trained with PGD-3.

Ji, Liu, Zhang, Zhang, Zhao, Zhou, Zhang, Liu, Zheng, "AdvLoRA: Adversarial Low-Rank Adaptation of
Vision-Language Models", arXiv:2404.13425. Threat model: the training attack's (L-inf PGD, 3 steps [paper]).
The paper describes three ingredients and publishes no code; everything below the first bullet is our reading.
- [paper] LoRA rank r is the number of cluster centres; the clustered pretrained weights initialise the
  factors (`cluster` initialisation: k-means of W₀'s rows, A = centres, B = one-hot assignment).
- [paper] alignment of the factors' product with the pretrained weights, min ‖W₀ − BA‖²: here a
  regulariser μ·Σ_layers ‖W₀ − s·α·BA‖²_F on the trainable product.
- [paper] an adaptive scalar α in y = W₀x + α·BAx, trainable, one per layer, starting at 1.
- [ours] function-preserving at step 0: the cluster product is frozen as a residual (W₀ − s·B₀A₀ + s·α·BA),
  and the stored adapter folds α into B ([α·B, −B₀]·[A; A₀], an exact LoRA of rank 2r that PEFT loads).
- [ours] PGD-3 with step 2.5·ε/3 (three steps can reach the boundary), random start; `steps=0` keeps the
  training attack as given.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks.base import Attack
from loradar_cli.data import ImageData
from loradar_cli.lora.inject import lora_layers
from loradar_cli.recipes.base import AttackFn, Recipe, RecipeConfig, StepOutput, register_recipe
from loradar_cli.recipes.checkpoint import generator_states, set_generator_states


class AdvLoRAConfig(RecipeConfig):
    """μ weighs the alignment regulariser; `steps` PGD steps (step 2.5·ε/steps) replace the attack's own."""

    mu: float = Field(1e-4, ge=0)
    steps: int = Field(3, ge=0)


def alignment(model: nn.Module) -> Tensor:
    """Σ over LoRA layers of ‖W₀ − s·α·B·A‖²_F (W₀ the untouched base weight, flattened)."""
    terms = []
    for layer in lora_layers(model).values():
        product = layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1) * layer.scaling
        if layer.lora_scale is not None:
            product = product * layer.lora_scale
        terms.append((layer.base_layer.weight.flatten(1) - product).square().sum())
    return torch.stack(terms).sum()


def with_steps(attack: AttackFn, steps: int) -> AttackFn:
    """The training attack with `steps` iterations of size 2.5·ε/steps, when its config has those fields."""
    if steps == 0 or not isinstance(attack, Attack) or not {"steps", "alpha"} <= set(type(attack.config).model_fields):
        return attack
    update = {"steps": steps, "alpha": 2.5 * attack.config.eps / steps}
    return type(attack)(attack.config.model_copy(update=update))


@register_recipe
class AdvLoRA(Recipe):
    """CE on PGD-3 examples + μ·alignment; cluster init, trainable per-layer scale."""

    name = "advlora"
    config_cls = AdvLoRAConfig
    config: AdvLoRAConfig
    lora_init = "cluster"

    def __init__(self, config: RecipeConfig | None = None) -> None:
        super().__init__(config)
        self._inner: tuple[AttackFn, AttackFn] | None = None  # (training attack, its PGD-3 version)
        self._resumed: dict[str, Any] = {}  # the PGD-3 attack's generator states, set when it is next built

    def prepare(self, model: nn.Module, train: ImageData, val: ImageData, attack: AttackFn) -> None:
        """Give every LoRA layer its trainable scale α = 1."""
        for layer in lora_layers(model).values():
            layer.add_scale(1.0)

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        if self._inner is None or self._inner[0] is not attack:  # one object per run: a seeded generator advances
            self._inner = (attack, with_steps(attack, self.config.steps))
            if self._resumed:
                set_generator_states(self._inner[1], self._resumed)
                self._resumed = {}
        logits = model(self._inner[1](model, x, y))
        loss = F.cross_entropy(logits, y)
        if self.config.mu > 0:
            loss = loss + self.config.mu * alignment(model)
        return StepOutput(loss, logits)

    def state_dict(self) -> dict[str, Any]:
        """The own generators of the PGD-3 attack (a seeded one continues its draws on --resume)."""
        return {"inner": generator_states(self._inner[1]) if self._inner is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep the PGD-3 attack's generator states for when the attack is built (first step)."""
        self._inner, self._resumed = None, dict(state.get("inner", {}))
