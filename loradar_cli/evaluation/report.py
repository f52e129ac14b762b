"""One evaluation row: sanity checks, the attack suite with early stopping, saved sets, and the flags raised."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from loradar_cli.advset import AdvSet
from loradar_cli.attacks import Attack
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import spread
from loradar_cli.evaluation import checks
from loradar_cli.evaluation.rows import EvalRow
from loradar_cli.evaluation.suite import stream_suite
from loradar_cli.loader import Batch, TensorSource
from loradar_cli.metrics import Progress, mean_flag, predict_logits

Source = Dataset[Batch]

CHECK_POINTS = 64  # points used by the checks that run extra attacks


def evaluate_suite(
    name: str,
    judge: nn.Module,
    data: ImageData | Source,
    attacks: Mapping[str, Attack[Any]],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    targets: Mapping[str, nn.Module] | None = None,
    early_stop: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
) -> EvalRow:
    """Evaluate `judge` (a model or an ensemble's decision) under `attacks` in order, through each of `targets`.

    The row holds clean accuracy, robust accuracy after each attack, the per-point worst case, saved-set
    accuracies, every attack's record, and the sanity flags; `meta` fills suite, norm, eps and seed. The data
    and the saved sets stream batch by batch (sharded over the processes of a torchrun job); the checks that
    run extra attacks read only the first points, their attack runs shared out among the processes.
    """
    engine = engine or (Engine(data.x.device) if isinstance(data, ImageData) else Engine())
    source = TensorSource(data) if isinstance(data, ImageData) else data
    targets = dict(targets or {"white-box": judge})
    x, y = _head(source, CHECK_POINTS, engine)
    num_classes = predict_logits(judge, x[:1]).shape[1] if len(x) else 0
    attacks, flags = checks.usable_attacks(attacks, num_classes)
    attacks, randomised = checks.eot_if_randomised(judge, attacks, x)  # attacked with EOT, flagged
    flags += randomised
    world = engine.world
    flags += checks.pre_checks(judge, targets, attacks, x, y, run=lambda ps: spread(world, ps, [p.cost for p in ps]))
    result = stream_suite(
        judge, source, attacks, targets=targets, early_stop=early_stop, batch_size=batch_size, progress=progress,
        engine=engine,
    )  # fmt: skip
    sets = {lbl: mean_flag(_set_flags(judge, s, batch_size, engine)) for lbl, s in (adv_sets or {}).items()}
    clean, worst, n = mean_flag(result.clean), mean_flag(result.robust), len(result.clean)
    black_box = _black_box_hits(result.records) if early_stop else {}
    flags += checks.check_results(clean, worst, n, result.records, sets, black_box)
    per_attack = {r.label: (r.robust_after if early_stop else r.robust_alone or 0.0) for r in result.records}
    return EvalRow(
        model=name,
        attacked=" + ".join(targets),
        n=n,
        clean=clean,
        attacks=per_attack,
        adv_sets=sets,
        worst_case=worst,
        early_stop=early_stop,
        records=result.records,
        checks=sorted(checks.EXPLAIN),
        flags=_unique(flags),
        **dict(meta or {}),
    )


def _head(source: Source, count: int, engine: Engine) -> tuple[Tensor, Tensor]:
    """The first `count` points on the engine's device: what every process runs the pre-checks on."""
    n = min(count, len(source))  # type: ignore[arg-type]
    if not n:
        return torch.zeros(0, 1, 1, 1, device=engine.device), torch.zeros(0, dtype=torch.long, device=engine.device)
    _, x, y = source[list(range(n))]
    return engine.batch(x), y.to(engine.device)


def _set_flags(judge: nn.Module, adv: AdvSet, batch_size: int, engine: Engine) -> Tensor:
    """Per-point correctness of the judge on a saved set, streamed and sharded like the data."""
    source = TensorSource(ImageData(adv.x, adv.y, 0, adv.label))
    return stream_suite(judge, source, {}, batch_size=batch_size, engine=engine).clean


def _black_box_hits(records: list[Any]) -> dict[str, int]:
    """Points each score-only attack broke after at least one gradient attack had run on them."""
    hits: dict[str, int] = {}
    seen_gradient = False
    for r in records:
        if r.attack["name"] in checks.BLACK_BOX:
            if seen_gradient:
                hits[r.label] = hits.get(r.label, 0) + r.fooled
        else:
            seen_gradient = True
    return hits


def _unique(flags: list[checks.SanityFlag]) -> list[checks.SanityFlag]:
    """Flags in order, one per (id, message)."""
    return list({(f.id, f.message): f for f in flags}.values())
