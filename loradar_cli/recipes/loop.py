"""Training loops: fitting a base on clean data, and training an attack-specialised adapter.

No printing here: progress goes through an optional callback so the CLI can draw a bar on stderr.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from loradar_cli.data import ImageData
from loradar_cli.lora.inject import trainable_parameters
from loradar_cli.metrics import Progress, accuracy
from loradar_cli.recipes.base import Recipe, build_recipe, norm_stats
from loradar_cli.recipes.checkpoint import Checkpoint, rng_state, set_rng_state


class TrainConfig(BaseModel):
    """Optimisation settings of an adapter run (stored in the adapter's provenance)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: str = "loradar"
    recipe_options: dict[str, Any] = Field(default_factory=dict)  # validated by the recipe's own config
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    static_attack: bool = False
    select: str = Field("robust", pattern="^(robust|clean|last)$")
    min_clean: float = Field(0.0, ge=0, le=1)  # select=robust: epochs below this val clean accuracy rank last
    seed: int = 0


@dataclass
class EpochStats:
    epoch: int
    loss: float
    val_clean_acc: float
    val_robust_acc: float
    seconds: float = 0.0  # wall time of the epoch's training pass (validation excluded)


@dataclass
class TrainResult:
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)

    @property
    def best(self) -> EpochStats:
        return self.history[self.best_epoch - 1]


def adapter_train_mode(model: nn.Module) -> None:
    """Train mode with every BatchNorm in eval: running statistics stay the base's, so reloads are exact."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def adversarial(attack: Callable, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return torch.cat(
        [attack(model, x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )


class Precomputed:
    """The attack a recipe sees in static mode: returns the batch's examples crafted once against the base."""

    def __init__(self, config: Any, x_adv: Tensor) -> None:
        self.config = config  # the training attack's config, for recipes that read its budget
        self.x_adv = x_adv

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.x_adv


def is_better(stats: EpochStats, best: EpochStats | None, select: str, min_clean: float = 0.0) -> bool:
    """Whether an epoch beats the best so far; `robust` prefers epochs that keep at least `min_clean` clean accuracy.

    robust: (clears the clean floor, val robust, val clean), lexicographic; clean: (val clean, val robust);
    last: always. Ties keep the earlier epoch.
    """
    if best is None or select == "last":
        return True
    if select == "robust":
        key = lambda s: (s.val_clean_acc >= min_clean, s.val_robust_acc, s.val_clean_acc)  # noqa: E731
    else:
        key = lambda s: (s.val_clean_acc, s.val_robust_acc)  # noqa: E731
    return key(stats) > key(best)


@dataclass
class _Run:
    """The mutable state of an adapter run: what a checkpoint saves after each completed epoch."""

    params: list[Tensor]  # trained parameters (and moving BatchNorm statistics)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    result: TrainResult = field(default_factory=lambda: TrainResult(best_epoch=0))
    best_state: list[Tensor] = field(default_factory=list)

    def state_dict(self, recipe: Recipe) -> dict[str, Any]:
        return {
            "epoch": len(self.result.history),
            "params": [p.detach().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "best_epoch": self.result.best_epoch,
            "history": [asdict(h) for h in self.result.history],
            "best_state": self.best_state,
            "recipe": recipe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], recipe: Recipe) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.result = TrainResult(state["best_epoch"], [EpochStats(**h) for h in state["history"]])
        self.best_state = list(state["best_state"])
        recipe.load_state_dict(state["recipe"])


