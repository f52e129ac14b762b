"""Training loops: fitting a base on clean data, and training an attack-specialised adapter.

No printing here: progress goes through an optional callback so the CLI can draw a bar on stderr.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from loradar_cli.data import ImageData
from loradar_cli.lora.inject import trainable_parameters
from loradar_cli.metrics import Progress, accuracy
from loradar_cli.recipes.losses import recipe_loss


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


def train_adapter(
    model: nn.Module,
    attack: Callable,
    train: ImageData,
    val: ImageData,
    config: TrainConfig,
    progress: Progress | None = None,
) -> TrainResult:
    """Train LoRA factors (and head) of `model` against `attack`; on return the model holds the best epoch's weights.

    Adaptive by default: each batch's adversarial copy is crafted against the current adapted model.
    `static_attack` crafts the whole training set once against the model as it starts (= the base).
    """
    loss_fn = recipe_loss(config.recipe)
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    generator = torch.Generator().manual_seed(config.seed)
    static_adv = adversarial(attack, model, train.x, train.y, config.batch_size) if config.static_attack else None
    result = TrainResult(best_epoch=0)
    best_state: list[Tensor] = [p.detach().clone() for p in params]
    for epoch in range(1, config.epochs + 1):
        loss = _train_epoch(model, attack, loss_fn, train, static_adv, optimizer, generator, config, epoch, progress)
        scheduler.step()
        stats = EpochStats(
            epoch,
            loss,
            accuracy(model, val.x, val.y),
            accuracy(model, adversarial(attack, model, val.x, val.y, config.batch_size), val.y),
        )
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


def _train_epoch(
    model: nn.Module,
    attack: Callable,
    loss_fn: Callable,
    train: ImageData,
    static_adv: Tensor | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
    epoch: int,
    progress: Progress | None,
) -> float:
    total, count = 0.0, 0
    steps = batches(len(train), config.batch_size, generator)
    for i, idx in enumerate(steps):
        x, y = train.x[idx], train.y[idx]
        x_adv = static_adv[idx] if static_adv is not None else attack(model, x, y)
        adapter_train_mode(model)
        loss, _ = loss_fn(model, x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
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
) -> float:
    """Fit a base on clean data (all parameters that require grad); returns validation accuracy."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_total = epochs * ((len(train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps_total, 1))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
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
    model.eval()
    return accuracy(model, val.x, val.y)
