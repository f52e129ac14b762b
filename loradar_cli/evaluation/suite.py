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
from torch.utils.data import Dataset

from loradar_cli.attacks import ATTACKS, Attack, build_attack
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import batch_seed, gather, gather_points
from loradar_cli.errors import InvalidValueError
from loradar_cli.loader import Batch, TensorSource, eval_batches
from loradar_cli.metrics import Progress, correct, mean_flag
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
    seconds: float  # compute seconds, summed over the processes of a torchrun job


@dataclass(frozen=True)
class SuiteResult:
    """Per-point flags (clean, worst case) and one record per (attack, target) in the order they ran."""

    clean: Tensor
    robust: Tensor
    records: list[AttackRecord]
    fooled_by: dict[str, Tensor]  # label -> bool [N], points this attack broke


Step = tuple[str, Attack[Any], str, nn.Module]  # (attack label, attack, target description, target)
FLAGS_PER_STEP = 4  # per point and step: attacked, fooled, claimed but unconfirmed, robust after the step


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
    """`stream_suite` over tensors already in memory, in this process, on their device."""
    source = TensorSource(ImageData(x, y, 0, "tensors"))
    return stream_suite(
        judge, source, attacks, targets=targets, early_stop=early_stop, batch_size=batch_size, progress=progress,
        engine=Engine(x.device),
    )  # fmt: skip


def stream_suite(
    judge: nn.Module,
    source: Dataset[Batch],
    attacks: Mapping[str, Attack[Any]],
    *,
    targets: Mapping[str, nn.Module] | None = None,
    early_stop: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> SuiteResult:
    """Run attacks in order against each target; `judge` decides correctness (the decision being evaluated).

    `targets` maps a description to the model attacked (default `{"white-box": judge}`); with several (the
    differentiable surrogates of an ensemble's decision) a point must survive every attack through every
    target. Without `early_stop` every attack runs on every point to the end and the worst case is taken
    afterwards, which gives the same flags for seeded attacks (each batch draws from its own seed).

    Batches stream from `source` in point order, one at a time, and go through every attack before the next is
    read, so memory holds one batch of images whatever the number of points. This batch-major order gives the
    flags of AutoAttack's attack-major one: the points an attack runs on in a batch depend only on that batch's
    earlier attacks, and each (attack, batch) draws from its own seed. Under torchrun the batches are dealt
    out to the processes and the per-point flags gathered; since a batch is the same batch on any number of
    processes and its attacks are seeded by its number, the result equals a one-process run's.
    """
    engine = engine or Engine()
    targets = dict(targets or {"white-box": judge})
    plan = [(label, attack, name, target) for label, attack in attacks.items() for name, target in targets.items()]
    parts, seconds, done, n = [], [0.0] * len(plan), 0, len(source)  # type: ignore[arg-type]
    stage = ", ".join(attacks) or "clean"
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), engine.autocast():
        for number, first, x, y in eval_batches(source, batch_size, engine):
            torch.manual_seed(batch_seed(0, number))  # unseeded attacks too draw the same on any number of processes
            parts.append((first, _suite_batch(judge, x, y, number, plan, early_stop, batch_size, seconds).cpu()))
            done += len(y) * engine.world.size
            if progress:
                progress(stage, min(done, n), n)
    flags = gather_points(engine.world, parts, n).reshape(n, 1 + FLAGS_PER_STEP * len(plan)).bool()
    total = [sum(s) for s in zip(*gather(engine.world, seconds), strict=True)]
    return _result(flags, plan, early_stop, total)


def _suite_batch(
    judge: nn.Module,
    x: Tensor,
    y: Tensor,
    number: int,
    plan: list[Step],
    early_stop: bool,
    batch_size: int,
    seconds: list[float],
) -> Tensor:
    """One batch through every step: bool `[b, 1 + 4 * steps]`, clean then the flags of each step (time added up)."""
    clean = correct(judge, x, y, batch_size)
    robust, columns = clean.clone(), [clean]
    for k, (_, attack, _, target) in enumerate(plan):
        start = time.perf_counter()
        active = robust.clone() if early_stop else torch.ones_like(robust)
        fooled, unconfirmed = _attack_batch(judge, target, x, y, _reseeded(attack, number), active, early_stop)
        robust &= ~fooled
        columns += [active, fooled, unconfirmed, robust.clone()]
        seconds[k] += time.perf_counter() - start
    return torch.stack(columns, 1)


def _attack_batch(
    judge: nn.Module, target: nn.Module, x: Tensor, y: Tensor, attack: Attack[Any], active: Tensor, early_stop: bool
) -> tuple[Tensor, Tensor]:
    """Points of `active` the attack fools (re-scored by the judge), and those it claimed but did not fool."""
    none = torch.zeros_like(active)
    if early_stop and not active.any():
        return none, none
    judge_arg = None if judge is target else judge
    x_adv, claimed = attack.until_fooled(target, x, y, early_stop=early_stop, judge=judge_arg, active=active)
    claimed = claimed & active
    still = none.clone()
    if claimed.any():
        still[claimed] = correct(judge, x_adv[claimed], y[claimed], len(y))
    return claimed & ~still, still


def _result(flags: Tensor, plan: list[Step], early_stop: bool, seconds: list[float]) -> SuiteResult:
    """Records and per-point flags of all points from the gathered flag columns."""
    clean, records, fooled_by = flags[:, 0], [], {}
    for k, (label, attack, target_name, _) in enumerate(plan):
        active, fooled, unconfirmed, robust = flags[:, 1 + FLAGS_PER_STEP * k : 1 + FLAGS_PER_STEP * (k + 1)].unbind(1)
        records.append(
            AttackRecord(
                label=label,
                attack=attack.describe(),
                target=target_name,
                attacked=int(active.sum()),
                fooled=int((fooled & clean).sum()),
                unconfirmed=int(unconfirmed.sum()),
                robust_after=mean_flag(robust),
                robust_alone=None if early_stop else mean_flag(clean & ~fooled),
                seconds=round(seconds[k], 3),
            )
        )
        fooled_by[label] = fooled_by.get(label, torch.zeros_like(clean)) | fooled
    robust = flags[:, -1] if plan else clean.clone()
    return SuiteResult(clean, robust.clone(), records, fooled_by)


def _reseeded(attack: Attack[Any], batch: int) -> Attack[Any]:
    """The attack with a seed derived from its own and the batch number (unchanged when unseeded)."""
    seed = attack.config.seed
    if seed is None:
        return attack
    return type(attack)(attack.config.model_copy(update={"seed": seed * 1_000_003 + batch}))


def labels_of(suite: str, norm: str) -> Sequence[str]:
    """The attack labels of a suite in the order they run."""
    return [label for label, _, _ in SUITES.get(suite)(norm)]
