"""HyperAT: one hypernetwork generates every target layer's LoRA for each of several adversarial defences.

Lv, Fan, Cao, Tu, Xu, Zhang, Li, Ding, Wang, "Hyper adversarial tuning for boosting adversarial robustness of
pretrained large vision transformers", Pattern Recognition 171 (2026) 112158 (preprint arXiv:2410.05951).
Threat model: the training attack's budget (L-inf). No code is public; the paper fixes the ideas, we fix the
details (all unverified):
- [paper] a shared hypernetwork maps a learned defence embedding and a layer embedding to that layer's LoRA
  factors; each step samples one defence at random and its adversarial-training loss updates the hypernetwork.
- [ours] defences PGD-AT, TRADES (β = 6, KL inner maximisation) and MART (λ = 5); embeddings of width 64; an MLP
  128 → 256 → 256 (GELU) and one linear head per factor shape, the B heads zero-initialised, so ΔW = 0 at step 0.
- [paper] after training the defence-specific LoRAs are merged "adaptively": here one plain adapter per defence
  (`<name>-pgd-at`, `<name>-trades`, `<name>-mart`) plus `<name>`, their ΔW-weighted sum with weights chosen on
  the validation split by robust accuracy under the training attack, from the uniform weights and the simplex
  grid of step 1/2 (ties keep the earlier candidate, uniform first). Validation during training uses the
  uniform merge.
- [ours] the hypernetwork learns at lr / hidden by default (`hyper_lr_scale`; the classifier head, if trained, at
  lr). With Adam each weight moves by about lr per step and every layer sums `hidden` inputs, so at the run's lr a
  generated factor moves over 100 times as far per step as a directly trained LoRA's (measured at the defaults),
  which diverged on MNIST and collapsed to one class on CIFAR-10 (the fan-in rule of Yang et al., "Tensor
  Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", NeurIPS 2021,
  arXiv:2203.03466).
"""

from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.data import ImageData
from loradar_cli.errors import IncompatibleError
from loradar_cli.lora.inject import lora_layers
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.lora.state import adapter_tensors
from loradar_cli.metrics import accuracy
from loradar_cli.recipes.base import AttackFn, Export, Recipe, RecipeConfig, StepOutput, register_recipe
from loradar_cli.recipes.losses import mart_loss, trades_loss
from loradar_cli.recipes.trades import inner_budget, kl_pgd

DEFENCES: tuple[str, ...] = ("pgd-at", "trades", "mart")
MERGE_GRID: tuple[tuple[float, ...], ...] = (
    (1 / 3, 1 / 3, 1 / 3),
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.5, 0.5, 0.0),
    (0.5, 0.0, 0.5),
    (0.0, 0.5, 0.5),
)
Factors = list[tuple[Tensor, Tensor]]


class HyperATConfig(RecipeConfig):
    """Embedding and hidden widths of the hypernetwork; β of TRADES and λ of MART."""

    embed_dim: int = Field(64, ge=1)
    hidden: int = Field(256, ge=1)
    beta: float = Field(6.0, ge=0)
    lam: float = Field(5.0, ge=0)
    hyper_lr_scale: float | None = Field(None, gt=0)  # lr factor of the hypernetwork; None: 1 / hidden


class HyperNetwork(nn.Module):
    """(defence m, every layer ℓ) -> (A_{m,ℓ}, B_{m,ℓ}) shaped like each layer's own factors."""

    def __init__(self, shapes: list[tuple[torch.Size, torch.Size]], defences: int, embed_dim: int, hidden: int):
        super().__init__()
        self.shapes = shapes
        self.defence = nn.Embedding(defences, embed_dim)
        self.layer = nn.Embedding(len(shapes), embed_dim)
        self.trunk = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )  # fmt: skip
        keys = [self._key(a, b) for a, b in shapes]
        self.heads_a = nn.ModuleDict({k: nn.Linear(hidden, a.numel()) for k, (a, _) in zip(keys, shapes, strict=True)})
        self.heads_b = nn.ModuleDict({k: nn.Linear(hidden, b.numel()) for k, (_, b) in zip(keys, shapes, strict=True)})
        for head in self.heads_b.values():  # B = 0: every generated LoRA starts at ΔW = 0
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @staticmethod
    def _key(a: torch.Size, b: torch.Size) -> str:
        return "x".join(map(str, (*a, *b)))

    def forward(self, m: int) -> Factors:
        layers = torch.arange(len(self.shapes), device=self.layer.weight.device)
        e_m = self.defence.weight[m].expand(len(self.shapes), -1)
        h = self.trunk(torch.cat([e_m, self.layer(layers)], 1))
        out = []
        for i, (a, b) in enumerate(self.shapes):
            key = self._key(a, b)
            out.append((self.heads_a[key](h[i]).view(a), self.heads_b[key](h[i]).view(b)))
        return out


@contextmanager
def generated(layers: list[LoraLayer], factors: Factors):
    """The layers run with `factors` inside the block."""
    for layer, pair in zip(layers, factors, strict=True):
        layer.generated = pair
    try:
        yield
    finally:
        for layer in layers:
            layer.generated = None


