"""The job behind `loradar eval`: clean, white-box and saved-set accuracy of bases, adapters and ensembles."""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from loradar_cli.advset import labelled_adv_sets
from loradar_cli.attacks import Attack, build_attack
from loradar_cli.device import Engine, using
from loradar_cli.evaluation import EvalRow, evaluate_suite, stream_suite, suite_attacks
from loradar_cli.evaluation.checks import flag, noise
from loradar_cli.loader import Batch
from loradar_cli.loading import model_on, model_source
from loradar_cli.metrics import Progress, mean_flag
from loradar_cli.store.store import Store


@dataclass(frozen=True)
class EnsembleRows:
    """Ensemble rows for `evaluate_models`: voters, methods (majority/weighted/soft/route) and their options."""

    members: Sequence[str]
    methods: Sequence[str]
    weights: Sequence[float] | None = None
    identifier: str | None = None


@dataclass(frozen=True)
class SuiteSpec:
    """A named suite (quick, standard, plus) at one threat model; `overrides` maps an attack label to options."""

    name: str
    norm: str = "linf"
    eps: float | None = None
    steps: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class _Row:
    """One row to evaluate: the decision judged, and the models attacked to attack it."""

    name: str
    judge: nn.Module
    targets: dict[str, nn.Module]


def evaluate_models(
    store: Store,
    *,
    base: str,
    adapters: Sequence[str | None],
    data: str,
    attacks: Mapping[str, Mapping[str, Any]] | None = None,
    suite: SuiteSpec | None = None,
    adv_sets: Sequence[Path] = (),
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    ensemble: EnsembleRows | None = None,
    eps_sweep: Sequence[float] = (),
    early_stop: bool = True,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> list[EvalRow]:
    """Evaluate the base (None), each adapter and each ensemble method: clean, attacks, saved sets, worst case.

    Attacks (`attacks` by name, then a `suite`'s) run in order with early stopping and are white-box against
    each row's decision: ensemble votes through their mean logits and the soft vote of member probabilities,
    route through the routed decision; never transferred from the base. Each row carries its sanity flags and,
    with `eps_sweep`, the worst case at each eps of the suite (or of the attacks). The split streams through the
    loader in point order (an image folder is decoded batch by batch); under torchrun its batches are shared out
    and the per-point flags gathered, so every process returns the rows of a one-process run.
    """
    engine = engine or Engine()
    stored = store.load_base(base)
    clean = model_source(data, split, stored.meta, seed=seed, limit=limit)
    sets = labelled_adv_sets(adv_sets, stored.meta.input_size, num_classes=stored.meta.num_classes)
    built = build_attacks(attacks or {}, suite, seed)
    meta = _meta(suite, built, seed)
    rows = []
    with using(engine):  # models are built on the engine's device
        row_specs = _rows(store, stored, base, adapters, ensemble, engine)
    for row in row_specs:
        torch.manual_seed(seed)
        result = evaluate_suite(
            row.name, row.judge, clean, built, sets, targets=row.targets, early_stop=early_stop,
            batch_size=batch_size, progress=progress, meta=meta, engine=engine,
        )  # fmt: skip
        if eps_sweep:
            sweep = _Sweep(attacks or {}, suite, seed, eps_sweep)
            result = _with_sweep(result, row, clean, sweep, batch_size, progress, engine)
        rows.append(result)
    return rows


def build_attacks(
    attacks: Mapping[str, Mapping[str, Any]], suite: SuiteSpec | None, seed: int, eps: float | None = None
) -> dict[str, Attack[Any]]:
    """Attacks by name (seeded with `seed` unless their options say otherwise), then the suite's, in order."""
    built: dict[str, Attack[Any]] = {}
    for name, options in attacks.items():
        opts = {"seed": seed, **dict(options), **({"eps": eps} if eps is not None else {})}
        built[name] = build_attack(name, **opts)
    if suite is not None:
        eps = suite.eps if eps is None else eps
        built.update(
            suite_attacks(suite.name, norm=suite.norm, eps=eps, seed=seed, steps=suite.steps, overrides=suite.overrides)
        )
    return built


def _meta(suite: SuiteSpec | None, built: Mapping[str, Attack[Any]], seed: int) -> dict[str, Any]:
    """Suite, norm, eps and seed for the rows (eps and norm of the first attack when no suite is named)."""
    first = next(iter(built.values()), None)
    eps = suite.eps if suite and suite.eps is not None else (first.config.eps if first else None)
    norm = suite.norm if suite else (first.threat_model if first else None)
    return {"suite": suite.name if suite else None, "norm": norm, "eps": eps, "seed": seed}


def _rows(
    store: Store,
    stored: Any,
    base: str,
    adapters: Sequence[str | None],
    ensemble: EnsembleRows | None,
    engine: Engine,
) -> list[_Row]:
    """Single models attacked white-box, then one row per ensemble method with its attack targets."""
    rows = []
    for adapter in adapters:
        model = engine.model(model_on(store, stored, adapter))
        rows.append(_Row(adapter or "base", model, {"white-box": model}))
    if ensemble is not None:
        from loradar_cli.jobs.ensemble_vote import load_ensemble

        loaded = load_ensemble(
            store, ensemble.members, methods=ensemble.methods, base=base, weights=ensemble.weights,
            identifier=ensemble.identifier,
        )  # fmt: skip
        for method in loaded.decisions:
            name = method if method == "route" else f"vote:{method}"
            rows.append(_Row(name, loaded.classifier(method), loaded.targets(method)))
        if loaded.router is not None:  # route with a calibrated identifier: also the attacker who evades it
            from loradar_cli.jobs.attack_target import ADAPTIVE_ROUTE, adaptive_route_targets

            rows.append(_Row(ADAPTIVE_ROUTE, loaded.classifier("route"), adaptive_route_targets(loaded)))
    return rows


@dataclass(frozen=True)
class _Sweep:
    """What --eps-sweep rebuilds at each eps: the attacks by name, the suite, the seed, and the eps values."""

    attacks: Mapping[str, Mapping[str, Any]]
    suite: SuiteSpec | None
    seed: int
    eps: Sequence[float]


def _with_sweep(
    row: EvalRow,
    spec: _Row,
    data: Dataset[Batch],
    sweep: _Sweep,
    batch_size: int,
    progress: Progress | None,
    engine: Engine,
) -> EvalRow:
    """The row with its worst case at each eps, flagged when accuracy rises with eps beyond noise."""
    curve = []
    for eps in sweep.eps:
        built = build_attacks(sweep.attacks, sweep.suite, sweep.seed, eps=eps)
        built = {k: a for k, a in built.items() if a.threat_model != "patch"}
        result = stream_suite(
            spec.judge, data, built, targets=spec.targets, batch_size=batch_size, progress=progress, engine=engine
        )
        curve.append((eps, mean_flag(result.robust)))
    flags = list(row.flags)
    for (e1, a1), (e2, a2) in itertools.pairwise(curve):
        if e2 > e1 and a2 > a1 + noise(a1, row.n):
            flags.append(flag("accuracy-rises-with-eps", f"sweep: {a1:.3f} at {e1:.4g}, {a2:.3f} at {e2:.4g}"))
    return row.model_copy(update={"sweep": curve, "flags": flags})
