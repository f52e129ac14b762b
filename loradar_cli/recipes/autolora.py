"""AutoLoRa: natural objective through a LoRA branch, adversarial objective through the feature extractor.

Xu, Zhang, Kankanhalli, "AutoLoRa: A Parameter-Free Automated Robust Fine-Tuning Framework", ICLR 2024,
arXiv:2310.01818. Threat model: the training attack's (L-inf PGD-10 on CE at 8/255 [paper]), crafted against
the feature-extractor thread (LoRA branch off); the output is that thread: a robust full model, stored as a base.
- [paper] L = λ1·CE(f_{θ+BA}(x), y) + (1 − λ1)·CE(f_θ(x_adv), y) + λ2·KL(p_nat(x) ‖ p_adv(x_adv)); the natural
  CE sends gradient only to the LoRA branch and the classifier, the adversarial CE only to the feature
  extractor and the classifier. [code] p_nat is not detached in the KL term.
- [paper] λ1 = 1 − SA, λ2 = 6·SA, with SA the LoRA branch's clean training accuracy, before every epoch.
- [paper][code] SGD (lr 0.01, momentum 0.9, weight decay 1e-4); at every 4th epoch the learning rate halves
  if fewer than ρ = 0.75 of the window's epochs improved the validation robust accuracy, or if the rate was
  not changed at the previous checkpoint and the best robust accuracy did not rise since; a halving reloads
  the best weights so far; training stops once the rate falls below 1e-5.
- [paper][code] BatchNorm layers are shared by both threads and run in train mode (their statistics are part
  of the stored base). [ours] LoRA A starts Kaiming-uniform.
"""

from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.data import ImageData
from loradar_cli.lora.inject import classifier_name, lora_layers
from loradar_cli.lora.layers import lora_switched
from loradar_cli.metrics import accuracy
from loradar_cli.recipes.base import AttackFn, Recipe, RecipeConfig, StepOutput, norm_stats, register_recipe
from loradar_cli.recipes.losses import kl_div


class AutoLoRaConfig(RecipeConfig):
    """Initial learning rate, halving window (epochs), ρ, the stopping rate and the KL weight's factor."""

    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    period: int = Field(4, ge=1)
    rho: float = Field(0.75, ge=0, le=1)
    min_lr: float = Field(1e-5, ge=0)
    kl_factor: float = Field(6.0, ge=0)


def lambdas(sa: float, kl_factor: float = 6.0) -> tuple[float, float]:
    """(λ1, λ2) = (1 − SA, 6·SA) from the natural branch's training accuracy SA."""
    return 1.0 - sa, kl_factor * sa


def should_halve(
    ra: list[float], start: int, end: int, rho: float, changed_at_start: bool, best_at_start: float, best: float
) -> bool:
    """The AutoAttack-style step-size rule at checkpoint `end` (previous checkpoint `start`).

    `ra[e]` is the validation robust accuracy after epoch e (ra[0] before training). Halve if fewer than
    ρ·(end − start) of the epochs e in [start, end) have ra[e + 1] > ra[e], or if the rate was not changed at
    `start` and the best accuracy has not risen since.
    """
    improving = sum(ra[e + 1] > ra[e] for e in range(start, end))
    return improving < rho * (end - start) or (not changed_at_start and best <= best_at_start)


