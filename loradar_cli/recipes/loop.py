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
from torch.utils.data import Dataset

from loradar_cli.attacks._functional import point_streams
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import all_mean, batch_seed, gather_points, point_seeds, wrap_ddp
from loradar_cli.loader import Batch, TensorSource, augment_batch, eval_batches, materialize, train_batches
from loradar_cli.lora.inject import trainable_parameters
from loradar_cli.metrics import Progress, correct, mean_flag
from loradar_cli.recipes.base import Recipe, build_recipe, norm_stats
from loradar_cli.recipes.checkpoint import Checkpoint, generator_states, rng_state, set_generator_states, set_rng_state

Source = Dataset[Batch]


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

    def state_dict(self, recipe: Recipe, attack: Callable) -> dict[str, Any]:
        return {
            "epoch": len(self.result.history),
            "params": [p.detach().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "attack": generator_states(attack),  # a seeded training attack's own generators
            "best_epoch": self.result.best_epoch,
            "history": [asdict(h) for h in self.result.history],
            "best_state": self.best_state,
            "recipe": recipe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], recipe: Recipe, attack: Callable) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        set_generator_states(attack, state.get("attack", {}))
        self.result = TrainResult(state["best_epoch"], [EpochStats(**h) for h in state["history"]])
        self.best_state = list(state["best_state"])
        recipe.load_state_dict(state["recipe"])


def as_source(data: ImageData | Source) -> Source:
    """In-memory data as a loader source; sources pass through."""
    return TensorSource(data) if isinstance(data, ImageData) else data


def _in_memory(source: Source) -> ImageData:
    """What a recipe's `prepare` sees: the split's tensors (a streamed folder is read whole, once)."""
    return source.data if isinstance(source, TensorSource) else materialize(source)


def train_adapter(
    model: nn.Module,
    attack: Callable,
    train: ImageData | Source,
    val: ImageData | Source,
    config: TrainConfig,
    progress: Progress | None = None,
    *,
    recipe: Recipe | None = None,
    checkpoint: Checkpoint | None = None,
    engine: Engine | None = None,
    augment: str = "none",
) -> TrainResult:
    """Train LoRA factors (and head) of `model` with `recipe`; on return the model holds the best epoch's weights.

    Adaptive by default: the recipe crafts each batch's adversarial copy against the current adapted model.
    `static_attack` crafts the whole training set once against the model as it starts (= the base). With a
    `checkpoint`, the run state is saved after every completed epoch and a saved state is resumed from.
    """
    engine = engine or Engine()
    train, val = as_source(train), as_source(val)
    recipe = recipe or build_recipe(config.recipe, config.recipe_options)
    engine.model(model)
    recipe.prepare(model, _in_memory(train), _in_memory(val), attack)
    params = trainable_parameters(model)
    optimizer, scheduler = recipe.build_optimizer(params, config.lr, config.step_size, config.gamma)
    # what the best epoch and a checkpoint keep: trained parameters, plus BatchNorm statistics when they move
    tracked = params + ([] if recipe.frozen_norm_stats else norm_stats(model))
    run = _Run(
        tracked,
        optimizer,
        scheduler,
        augment_generator(config.seed, engine),
        best_state=[p.detach().clone() for p in tracked],
    )
    static_adv = _static_adversarial(attack, model, train, config, engine) if config.static_attack else None
    steps = _Steps(
        wrap_ddp(model, engine.world, engine.device), optimizer, engine.scaler(), engine, augment, run.generator
    )
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        run.load_state_dict(saved, recipe, attack)
    for epoch in range(len(run.result.history) + 1, config.epochs + 1):
        start = time.perf_counter()
        recipe.on_epoch_start(model, epoch)
        loss = train_epoch(model, recipe, attack, train, static_adv, run, steps, config, epoch, progress)
        seconds = time.perf_counter() - start
        if run.scheduler is not None:
            run.scheduler.step()
        with recipe.inference(model):
            clean, robust = validate(model, val, config.batch_size, engine, attack, seed=config.seed + epoch)
        stats = EpochStats(epoch, loss, clean, robust, seconds)
        stop = recipe.on_epoch_end(model, epoch, clean, robust)
        best = run.result.best if run.result.best_epoch else None
        run.result.history.append(stats)
        if is_better(stats, best, config.select, config.min_clean):
            run.result.best_epoch = epoch
            run.best_state = [p.detach().clone() for p in tracked]
        if checkpoint is not None and engine.world.is_main:
            checkpoint.save(run.state_dict(recipe, attack))
        if stop:
            break
    with torch.no_grad():
        for p, best_value in zip(tracked, run.best_state, strict=True):
            p.copy_(best_value)
    model.eval()
    return run.result


