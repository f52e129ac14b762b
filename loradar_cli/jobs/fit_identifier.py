"""`fit-identifier`: fit the calibrated attack identifier on labelled sets, with a held-out part, and store it."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from loradar_cli.errors import InvalidValueError
from loradar_cli.identifier import IdentifierMeta, feature_inputs, member_label
from loradar_cli.jobs.identify import ClassScores, Confusion, identification_summary
from loradar_cli.members import BASE_MEMBER, CLEAN, ensemble_probs, input_sets, load_members, member_models
from loradar_cli.models import weights_fingerprint
from loradar_cli.ops.identify import (
    IdentifierModel,
    accuracy,
    calibrate_rejection,
    clean_confidence_stats,
    fit_identifier,
    select_feature_groups,
    stratified_split,
)
from loradar_cli.ops.identify_features import IDENTIFY_FEATURES, compute_features, feature_names
from loradar_cli.store.store import Store


class HeldOutReport(BaseModel):
    """The fitted identifier on the inputs held out of fitting, with rejection."""

    n: int
    accuracy: float | None
    unknown_rate: float | None
    per_class: dict[str, ClassScores]
    confusion: Confusion | None


class FitReport(BaseModel):
    """What `fit-identifier` stored and how well it did: training and held-out accuracy, and the fit's provenance."""

    name: str
    base: str
    members: list[str]
    classes: list[str]
    features: list[str]
    train_accuracy: float
    held_out_accuracy: float
    held_out: HeldOutReport
    training: dict[str, Any]


AUTO_FEATURES = "auto"


def fit_identifier_from_sets(
    store: Store,
    names: Sequence[str],
    *,
    name: str,
    adv_sets: Sequence[Path],
    base: str | None = None,
    data: str | None = None,
    split: str = "val",
    limit: int | None = None,
    clean: str = "base",
    features: Sequence[str] = (AUTO_FEATURES,),
    held_out: float = 0.25,
    reject_quantile: float | None = 0.99,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    balance: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    overwrite: bool = False,
) -> tuple[IdentifierMeta, FitReport]:
    """Fit the calibrated identifier on labelled sets (adversarial sets by attack, --data as clean) and store it.

    A stratified `held_out` fraction of the inputs is kept out of fitting: feature groups ("auto": greedy
    selection by 3-fold accuracy on the rest) and weights are fitted on the rest, the rejection thresholds are
    set on the held-out part at `reject_quantile`, and the report gives training and held-out accuracy. With
    `balance` every class weighs the same in the loss and in the selection's score.
    """
    store.check_free("identifier", name, overwrite)
    if clean not in ("base", "none"):
        raise InvalidValueError(f"--clean must be 'base' or 'none' when fitting, got {clean!r}")
    candidates = _candidate_groups(features)
    members = load_members(store, names, base)
    order = [*members.names, *([BASE_MEMBER] if clean == "base" else [])]
    models = member_models(members, order)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    probs = torch.cat([ensemble_probs([models[m] for m in order], s.x, batch_size) for s in sets], dim=1)
    inputs = feature_inputs(order, dict(zip(order, probs, strict=True)), torch.cat([s.x for s in sets]))
    blocks = {g: compute_features([g], inputs) for g in candidates}
    labels = [s.attack for s in sets for _ in range(len(s.y))]
    fit_options = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "balance": balance}
    fitted = _fit_held_out(
        blocks, labels, list(features) == [AUTO_FEATURES], held_out, reject_quantile, seed, fit_options
    )
    model, groups = fitted.model, fitted.groups
    training = {
        "sets": {s.label: {"attack": s.attack, "n": len(s.y)} for s in sets},
        "split": split,
        "held_out_fraction": held_out,
        "n_fit": len(fitted.kept),
        "n_held_out": len(fitted.held),
        "selection": {"candidates": candidates, "folds": 3, "history": fitted.history} if fitted.history else None,
        **fit_options,
        "seed": seed,
        "reject_quantile": reject_quantile,
        **fitted.scores(),
    }
    tensors = model.state_dict()
    meta = IdentifierMeta(
        name=name,
        base=members.base.meta.name,
        base_fingerprint=members.base.meta.fingerprint,
        members=order,
        member_labels={a.meta.name: member_label(a.meta) for a in members.adapters},
        classes=model.classes,
        feature_names=feature_names(groups, inputs),
        feature_groups=groups,
        clean_confidence=_clean_confidence(order, probs, labels),
        training=training,
        tensors_sha256=weights_fingerprint(tensors),
    )
    store.save_identifier(name, meta.model_dump(mode="json"), tensors, overwrite=overwrite)
    held_labels = [labels[i] for i in fitted.held]
    held_pred = model.predict(fitted.table[fitted.held])
    held_report = HeldOutReport(n=len(fitted.held), **identification_summary(held_labels, held_pred, model.classes))
    return meta, FitReport(
        name=name,
        base=meta.base,
        members=order,
        classes=model.classes,
        features=groups,
        train_accuracy=training["train_accuracy"],
        held_out_accuracy=training["held_out_accuracy"],
        held_out=held_report,
        training=training,
    )


