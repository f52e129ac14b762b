"""One evaluation row: sanity checks, the attack suite with early stopping, saved sets, and the flags raised."""

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from loradar_cli.advset import AdvSet
from loradar_cli.attacks import Attack
from loradar_cli.data import ImageData
from loradar_cli.evaluation import checks
from loradar_cli.evaluation.rows import EvalRow
from loradar_cli.evaluation.suite import run_suite
from loradar_cli.metrics import Progress, correct, mean_flag, predict_logits

CHECK_POINTS = 64  # points used by the checks that run extra attacks
CHECK_STEPS = 20  # iteration cap of the attack used for the eps and steps checks


def evaluate_suite(
    name: str,
    judge: nn.Module,
    data: ImageData,
    attacks: Mapping[str, Attack[Any]],
    adv_sets: Mapping[str, AdvSet] | None = None,
    *,
    targets: Mapping[str, nn.Module] | None = None,
    early_stop: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalRow:
    """Evaluate `judge` (a model or an ensemble's decision) under `attacks` in order, through each of `targets`.

    The row holds clean accuracy, robust accuracy after each attack, the per-point worst case, saved-set
    accuracies, every attack's record, and the sanity flags; `meta` fills suite, norm, eps and seed.
    """
    targets = dict(targets or {"white-box": judge})
    x, y = data.x, data.y
    num_classes = predict_logits(judge, x[:1]).shape[1] if len(x) else 0
    attacks, flags = checks.usable_attacks(attacks, num_classes)
    attacks, randomised = checks.eot_if_randomised(judge, attacks, x[:CHECK_POINTS])  # attacked with EOT, flagged
    flags += randomised
    flags += _pre_checks(judge, targets, attacks, x[:CHECK_POINTS], y[:CHECK_POINTS])
    result = run_suite(
        judge, x, y, attacks, targets=targets, early_stop=early_stop, batch_size=batch_size, progress=progress
    )
    sets = {lbl: mean_flag(correct(judge, s.x, s.y, batch_size)) for lbl, s in (adv_sets or {}).items()}
    clean, worst = mean_flag(result.clean), mean_flag(result.robust)
    black_box = _black_box_hits(result.records) if early_stop else {}
    flags += checks.check_results(clean, worst, len(x), result.records, sets, black_box)
    per_attack = {r.label: (r.robust_after if early_stop else r.robust_alone or 0.0) for r in result.records}
    return EvalRow(
        model=name,
        attacked=" + ".join(targets),
        n=len(x),
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


def _pre_checks(
    judge: nn.Module, targets: Mapping[str, nn.Module], attacks: Mapping[str, Attack[Any]], x: Tensor, y: Tensor
) -> list[checks.SanityFlag]:
    """Gradients, eps = 0, and monotonicity in eps and steps on a few points (determinism is checked before)."""
    flags = checks.check_gradients(targets, x, y)
    target = next(iter(targets.values()))
    flags += checks.check_eps_zero(judge, target, attacks, x, y)
    gradient = [(lbl, a) for lbl, a in attacks.items() if a.name not in checks.BLACK_BOX and a.threat_model != "patch"]
    if gradient:
        label, attack = gradient[0]
        capped = {k: min(getattr(attack.config, k), CHECK_STEPS) for k in ("steps",) if hasattr(attack.config, k)}
        attack = type(attack)(attack.config.model_copy(update=capped))
        flags += checks.check_monotone(judge, target, attack, label, x, y)
    return flags


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
