"""The job behind `loradar eval`: clean, white-box and saved-set accuracy of bases, adapters and ensembles."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from loradar_cli.advset import AdvSet, labelled_adv_sets
from loradar_cli.attacks import build_attack
from loradar_cli.device import Engine, using
from loradar_cli.evaluation import EvalRow, evaluate, evaluate_group
from loradar_cli.loading import model_on, model_source
from loradar_cli.metrics import Progress
from loradar_cli.store.store import Store


@dataclass(frozen=True)
class EnsembleRows:
    """Ensemble rows for `evaluate_models`: voters, methods (majority/weighted/soft/route) and their options."""

    members: Sequence[str]
    methods: Sequence[str]
    weights: Sequence[float] | None = None
    identifier: str | None = None


def evaluate_models(
    store: Store,
    *,
    base: str,
    adapters: Sequence[str | None],
    data: str,
    attacks: Mapping[str, Mapping[str, Any]],
    adv_sets: Sequence[Path] = (),
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    ensemble: EnsembleRows | None = None,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> list[EvalRow]:
    """Evaluate the base (None), each adapter and each ensemble method: clean, attacks, saved sets, worst case.

    Attacks are white-box against each row's model; ensemble rows are attacked through the mean of their
    members' logits (the decision of a vote has no gradient), never transferred from the base. Batch k of every
    attack is seeded by (seed, k), so under torchrun, where the processes split the batches, the rows equal a
    one-process run's.
    """
    engine = engine or Engine()
    stored = store.load_base(base)
    clean = model_source(data, split, stored.meta, seed=seed, limit=limit)
    sets = labelled_adv_sets(adv_sets, stored.meta.input_size)
    built = {name: build_attack(name, **dict(options)) for name, options in attacks.items()}
    rows = []
    for adapter in adapters:
        model = model_on(store, stored, adapter)
        rows.append(
            evaluate(
                model,
                adapter or "base",
                clean,
                built,
                sets,
                batch_size=batch_size,
                progress=progress,
                engine=engine,
                seed=seed,
            )
        )
    if ensemble is not None:
        rows += _evaluate_ensemble(store, base, ensemble, clean, built, sets, seed, batch_size, progress, engine)
    return rows


def _evaluate_ensemble(
    store: Store,
    base: str,
    spec: EnsembleRows,
    clean: Dataset,
    attacks: Mapping[str, Any],
    sets: Mapping[str, AdvSet],
    seed: int,
    batch_size: int,
    progress: Progress | None,
    engine: Engine,
) -> list[EvalRow]:
    """One row per ensemble method; all share the mean logits of the voters, so each attack is crafted once."""
    from loradar_cli.combine.ensemble import load_ensemble

    with using(engine):  # members are built on the engine's device
        loaded = load_ensemble(
            store, spec.members, methods=spec.methods, base=base, weights=spec.weights, identifier=spec.identifier
        )
    classifiers = {
        method if method == "route" else f"vote:{method}": loaded.classifier(method) for method in loaded.decisions
    }
    return evaluate_group(
        classifiers,
        loaded.surrogate(),
        clean,
        attacks,
        sets,
        batch_size=batch_size,
        progress=progress,
        attacked=f"mean logits of {len(loaded.voters)} members",
        engine=engine,
        seed=seed,
    )
