"""Attack suites with AutoAttack's early stopping and per-point worst case.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, arXiv:2003.01690: attacks run in a fixed order, each only on the points every earlier
attack failed on; a point is robust only if it survives them all. Points misclassified clean are not attacked,
and an attack stops on a point once it is fooled, keeping that example.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from loradar_cli.attacks import ATTACKS, Attack, build_attack
from loradar_cli.errors import InvalidValueError
from loradar_cli.metrics import Progress, correct
from loradar_cli.registry import Registry

Entry = tuple[str, str, dict[str, Any]]  # (label in reports, registered attack, options beyond eps and seed)
SUITES: Registry[Callable[[str], list[Entry]]] = Registry("suite")
NORMS = ("linf", "l2")


@SUITES.register("quick")
def _quick(norm: str) -> list[Entry]:
    """PGD then APGD-CE: a fast first look."""
    suffix = "-l2" if norm == "l2" else ""
    return [("pgd", f"pgd{suffix}", {}), ("apgd-ce", f"apgd{suffix}", {"loss": "ce"})]


@SUITES.register("standard")
def _standard(norm: str) -> list[Entry]:
    """APGD-CE, APGD-T (targeted DLR, 9 targets) and Square (5000 queries): AutoAttack's standard version minus FAB-T."""
    suffix = "-l2" if norm == "l2" else ""
    return [
        ("apgd-ce", f"apgd{suffix}", {"loss": "ce"}),
        ("apgd-t", f"apgd-t{suffix}", {}),
        ("square", f"square{suffix}", {}),
    ]


@SUITES.register("plus")
def _plus(norm: str) -> list[Entry]:
    """The standard suite, then FAB-T, FGSM, ROA and FIA (the L-inf ones only under L-inf; ROA is a patch attack)."""
    extra: list[Entry] = [("fab-t", "fab-t", {}), ("fgsm", "fgsm", {}), ("roa", "roa", {}), ("fia", "fia", {})]
    return _standard(norm) + [e for e in extra if norm == "linf" or ATTACKS.get(e[1]).threat_model == "patch"]


def suite_attacks(
    suite: str,
    *,
    norm: str = "linf",
    eps: float | None = None,
    seed: int = 0,
    steps: int | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Attack[Any]]:
    """Built attacks of a suite, by label: `eps` and `seed` go to every attack of the norm (ROA keeps its own
    sticker budget), `steps` to every attack that iterates, `overrides[label]` last."""
    if norm not in NORMS:
        raise InvalidValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    out = {}
    for label, name, options in SUITES.get(suite)(norm):
        cls = ATTACKS.get(name)
        fields = cls.config_cls.model_fields
        opts: dict[str, Any] = {"seed": seed, **options}
        if eps is not None and cls.threat_model != "patch":
            opts["eps"] = eps
            if "alpha" in fields and name.startswith("pgd") and eps > 0:
                opts["alpha"] = eps / 4
        if steps is not None:
            opts.update({k: steps for k in ("steps", "queries") if k in fields})
        opts.update((overrides or {}).get(label, {}))
        out[label] = build_attack(name, **opts)
    return out


class AttackRecord(BaseModel):
    """One attack of a suite run: what ran, against what, on how many points, and what it broke."""

    label: str
    attack: dict[str, Any]  # Attack.describe(): name, threat model, full config
    target: str  # what the attack computed its gradients or scores on
    attacked: int  # points it ran on
    fooled: int  # points it broke (confirmed by re-scoring the returned examples)
    unconfirmed: int  # points the attack reported fooled but that re-scoring found correct
    robust_after: float  # robust accuracy after this attack and all earlier ones
    robust_alone: float | None = None  # this attack alone on every clean-correct point (without early stopping)
    seconds: float


@dataclass(frozen=True)
class SuiteResult:
    """Per-point flags (clean, worst case) and one record per (attack, target) in the order they ran."""

    clean: Tensor
    robust: Tensor
    records: list[AttackRecord]
    fooled_by: dict[str, Tensor]  # label -> bool [N], points this attack broke


def run_suite(
    judge: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Mapping[str, Attack[Any]],
    *,
    targets: Mapping[str, nn.Module] | None = None,
    early_stop: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> SuiteResult:
    """Run attacks in order against each target; `judge` decides correctness (the decision being evaluated).

    `targets` maps a description to the model attacked (default `{"white-box": judge}`); with several (the
    differentiable surrogates of an ensemble's decision) a point must survive every attack through every
    target. Without `early_stop` every attack runs on every point to the end and the worst case is taken
    afterwards, which gives the same flags for seeded attacks (each batch draws from its own seed).
    """
    targets = dict(targets or {"white-box": judge})
    clean = correct(judge, x, y, batch_size)
    robust = clean.clone()
    records, fooled_by = [], {}
    for label, attack in attacks.items():
        hit = torch.zeros_like(clean)
        for target_name, target in targets.items():
            start = time.perf_counter()
            active = robust.clone() if early_stop else torch.ones_like(robust)
            fooled, unconfirmed = _attack_points(judge, target, x, y, attack, active, early_stop, batch_size, progress)
            hit |= fooled
            robust &= ~fooled
            records.append(
                AttackRecord(
                    label=label,
                    attack=attack.describe(),
                    target=target_name,
                    attacked=int(active.sum()),
                    fooled=int((fooled & clean).sum()),
                    unconfirmed=unconfirmed,
                    robust_after=robust.float().mean().item() if len(x) else 0.0,
                    robust_alone=None if early_stop else (clean & ~fooled).float().mean().item(),
                    seconds=round(time.perf_counter() - start, 3),
                )
            )
        fooled_by[label] = hit
    return SuiteResult(clean, robust, records, fooled_by)


def _attack_points(
    judge: nn.Module,
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack[Any],
    active: Tensor,
    early_stop: bool,
    batch_size: int,
    progress: Progress | None,
) -> tuple[Tensor, int]:
    """Points of `active` the attack fools (re-scored by the judge), and how many it claimed but did not fool.

    Batches are fixed slices of all points, each with its own seed derived from the attack's, so a point's
    random draws do not depend on which other points are still attacked.
    """
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    unconfirmed = 0
    judge_arg = None if judge is target else judge
    for b, i in enumerate(range(0, len(x), batch_size)):
        part = slice(i, i + batch_size)
        if early_stop and not active[part].any():
            continue
        batch_attack = _reseeded(attack, b)
        x_adv, claimed = batch_attack.until_fooled(
            target, x[part], y[part], early_stop=early_stop, judge=judge_arg, active=active[part]
        )
        claimed &= active[part]
        still = torch.zeros_like(claimed)
        if claimed.any():
            still[claimed] = correct(judge, x_adv[claimed], y[part][claimed], batch_size)
        unconfirmed += int(still.sum())
        fooled[part] = claimed & ~still
        if progress:
            progress(attack.name, min(i + batch_size, len(x)), len(x))
    return fooled, unconfirmed


def _reseeded(attack: Attack[Any], batch: int) -> Attack[Any]:
    """The attack with a seed derived from its own and the batch index (unchanged when unseeded)."""
    seed = attack.config.seed
    if seed is None:
        return attack
    return type(attack)(attack.config.model_copy(update={"seed": seed * 1_000_003 + batch}))


def labels_of(suite: str, norm: str) -> Sequence[str]:
    """The attack labels of a suite in the order they run."""
    return [label for label, _, _ in SUITES.get(suite)(norm)]
