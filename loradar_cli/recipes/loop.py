"""Training loops: fitting a base on clean data, and training an attack-specialised adapter.

No printing here: progress goes through an optional callback so the CLI can draw a bar on stderr.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import all_mean, batch_seed, gather_points, wrap_ddp
from loradar_cli.loader import Batch, TensorSource, augment_batch, eval_batches, train_batches
from loradar_cli.lora.inject import trainable_parameters
from loradar_cli.metrics import Progress, correct, mean_flag
from loradar_cli.recipes.losses import recipe_loss

Source = Dataset[Batch]


class TrainConfig(BaseModel):
    """Optimisation settings of an adapter run (stored in the adapter's provenance)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: str = "loradar"
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


def as_source(data: ImageData | Source) -> Source:
    """In-memory data as a loader source; sources pass through."""
    return TensorSource(data) if isinstance(data, ImageData) else data


def train_adapter(
    model: nn.Module,
    attack: Callable,
    train: ImageData | Source,
    val: ImageData | Source,
    config: TrainConfig,
    progress: Progress | None = None,
    *,
    engine: Engine | None = None,
    augment: str = "none",
) -> TrainResult:
    """Train LoRA factors (and head) of `model` against `attack`; on return the model holds the best epoch's weights.

    Adaptive by default: each batch's adversarial copy is crafted against the current adapted model.
    `static_attack` crafts the whole training set once against the model as it starts (= the base).
    """
    engine = engine or Engine()
    train, val = as_source(train), as_source(val)
    loss_fn = recipe_loss(config.recipe)
    engine.model(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    generator = augment_generator(config.seed, engine)
    static_adv = _static_adversarial(attack, model, train, config.batch_size, engine) if config.static_attack else None
    steps = _Steps(wrap_ddp(model, engine.world, engine.device), optimizer, engine.scaler(), engine, augment, generator)
    result = TrainResult(best_epoch=0)
    best_state: list[Tensor] = [p.detach().clone() for p in params]
    for epoch in range(1, config.epochs + 1):
        loss = _train_epoch(model, attack, loss_fn, train, static_adv, steps, config, epoch, progress)
        scheduler.step()
        clean, robust = validate(model, val, config.batch_size, engine, attack, seed=config.seed + epoch)
        stats = EpochStats(epoch, loss, clean, robust)
        result.history.append(stats)
        if _is_better(stats, result, config.select, config.min_clean):
            result.best_epoch = epoch
            best_state = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, best in zip(params, best_state, strict=True):
            p.copy_(best)
    model.eval()
    return result


def _is_better(stats: EpochStats, result: TrainResult, select: str, min_clean: float = 0.0) -> bool:
    """Whether this epoch beats the best so far; `robust` prefers epochs that keep at least `min_clean` clean accuracy."""
    if result.best_epoch == 0 or select == "last":
        return True
    best = result.best
    key = (
        (lambda s: (s.val_clean_acc >= min_clean, s.val_robust_acc, s.val_clean_acc))
        if select == "robust"
        else (lambda s: (s.val_clean_acc, s.val_robust_acc))
    )
    return key(stats) > key(best)


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


def _static_adversarial(attack: Callable, model: nn.Module, train: Source, batch_size: int, engine: Engine) -> Tensor:
    """The whole training set attacked once (on the CPU, in point order): every process crafts all of it."""
    whole = Engine(engine.device, engine.precision, engine.channels_last, engine.workers)
    with engine.autocast():
        return torch.cat([attack(model, x, y).cpu() for _, _, x, y in eval_batches(train, batch_size, whole)])


def _train_epoch(
    model: nn.Module,
    attack: Callable,
    loss_fn: Callable,
    train: Source,
    static_adv: Tensor | None,
    steps: _Steps,
    config: TrainConfig,
    epoch: int,
    progress: Progress | None,
) -> float:
    total, count, engine = 0.0, 0, steps.engine
    for idx, x, y in train_batches(train, config.batch_size, engine, seed=config.seed, epoch=epoch):
        if static_adv is not None:  # one draw of crop and flip for an image and its adversarial copy
            pair = augment_batch(steps.augment, torch.cat([x, engine.batch(static_adv[idx])], 1), steps.generator)
            x, x_adv = pair.split(x.shape[1], dim=1)
        else:
            x = augment_batch(steps.augment, x, steps.generator)
            with engine.autocast():
                x_adv = attack(model, x, y)
        adapter_train_mode(steps.net)
        with engine.autocast():
            loss, _ = loss_fn(steps.net, x, x_adv, y)
        steps.step(loss)
        total += loss.item() * len(y)
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
    engine: Engine | None = None,
    augment: str = "none",
) -> float:
    """Fit a base on clean data (all parameters that require grad); returns validation accuracy."""
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
    for epoch in range(1, epochs + 1):
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
    model.eval()
    return validate(model, val, batch_size, engine)[0]
