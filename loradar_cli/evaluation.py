"""Clean and robust accuracy with a per-point worst case across attacks (the AutoAttack convention)."""

from collections.abc import Callable, Mapping

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from loradar_cli.advset import AdvSet
from loradar_cli.data import ImageData
from loradar_cli.loading import predict_logits

Progress = Callable[[str, int, int], None]


class EvalRow(BaseModel):
    """One model's accuracies: clean, per white-box attack, per saved set, and the per-point worst case."""

    model: str
    attacked: str = "white-box"
    n: int
    clean: float
    attacks: dict[str, float] = {}
    adv_sets: dict[str, float] = {}
    worst_case: float


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    return predict_logits(model, x, batch_size).argmax(1) == y


def attacked_correct(model: nn.Module, attack: Callable, x: Tensor, y: Tensor, batch_size: int,
                     on_batch: Callable[[int], None] | None = None, target: nn.Module | None = None) -> Tensor:
    """Per-point correctness of `model` under an attack crafted against `target` (default: `model` itself)."""
    flags = []
    for i in range(0, len(x), batch_size):
        x_adv = attack(target if target is not None else model, x[i:i + batch_size], y[i:i + batch_size])
        flags.append(correct(model, x_adv, y[i:i + batch_size], batch_size))
        if on_batch:
            on_batch(min(i + batch_size, len(x)))
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def evaluate(model: nn.Module, name: str, data: ImageData, attacks: Mapping[str, Callable],
             adv_sets: Mapping[str, AdvSet] | None = None, *, batch_size: int = 128,
             progress: Progress | None = None, surrogate: nn.Module | None = None,
             attacked: str = "white-box") -> EvalRow:
    """Evaluate one model; the worst case counts a point robust only if every attack fails on it.

    Attacks are crafted against `surrogate` when the model itself has no useful gradient (a vote), else
    against the model; `attacked` says which in the row.
    """
    clean = correct(model, data.x, data.y, batch_size)
    robust = clean.clone()
    per_attack: dict[str, float] = {}
    for attack_name, attack in attacks.items():
        def report(done: int, label: str = f"{name} · {attack_name}") -> None:
            if progress:
                progress(label, done, len(data))

        flags = attacked_correct(model, attack, data.x, data.y, batch_size, report, surrogate)
        per_attack[attack_name] = _mean(flags)
        robust &= flags
    sets = {label: _mean(correct(model, s.x, s.y, batch_size)) for label, s in (adv_sets or {}).items()}
    return EvalRow(model=name, attacked=attacked, n=len(data), clean=_mean(clean), attacks=per_attack, adv_sets=sets,
                   worst_case=_mean(robust))


def _mean(flags: Tensor) -> float:
    return flags.float().mean().item() if len(flags) else 0.0