@register_recipe
class AutoLoRa(Recipe):
    """Disentangled robust fine-tuning of the whole model; the LoRA branch is a training-time teacher."""

    name = "autolora"
    config_cls = AutoLoRaConfig
    config: AutoLoRaConfig
    output: ClassVar[str] = "base"
    frozen_norm_stats: ClassVar[bool] = False
    default_targets: ClassVar[str | None] = "convs"  # [code] every conv (the paper skips the stem; we do not)

    def __init__(self, config: RecipeConfig | None = None) -> None:
        super().__init__(config)
        self.lam1, self.lam2 = 1.0, 0.0
        self.ra: list[float] = []
        self.best_ra = float("-inf")
        self.best_at_checkpoint = float("-inf")
        self.changed_at_checkpoint = False
        self.lr = self.config.lr
        self._train: ImageData | None = None
        self._params: dict[str, list[nn.Parameter]] = {}
        self._norm_stats: list[Tensor] = []  # BatchNorm running statistics: saved and reloaded with the weights
        self._best: list[Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module, train: ImageData, val: ImageData, attack: AttackFn) -> None:
        """Unfreeze the feature extractor; measure SA and the starting robust accuracy RA(0)."""
        self._params = split_parameters(model)
        self._norm_stats = norm_stats(model)
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
        self._train = train
        with self.inference(model):
            x_adv = torch.cat([attack(model, val.x[i : i + 256], val.y[i : i + 256]) for i in range(0, len(val), 256)])
            self.ra = [accuracy(model, x_adv, val.y)]
        self.best_ra = self.best_at_checkpoint = self.ra[0]
        self._best = [p.detach().clone() for p in self._all()]

    def build_optimizer(
        self, params: list[nn.Parameter], lr: float, step_size: int, gamma: float
    ) -> tuple[torch.optim.Optimizer, None]:
        """SGD with the recipe's own rate; the recipe halves it itself (no scheduler)."""
        cfg = self.config
        self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return self._optimizer, None

    def inference(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The deployed model: the feature extractor and classifier, LoRA branch off."""
        return lora_switched(model, False)

    # ------------------------------------------------------------------ per epoch and per step
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """λ1, λ2 from the LoRA branch's clean accuracy on the training set (eval mode)."""
        if self._train is not None:
            with lora_switched(model, True):
                sa = accuracy(model, self._train.x, self._train.y)
            self.lam1, self.lam2 = lambdas(sa, self.config.kl_factor)

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        with self.inference(model):
            x_adv = attack(model, x, y)
        z_nat = natural_logits(model, x, self._params["fe"])
        z_adv = adversarial_logits(model, x_adv)
        loss = (
            self.lam1 * F.cross_entropy(z_nat, y)
            + (1 - self.lam1) * F.cross_entropy(z_adv, y)
            + self.lam2 * kl_div(z_nat, z_adv).mean()
        )
        return StepOutput(loss, z_adv, {"lam1": self.lam1, "lam2": self.lam2})

    def on_epoch_end(self, model: nn.Module, epoch: int, val_clean: float, val_robust: float) -> bool:
        """Track RA; at each checkpoint apply the halving rule (reloading the best weights); stop below min_lr."""
        self.ra.append(val_robust)
        if val_robust > self.best_ra:
            self.best_ra = val_robust
            self._best = [p.detach().clone() for p in self._all()]
        if epoch % self.config.period:
            return False
        start = epoch - self.config.period
        halve = should_halve(
            self.ra,
            start,
            epoch,
            self.config.rho,
            self.changed_at_checkpoint,
            self.best_at_checkpoint,
            self.best_ra,
        )
        self.changed_at_checkpoint, self.best_at_checkpoint = halve, self.best_ra
        if halve:
            self.set_lr(self.lr / 2)
            with torch.no_grad():
                for p, best in zip(self._all(), self._best, strict=True):
                    p.copy_(best)
        return self.lr < self.config.min_lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                group["lr"] = lr

    def _all(self) -> list[Tensor]:
        return [p for group in ("fe", "lora", "head") for p in self._params.get(group, [])] + self._norm_stats

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        keys = ("lam1", "lam2", "ra", "best_ra", "best_at_checkpoint", "changed_at_checkpoint", "lr")
        return {**{k: getattr(self, k) for k in keys}, "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key == "best":
                self._best = list(value)
            elif key == "lr":
                self.set_lr(value)
            else:
                setattr(self, key, value)


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by role: "lora" (factors), "head" (the classifier), "fe" (everything else)."""
    timm_model = getattr(model, "model", model)
    head = classifier_name(timm_model)
    lora = {id(p) for layer in lora_layers(timm_model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    head_ids = {id(p) for p in timm_model.get_submodule(head).parameters()} if head else set()
    groups: dict[str, list[nn.Parameter]] = {"fe": [], "lora": [], "head": []}
    for p in model.parameters():
        groups["lora" if id(p) in lora else "head" if id(p) in head_ids else "fe"].append(p)
    return groups


def natural_logits(model: nn.Module, x: Tensor, fe: list[nn.Parameter]) -> Tensor:
    """Logits of the LoRA thread with the feature extractor held constant (no gradient reaches it)."""
    flags = [p.requires_grad for p in fe]
    for p in fe:
        p.requires_grad_(False)
    try:
        with lora_switched(model, True):
            return model(x)
    finally:
        for p, flag in zip(fe, flags, strict=True):
            p.requires_grad_(flag)


def adversarial_logits(model: nn.Module, x_adv: Tensor) -> Tensor:
    """Logits of the feature-extractor thread (LoRA branch off, so no gradient reaches the factors)."""
    with lora_switched(model, False):
        return model(x_adv)