def train_adapter(
    model: nn.Module,
    attack: Callable,
    train: ImageData,
    val: ImageData,
    config: TrainConfig,
    progress: Progress | None = None,
    *,
    recipe: Recipe | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Train LoRA factors (and head) of `model` with `recipe`; on return the model holds the best epoch's weights.

    Adaptive by default: the recipe crafts each batch's adversarial copy against the current adapted model.
    `static_attack` crafts the whole training set once against the model as it starts (= the base). With a
    `checkpoint`, the run state is saved after every completed epoch and a saved state is resumed from.
    """
    recipe = recipe or build_recipe(config.recipe, config.recipe_options)
    recipe.prepare(model, train, val, attack)
    params = trainable_parameters(model)
    optimizer, scheduler = recipe.build_optimizer(params, config.lr, config.step_size, config.gamma)
    # what the best epoch and a checkpoint keep: trained parameters, plus BatchNorm statistics when they move
    tracked = params + ([] if recipe.frozen_norm_stats else norm_stats(model))
    run = _Run(
        tracked,
        optimizer,
        scheduler,
        torch.Generator().manual_seed(config.seed),
        best_state=[p.detach().clone() for p in tracked],
    )
    static_adv = adversarial(attack, model, train.x, train.y, config.batch_size) if config.static_attack else None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        run.load_state_dict(saved, recipe)
    for epoch in range(len(run.result.history) + 1, config.epochs + 1):
        start = time.perf_counter()
        recipe.on_epoch_start(model, epoch)
        loss = train_epoch(model, recipe, attack, train, static_adv, run, config, epoch, progress)
        seconds = time.perf_counter() - start
        if run.scheduler is not None:
            run.scheduler.step()
        with recipe.inference(model):
            clean = accuracy(model, val.x, val.y)
            robust = accuracy(model, adversarial(attack, model, val.x, val.y, config.batch_size), val.y)
        stats = EpochStats(epoch, loss, clean, robust, seconds)
        stop = recipe.on_epoch_end(model, epoch, clean, robust)
        best = run.result.best if run.result.best_epoch else None
        run.result.history.append(stats)
        if is_better(stats, best, config.select, config.min_clean):
            run.result.best_epoch = epoch
            run.best_state = [p.detach().clone() for p in tracked]
        if checkpoint is not None:
            checkpoint.save(run.state_dict(recipe))
        if stop:
            break
    with torch.no_grad():
        for p, best_value in zip(tracked, run.best_state, strict=True):
            p.copy_(best_value)
    model.eval()
    return run.result


def train_epoch(
    model: nn.Module,
    recipe: Recipe,
    attack: Callable,
    train: ImageData,
    static_adv: Tensor | None,
    run: _Run,
    config: TrainConfig,
    epoch: int,
    progress: Progress | None,
) -> float:
    """One pass over the training set in a seeded order; returns the mean loss."""
    total, count = 0.0, 0
    steps = batches(len(train), config.batch_size, run.generator)
    for i, idx in enumerate(steps):
        x, y = train.x[idx], train.y[idx]
        batch_attack = (
            Precomputed(getattr(attack, "config", None), static_adv[idx]) if static_adv is not None else attack
        )
        adapter_train_mode(model) if recipe.frozen_norm_stats else model.train()
        out = recipe.step(model, x, y, batch_attack)
        run.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        run.optimizer.step()
        recipe.after_step(model)
        total += out.loss.item() * len(y)
        count += len(y)
        if progress:
            progress(f"epoch {epoch}/{config.epochs}", i + 1, len(steps))
    model.eval()
    return total / max(count, 1)


def fit_classifier(
    model: nn.Module,
    train: ImageData,
    val: ImageData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
) -> float:
    """Fit a base on clean data (all parameters that require grad); returns validation accuracy.

    With a `checkpoint`, the model, optimiser, schedule and RNG states are saved after every epoch and a saved
    state is resumed from.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_total = epochs * ((len(train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps_total, 1))
    generator = torch.Generator().manual_seed(seed)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        for key, part in parts.items():
            part.load_state_dict(saved[key])
        generator.set_state(saved["generator"])
        set_rng_state(saved["rng"])
    for epoch in range((saved or {}).get("epoch", 0) + 1, epochs + 1):
        model.train()
        steps = batches(len(train), batch_size, generator)
        for i, idx in enumerate(steps):
            if len(idx) < 2:  # BatchNorm cannot normalise a batch of one in train mode
                continue
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if progress:
                progress(f"fit epoch {epoch}/{epochs}", i + 1, len(steps))
        if checkpoint is not None:
            state = {key: part.state_dict() for key, part in parts.items()}
            checkpoint.save({**state, "epoch": epoch, "generator": generator.get_state(), "rng": rng_state()})
    model.eval()
    return accuracy(model, val.x, val.y)
