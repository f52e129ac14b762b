"""Report rows, and clean and robust accuracy with a per-point worst case across attacks (the AutoAttack convention)."""

from collections.abc import Callable, Mapping

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from loradar_cli.advset import AdvSet
from loradar_cli.data import ImageData
from loradar_cli.evaluation.checks import SanityFlag
from loradar_cli.evaluation.suite import AttackRecord
from loradar_cli.metrics import Progress, correct, mean_flag


class EvalRow(BaseModel):
    """One model's accuracies: clean, per white-box attack, per saved set, and the per-point worst case.

    Suite rows (early stopping) give in `attacks` the robust accuracy after each attack and all earlier ones,
    and record every attack's config, target and counts in `records`, and the sanity flags raised in `flags`.
    """

    model: str
    attacked: str = "white-box"
    n: int
    clean: float
    attacks: dict[str, float] = {}
    adv_sets: dict[str, float] = {}
    worst_case: float
    suite: str | None = None
    norm: str | None = None
    eps: float | None = None
    seed: int | None = None
    early_stop: bool | None = None
    records: list[AttackRecord] = []
    checks: list[str] = []
    flags: list[SanityFlag] = []
    sweep: list[tuple[float, float]] = []  # (eps, worst case) with --eps-sweep


def attacked_correct(
    models: Mapping[str, nn.Module],
    attack: Callable,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    target: nn.Module,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """Per-point correctness of each model under one attack crafted once per batch against `target`."""
    flags: dict[str, list[Tensor]] = {name: [] for name in models}
    for i in range(0, len(x), batch_size):
        x_adv = attack(target, x[i : i + batch_size], y[i : i + batch_size])
        for name, model in models.items():
            flags[name].append(correct(model, x_adv, y[i : i + batch_size], batch_size))
        if on_batch:
            on_batch(min(i + batch_size, len(x)))
    return {name: torch.cat(f) if f else torch.zeros(0, dtype=torch.bool) for name, f in flags.items()}


def evaluate(
    model: nn.Module,
    name: str,
    data: ImageData,
    attacks: Mapping[str, Callable],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> EvalRow:
    """Evaluate one model against white-box attacks; the worst case counts a point robust only if every attack fails."""
    (row,) = evaluate_group({name: model}, model, data, attacks, adv_sets, batch_size=batch_size, progress=progress)
    return row


def evaluate_group(
    models: Mapping[str, nn.Module],
    target: nn.Module,
    data: ImageData,
    attacks: Mapping[str, Callable],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    batch_size: int = 128,
    progress: Progress | None = None,
    attacked: str = "white-box",
) -> list[EvalRow]:
    """Evaluate models that share one attack target, crafting each attack once for all of them.

    The target is the model itself for a single model, or the surrogate of models without a useful gradient
    (the votes of one ensemble share the mean of their members' logits); `attacked` says which in the rows.
    """
    clean = {name: correct(model, data.x, data.y, batch_size) for name, model in models.items()}
    robust = {name: flags.clone() for name, flags in clean.items()}
    per_attack: dict[str, dict[str, float]] = {name: {} for name in models}
    label = ", ".join(models)
    for attack_name, attack in attacks.items():

        def report(done: int, text: str = f"{label} · {attack_name}") -> None:
            if progress:
                progress(text, done, len(data))

        for name, flags in attacked_correct(models, attack, data.x, data.y, batch_size, target, report).items():
            per_attack[name][attack_name] = mean_flag(flags)
            robust[name] &= flags
    return [
        EvalRow(
            model=name,
            attacked=attacked,
            n=len(data),
            clean=mean_flag(clean[name]),
            attacks=per_attack[name],
            adv_sets={lbl: mean_flag(correct(model, s.x, s.y, batch_size)) for lbl, s in (adv_sets or {}).items()},
            worst_case=mean_flag(robust[name]),
        )
        for name, model in models.items()
    ]