@dataclass
class _Steps:
    """What one optimisation step needs besides the batch: the (DDP-wrapped) model, optimiser, scaler, engine."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: "torch.amp.GradScaler"
    engine: Engine
    augment: str
    generator: torch.Generator

    def step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def augment_generator(seed: int, engine: Engine) -> torch.Generator:
    """The CPU generator of training augmentations: seeded, and distinct per process."""
    return torch.Generator().manual_seed(seed + 7919 * engine.world.rank)


def _static_adversarial(
    attack: Callable, model: nn.Module, train: Source, config: TrainConfig, engine: Engine
) -> Tensor:
    """The whole training set attacked once (on the CPU, in point order): every process crafts all of it, each
    point from its own random start (epoch 0 of the run's point seeds)."""
    whole = Engine(engine.device, engine.precision, engine.channels_last, engine.workers)
    parts = []
    with engine.autocast():
        for _, first, x, y in eval_batches(train, config.batch_size, whole):
            with point_streams(point_seeds(config.seed, 0, torch.arange(first, first + len(y)))):
                parts.append(attack(model, x, y).cpu())
    return torch.cat(parts)


def train_epoch(
    model: nn.Module,
    recipe: Recipe,
    attack: Callable,
    train: Source,
    static_adv: Tensor | None,
    run: _Run,
    steps: _Steps,
    config: TrainConfig,
    epoch: int,
    progress: Progress | None,
) -> float:
    """One pass over this process's share of the training set in a seeded order; returns the mean loss."""
    total, count, engine = 0.0, 0, steps.engine
    for idx, x, y in train_batches(train, config.batch_size, engine, seed=config.seed, epoch=epoch):
        batch_attack: Callable = attack
        if static_adv is not None:  # one draw of crop and flip for an image and its adversarial copy
            pair = augment_batch(steps.augment, torch.cat([x, engine.batch(static_adv[idx])], 1), steps.generator)
            x, x_adv = pair.split(x.shape[1], dim=1)
            batch_attack = Precomputed(getattr(attack, "config", None), x_adv)
        else:
            x = augment_batch(steps.augment, x, steps.generator)
        adapter_train_mode(steps.net) if recipe.frozen_norm_stats else steps.net.train()
        with engine.autocast(), point_streams(point_seeds(config.seed, epoch, idx)):
            out = recipe.step(steps.net, x, y, batch_attack)
        steps.step(out.loss)
        recipe.after_step(model)
        total += out.loss.item() * len(y)
        count += len(y)
        if progress:
            progress(f"epoch {epoch}/{config.epochs}", min(count * engine.world.size, len(train)), len(train))
    model.eval()
    return all_mean(engine.world, total / max(count, 1), count)


def validate(
    model: nn.Module,
    data: Source,
    batch_size: int,
    engine: Engine,
    attack: Callable | None = None,
    *,
    seed: int = 0,
) -> tuple[float, float]:
    """Clean and attacked accuracy over `data`, sharded over the processes; attacks run in fp32.

    Each batch's attack is seeded by (seed, batch number) inside a forked RNG, so the result does not depend on the
    number of processes and the training RNG does not move.
    """
    clean, robust = [], []
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for number, start, x, y in eval_batches(data, batch_size, engine):
            clean.append((start, correct(model, x, y, batch_size).cpu()))
            if attack is not None:
                torch.manual_seed(batch_seed(seed, number))
                robust.append((start, correct(model, attack(model, x, y), y, batch_size).cpu()))
    n = len(data)
    clean_acc = mean_flag(gather_points(engine.world, clean, n))
    return clean_acc, (mean_flag(gather_points(engine.world, robust, n)) if attack is not None else clean_acc)


def fit_classifier(
    model: nn.Module,
    train: ImageData | Source,
    val: ImageData | Source,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    engine: Engine | None = None,
    augment: str = "none",
) -> float:
    """Fit a base on clean data (all parameters that require grad); returns validation accuracy.

    With a `checkpoint`, the model, optimiser, schedule and RNG states are saved after every epoch and a saved
    state is resumed from.
    """
    engine = engine or Engine()
    train, val = as_source(train), as_source(val)
    engine.model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    per_process = -(-len(train) // engine.world.size)
    steps_total = epochs * -(-per_process // max(batch_size // engine.world.size, 1))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps_total, 1))
    steps = _Steps(
        wrap_ddp(model, engine.world, engine.device),
        optimizer,
        engine.scaler(),
        engine,
        augment,
        augment_generator(seed, engine),
    )
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        for key, part in parts.items():
            part.load_state_dict(saved[key])
        steps.generator.set_state(saved["generator"])
        set_rng_state(saved["rng"])
    for epoch in range((saved or {}).get("epoch", 0) + 1, epochs + 1):
        steps.net.train()
        done = 0
        for _, x, y in train_batches(train, batch_size, engine, seed=seed, epoch=epoch):
            done += len(y) * engine.world.size
            if len(y) < 2:  # BatchNorm cannot normalise a batch of one in train mode
                continue
            with engine.autocast():
                loss = F.cross_entropy(steps.net(augment_batch(augment, x, steps.generator)), y)
            steps.step(loss)
            scheduler.step()
            if progress:
                progress(f"fit epoch {epoch}/{epochs}", min(done, len(train)), len(train))
        if checkpoint is not None and engine.world.is_main:
            state = {key: part.state_dict() for key, part in parts.items()}
            checkpoint.save({**state, "epoch": epoch, "generator": steps.generator.get_state(), "rng": rng_state()})
    model.eval()
    return validate(model, val, batch_size, engine)[0]