def merged(per_defence: list[Factors], weights: tuple[float, ...]) -> Factors:
    """Σ_m w_m·B_m·A_m per layer as one LoRA of rank M·r: [w_1·B_1, …]·[A_1; …] (zero weights dropped)."""
    keep = [(w, f) for w, f in zip(weights, per_defence, strict=True) if w > 0]
    return [
        (torch.cat([f[i][0] for _, f in keep]), torch.cat([w * f[i][1] for w, f in keep], dim=1))
        for i in range(len(per_defence[0]))
    ]


@register_recipe
class HyperAT(Recipe):
    """Each step: sample a defence, generate its LoRAs, take that defence's loss through the hypernetwork."""

    name = "hyperat"
    config_cls = HyperATConfig
    config: HyperATConfig
    output_suffixes: ClassVar[tuple[str, ...]] = ("", *(f"-{d}" for d in DEFENCES))

    def prepare(self, model: nn.Module, train: ImageData, val: ImageData, attack: AttackFn) -> None:
        """Build the hypernetwork as a submodule of `model` (so the optimiser and checkpoints see it)."""
        self._layers = [lora_layers(model)[k] for k in sorted(lora_layers(model))]
        for layer in self._layers:
            if getattr(layer.base_layer, "groups", 1) != 1:
                raise IncompatibleError("hyperat needs ungrouped layers; exclude grouped convs")
            layer.lora_A.weight.requires_grad_(False)  # unused: the hypernetwork supplies the factors
            layer.lora_B.weight.requires_grad_(False)
        shapes = [(layer.lora_A.weight.shape, layer.lora_B.weight.shape) for layer in self._layers]
        cfg = self.config
        net = HyperNetwork(shapes, len(DEFENCES), cfg.embed_dim, cfg.hidden).to(self._layers[0].lora_A.weight)
        model.add_module("hypernetwork", net)
        self._hyper_params = {id(p) for p in net.parameters()}
        self._val, self._attack = val, attack
        self._weights: tuple[float, ...] | None = None

    def build_optimizer(
        self, params: list[nn.Parameter], lr: float, step_size: int, gamma: float
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The recipes' Adam and StepLR, with the hypernetwork at lr x `hyper_lr_scale` (default 1 / hidden)."""
        scale = self.config.hyper_lr_scale or 1.0 / self.config.hidden
        hyper = [p for p in params if id(p) in self._hyper_params]
        rest = [p for p in params if id(p) not in self._hyper_params]
        groups = [{"params": rest, "lr": lr}, {"params": hyper, "lr": lr * scale}]
        return super().build_optimizer([g for g in groups if g["params"]], lr, step_size, gamma)

    def _net(self, model: nn.Module) -> HyperNetwork:
        return model.get_submodule("hypernetwork")  # type: ignore[return-value]

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        m = int(torch.randint(len(DEFENCES), (1,)))
        factors = self._net(model)(m)
        with generated(self._layers, [(a.detach(), b.detach()) for a, b in factors]):
            x_adv = kl_pgd(model, x, *inner_budget(attack)) if DEFENCES[m] == "trades" else attack(model, x, y)
        with generated(self._layers, factors):
            logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        if DEFENCES[m] == "trades":
            loss = trades_loss(clean, adv, y, self.config.beta)
        elif DEFENCES[m] == "mart":
            loss = mart_loss(clean, adv, y, self.config.lam)
        else:
            loss = F.cross_entropy(adv, y)
        return StepOutput(loss, adv, {"defence": float(m)})

    def per_defence(self, model: nn.Module) -> list[Factors]:
        """The generated factors of every defence, detached."""
        with torch.no_grad():
            return [[(a.detach(), b.detach()) for a, b in self._net(model)(m)] for m in range(len(DEFENCES))]

    def inference(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The merge of the defences' LoRAs: uniform during training, the chosen weights once exported."""
        return generated(self._layers, merged(self.per_defence(model), self._weights or MERGE_GRID[0]))

    def merge_weights(self, model: nn.Module) -> tuple[tuple[float, ...], list[float]]:
        """The candidate with the best validation robust accuracy (training attack), and every candidate's."""
        per_defence, scores = self.per_defence(model), []
        for weights in MERGE_GRID:
            with generated(self._layers, merged(per_defence, weights)):
                x_adv = torch.cat(
                    [
                        self._attack(model, self._val.x[i : i + 256], self._val.y[i : i + 256])
                        for i in range(0, len(self._val), 256)
                    ]
                )
                scores.append(accuracy(model, x_adv, self._val.y))
        self._weights = MERGE_GRID[max(range(len(scores)), key=lambda i: (scores[i], -i))]
        return self._weights, scores

    def export(self, model: nn.Module, spec: LoraSpec) -> dict[str, Export]:
        """One plain adapter per defence, then their merge (rank 3r at most) under the main name."""
        timm_model = getattr(model, "model", model)
        per_defence, out = self.per_defence(model), {}
        for m, defence in enumerate(DEFENCES):
            with generated(self._layers, per_defence[m]):
                out[f"-{defence}"] = Export(*adapter_tensors(timm_model, spec), {"combination": {"defence": defence}})
        weights, scores = self.merge_weights(model)
        with generated(self._layers, merged(per_defence, weights)):
            stored_spec, tensors = adapter_tensors(timm_model, spec)
        info = {"merge_weights": dict(zip(DEFENCES, weights, strict=True)), "merge_scores": scores}
        out[""] = Export(stored_spec, tensors, {"parents": [f"-{d}" for d in DEFENCES], "combination": info})
        return out