@dataclass(frozen=True)
class _HeldOutFit:
    """A model fitted on the kept rows of a feature table, with the rows held out of fitting."""

    model: IdentifierModel
    groups: list[str]
    history: list[dict[str, object]]
    table: Tensor
    labels: list[str]
    kept: list[int]
    held: list[int]

    def scores(self) -> dict[str, float]:
        """Training and held-out accuracy (closed set), and held-out accuracy with rejection."""
        kept_labels, held_labels = [self.labels[i] for i in self.kept], [self.labels[i] for i in self.held]
        return {
            "train_accuracy": accuracy(kept_labels, self.model.predict(self.table[self.kept], reject=False)),
            "held_out_accuracy": accuracy(held_labels, self.model.predict(self.table[self.held], reject=False)),
            "held_out_accuracy_with_rejection": accuracy(held_labels, self.model.predict(self.table[self.held])),
        }


def _fit_held_out(
    blocks: Mapping[str, Tensor],
    labels: list[str],
    select: bool,
    held_out: float,
    reject_quantile: float | None,
    seed: int,
    fit_options: Mapping[str, Any],
) -> _HeldOutFit:
    """Hold out a stratified part; select groups (if `select`) and fit on the rest; set rejection on the part."""
    kept, held = stratified_split(labels, held_out, seed)
    if not held or len({labels[i] for i in kept}) < 2:
        raise InvalidValueError("need at least 2 inputs in each of at least 2 classes to hold some out")
    kept_labels = [labels[i] for i in kept]
    groups, history = list(blocks), []
    if select:
        kept_blocks = {g: b[kept] for g, b in blocks.items()}
        groups, history = select_feature_groups(kept_blocks, kept_labels, seed=seed, fit_options=fit_options)
    table = torch.cat([blocks[g] for g in groups], dim=1)
    model = fit_identifier(table[kept], kept_labels, seed=seed, **fit_options)
    if reject_quantile is not None:
        model = calibrate_rejection(model, table[kept], kept_labels, table[held], quantile=reject_quantile)
    return _HeldOutFit(model, groups, history, table, labels, kept, held)


def _candidate_groups(features: Sequence[str]) -> list[str]:
    """Feature groups to fit on: all of them for "auto", else the given ones (each checked against the registry)."""
    if list(features) == [AUTO_FEATURES]:
        return IDENTIFY_FEATURES.names()
    if not features:
        raise InvalidValueError(f"no feature groups given (valid: auto, {', '.join(IDENTIFY_FEATURES.names())})")
    for g in features:
        IDENTIFY_FEATURES.get(g)
    return list(dict.fromkeys(features))


def _clean_confidence(order: Sequence[str], probs: Tensor, labels: Sequence[str]) -> dict[str, list[float]] | None:
    """Per member [mean, std] of clean max-probability log-odds, for relative-rule; None without >= 2 clean inputs."""
    rows = [i for i, label in enumerate(labels) if label == CLEAN]
    if len(rows) < 2:
        return None
    mean, std = clean_confidence_stats(probs[:, rows])
    return {m: [float(a), float(b)] for m, a, b in zip(order, mean.tolist(), std.tolist(), strict=True)}
