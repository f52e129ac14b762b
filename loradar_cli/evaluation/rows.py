"""Report rows, and clean and robust accuracy with a per-point worst case across attacks (the AutoAttack convention)."""

from collections.abc import Callable, Mapping

import torch
from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import Dataset

from loradar_cli.advset import AdvSet
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import batch_seed, gather_points
from loradar_cli.evaluation.checks import SanityFlag
from loradar_cli.evaluation.suite import AttackRecord
from loradar_cli.loader import Batch, TensorSource, eval_batches
from loradar_cli.metrics import Progress, correct, mean_flag

Source = Dataset[Batch]


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
    data: ImageData | Source,
    attacks: Mapping[str, Callable],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    batch_size: int = 128,
    progress: Progress | None = None,
    engine: Engine | None = None,
    seed: int | None = None,
) -> EvalRow:
    """Evaluate one model against white-box attacks; the worst case counts a point robust only if every attack fails."""
    (row,) = evaluate_group(
        {name: model},
        model,
        data,
        attacks,
        adv_sets,
        batch_size=batch_size,
        progress=progress,
        engine=engine,
        seed=seed,
    )
    return row


def evaluate_group(
    models: Mapping[str, nn.Module],
    target: nn.Module,
    data: ImageData | Source,
    attacks: Mapping[str, Callable],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    batch_size: int = 128,
    progress: Progress | None = None,
    attacked: str = "white-box",
    engine: Engine | None = None,
    seed: int | None = None,
) -> list[EvalRow]:
    """Evaluate models that share one attack target, crafting each attack once per batch for all of them.

    The target is the model itself for a single model, or the surrogate of models without a useful gradient
    (the votes of one ensemble share the mean of their members' logits); `attacked` says which in the rows.
    Batches stream from the data and are dealt out to the processes of a torchrun job; per-point flags are
    gathered in point order, and with `seed` each batch's attacks are seeded by its number, so the rows do not
    depend on the number of processes.
    """
    engine = engine or Engine()
    source = TensorSource(data) if isinstance(data, ImageData) else data
    for module in (target, *models.values()):
        engine.model(module)
    parts = _stream_flags(models, target, source, attacks, batch_size, progress, engine, seed)
    n = len(source)
    flags = {
        name: {key: gather_points(engine.world, p, n).bool() for key, p in per.items()} for name, per in parts.items()
    }
    rows = []
    for name, model in models.items():
        robust = flags[name][_CLEAN].clone()
        for attack_name in attacks:
            robust &= flags[name][attack_name]
        rows.append(
            EvalRow(
                model=name,
                attacked=attacked,
                n=n,
                clean=mean_flag(flags[name][_CLEAN]),
                attacks={a: mean_flag(flags[name][a]) for a in attacks},
                adv_sets={
                    lbl: mean_flag(_set_flags(model, s, batch_size, engine)) for lbl, s in (adv_sets or {}).items()
                },
                worst_case=mean_flag(robust),
            )
        )
    return rows


_CLEAN = "\0clean"  # key of the clean flags beside the attack names (no attack name starts with NUL)
Parts = dict[str, dict[str, list[tuple[int, Tensor]]]]


def _stream_flags(
    models: Mapping[str, nn.Module],
    target: nn.Module,
    source: Source,
    attacks: Mapping[str, Callable],
    batch_size: int,
    progress: Progress | None,
    engine: Engine,
    seed: int | None,
) -> Parts:
    """This process's (first point, flags) pieces per model: clean, then each attack crafted once on `target`."""
    parts: Parts = {name: {key: [] for key in (_CLEAN, *attacks)} for name in models}
    label, done, n = f"{', '.join(models)} · {', '.join(attacks) or 'clean'}", 0, len(source)
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), engine.autocast():
        for number, start, x, y in eval_batches(source, batch_size, engine):
            for name, model in models.items():
                parts[name][_CLEAN].append((start, correct(model, x, y, batch_size).cpu()))
            for k, (attack_name, attack) in enumerate(attacks.items()):
                if seed is not None:
                    torch.manual_seed(batch_seed(seed, number) + k)
                x_adv = attack(target, x, y)
                for name, model in models.items():
                    parts[name][attack_name].append((start, correct(model, x_adv, y, batch_size).cpu()))
            done += len(y) * engine.world.size
            if progress:
                progress(label, min(done, n), n)
    return parts


def _set_flags(model: nn.Module, adv: AdvSet, batch_size: int, engine: Engine) -> Tensor:
    """Per-point correctness on a saved adversarial set (every process scores all of it)."""
    flags = [
        correct(model, engine.batch(adv.x[i : i + batch_size]), adv.y[i : i + batch_size].to(engine.device)).cpu()
        for i in range(0, len(adv.y), batch_size)
    ]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
