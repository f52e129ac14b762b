"""`identify-attack`: per input, the attack it came from, by the LoRADAR rule (absolute or relative to each
member's clean confidence) or a stored calibrated identifier; accuracy, per-class scores and the confusion matrix."""

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer
from torch import Tensor

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.identifier import Identifier, check_identifier_base, load_identifier, member_label
from loradar_cli.loading import model_data
from loradar_cli.members import (
    BASE_MEMBER,
    CLEAN,
    InputSet,
    Members,
    ensemble_probs,
    input_sets,
    load_members,
    member_models,
    write_json,
)
from loradar_cli.ops.identify import (
    UNKNOWN,
    accuracy,
    clean_confidence_stats,
    identify_relative,
    identify_rule,
    per_class_scores,
)
from loradar_cli.ops.identify_modes import DEFAULT_MARGINS, IDENTIFY_MODES
from loradar_cli.store.meta import BaseMeta
from loradar_cli.store.store import Store


class ClassScores(BaseModel):
    """One true class: precision (None when never predicted), recall and how many inputs had it."""

    precision: float | None
    recall: float
    support: int


class Confusion(BaseModel):
    """Counts per (true label, answer): rows the true labels present, columns the answers with "unknown" last."""

    rows: list[str]
    columns: list[str]
    matrix: list[list[int]]


class IdentifyRow(BaseModel):
    """One input set: its true attack, identification accuracy (None when empty) and predicted-label counts."""

    n: int
    attack: str
    accuracy: float | None
    predicted: dict[str, int]


_SETUP_FIELDS = ("identifier", "classes", "features", "reject", "margin", "clean", "labels", "calibration")


class IdentifyReport(BaseModel):
    """What `identify-attack` measured: the members, the mode and its setup, the summary and one row per set.

    The setup fields belong to one mode each (calibrated: identifier, classes, features, reject; the rules: margin,
    clean, labels, and relative-rule's calibration); the others are left out of the JSON.
    """

    base: str
    members: list[str]
    mode: str
    identifier: str | None = None
    classes: list[str] | None = None
    features: list[str] | None = None
    reject: bool | None = None
    margin: float | None = None
    clean: str | None = None
    labels: dict[str, str] | None = None
    calibration: str | None = None
    accuracy: float | None
    unknown_rate: float | None
    per_class: dict[str, ClassScores]
    confusion: Confusion | None
    sets: dict[str, IdentifyRow]

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k in _SETUP_FIELDS and v is None)}


def _rule_members(members: Members, clean: str) -> tuple[list[str], list[str], int | None]:
    """Members for the rule (adapters + the clean member), their attack labels, and the clean member's index."""
    names, labels = members.names, [member_label(a.meta) for a in members.adapters]
    if clean == "none":
        return names, labels, None
    if clean == "base":
        return [*names, BASE_MEMBER], [*labels, CLEAN], len(names)
    if clean not in names:
        raise InvalidValueError(f"--clean {clean!r} must be 'base', 'none' or one of the given adapters")
    return names, labels, names.index(clean)


CALIBRATION_LIMIT = 1000
"""Clean inputs the relative rule calibrates on when no --limit is given."""

Predict = Callable[[Mapping[str, Tensor], Tensor], list[str]]


def identify_sets(
    store: Store,
    names: Sequence[str],
    *,
    base: str | None = None,
    mode: str | None = None,
    identifier: str | None = None,
    margin: float | None = None,
    clean: str = "base",
    data: str | None = None,
    split: str = "test",
    adv_sets: Sequence[Path] = (),
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    out: Path | None = None,
    reject: bool = True,
) -> IdentifyReport:
    """Per input, the attack family it came from; accuracy, per-class precision/recall and the confusion matrix.

    `mode` defaults to calibrated with an identifier, else relative-rule; `margin` to the mode's DEFAULT_MARGINS.
    relative-rule calibrates on the identifier's clean statistics, else on a clean split of --data (or of the
    base's data set) other than `split` (val, or train when scoring val). `reject=False` turns the calibrated identifier's "unknown" off.
    """
    mode = mode or ("calibrated" if identifier else "relative-rule")
    IDENTIFY_MODES.get(mode)
    ident = _calibrated_identifier(store, identifier, names) if identifier else None
    if mode == "calibrated" and ident is None:
        raise InvalidValueError("--mode calibrated needs --identifier NAME (fit one with `loradar fit-identifier`)")
    members = load_members(store, list(names) or (ident.adapter_names if ident else []), base or _ident_base(ident))
    if ident is not None:
        check_identifier_base(ident, members.base.meta)
    if mode == "calibrated":
        assert ident is not None
        models = member_models(members, ident.members)
        predict: Predict = functools.partial(ident.predict, reject=reject)
        setup: dict[str, Any] = {
            "identifier": ident.meta.name,
            "classes": ident.meta.classes,
            "features": ident.meta.feature_groups,
            "reject": reject,
        }
    else:
        margin = DEFAULT_MARGINS[mode] if margin is None else margin
        models, predict, setup = _rule_predictor(members, mode, ident, margin, clean, data, split, limit, seed)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    predicted = {
        s.label: predict(dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size), strict=True)), s.x)
        for s in sets
    }
    truth = [s.attack for s in sets for _ in range(len(s.y))]
    classes = ident.meta.classes if ident is not None and mode == "calibrated" else None
    report = IdentifyReport(
        base=members.base.meta.name,
        members=members.names,
        mode=mode,
        **setup,
        **identification_summary(truth, [p for s in sets for p in predicted[s.label]], classes),
        sets={s.label: _identify_row(s, predicted[s.label]) for s in sets},
    )
    if out is not None:
        write_json(
            out, {"mode": mode, "sets": {s.label: {"attack": s.attack, "predicted": predicted[s.label]} for s in sets}}
        )
    return report


def _rule_predictor(
    members: Members,
    mode: str,
    ident: Identifier | None,
    margin: float,
    clean: str,
    data: str | None,
    split: str,
    limit: int | None,
    seed: int,
) -> tuple[dict[str, torch.nn.Module], Predict, dict[str, Any]]:
    """Member models, predict function and report fields of the absolute or relative rule."""
    order, labels, clean_index = _rule_members(members, clean)
    models = member_models(members, order)
    setup: dict[str, Any] = {"margin": margin, "clean": clean, "labels": dict(zip(order, labels, strict=True))}
    if mode == "rule":
        return models, _absolute_predict(order, labels, margin, clean_index), setup
    stats, setup["calibration"] = _relative_stats(ident, models, order, members.base.meta, data, split, limit, seed)
    return models, _relative_predict(order, labels, stats, margin, clean_index), setup


def _ident_base(ident: Identifier | None) -> str | None:
    return ident.meta.base if ident is not None else None


def _absolute_predict(order: Sequence[str], labels: Sequence[str], margin: float, clean_index: int | None) -> Predict:
    """The LoRADAR rule over the members in `order` (the input itself is not read)."""

    def predict(probs: Mapping[str, Tensor], x: Tensor) -> list[str]:
        return identify_rule(torch.stack([probs[m] for m in order]), labels, margin=margin, clean_index=clean_index)

    return predict


def _relative_predict(
    order: Sequence[str], labels: Sequence[str], stats: tuple[Tensor, Tensor], margin: float, clean_index: int | None
) -> Predict:
    """The rule on confidences relative to each member's clean mean and spread."""

    def predict(probs: Mapping[str, Tensor], x: Tensor) -> list[str]:
        stack = torch.stack([probs[m] for m in order])
        return identify_relative(stack, labels, *stats, margin=margin, clean_index=clean_index)

    return predict


def _relative_stats(
    ident: Identifier | None,
    models: Mapping[str, torch.nn.Module],
    order: Sequence[str],
    base: BaseMeta,
    data: str | None,
    split: str,
    limit: int | None,
    seed: int,
) -> tuple[tuple[Tensor, Tensor], str]:
    """Clean log-odds mean and std per member: from the identifier if it has them all, else a clean split of --data
    (or of the base's own data set) other than the scored one."""
    stored = ident.meta.clean_confidence if ident is not None else None
    if ident is not None and stored and all(m in stored for m in order):
        mean, std = torch.tensor([stored[m] for m in order], dtype=torch.float64).unbind(dim=1)
        return (mean, std), f"identifier {ident.meta.name!r} (clean inputs it was fitted on)"
    data = data or base.dataset
    other = "train" if split == "val" else "val"
    clean = model_data(data, other, base, seed=seed, limit=limit or CALIBRATION_LIMIT, report_limit=limit is not None)
    probs = ensemble_probs([models[m] for m in order], clean.x)
    return clean_confidence_stats(probs), f"{data} split {other} ({len(clean.y)} clean inputs)"


def _calibrated_identifier(store: Store, identifier: str | None, names: Sequence[str]) -> Identifier:
    """The stored identifier named by --identifier, checked against the adapters given (if any)."""
    if not identifier:
        raise InvalidValueError("--mode calibrated needs --identifier NAME (fit one with `loradar fit-identifier`)")
    ident = load_identifier(store, identifier)
    if names and list(names) != ident.adapter_names:
        raise IncompatibleError(
            f"identifier {identifier!r} was fitted on adapters {ident.adapter_names}, got {list(names)}",
            hint="give the same adapters in the same order, or none",
        )
    return ident


def _identify_row(s: "InputSet", predicted: Sequence[str]) -> IdentifyRow:
    """One set's identification accuracy and predicted-label counts."""
    counts: dict[str, int] = {}
    for label in predicted:
        counts[label] = counts.get(label, 0) + 1
    return IdentifyRow(
        n=len(predicted),
        attack=s.attack,
        accuracy=accuracy([s.attack] * len(predicted), predicted) if predicted else None,
        predicted=dict(sorted(counts.items())),
    )


def identification_summary(
    truth: Sequence[str], pred: Sequence[str], classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, unknown rate, per-class precision/recall, and the confusion matrix.

    Rows are the true labels present; columns the fitted `classes` (without them: the true and predicted labels)
    and always "unknown" last, so no row is empty and abstentions are visible.
    """
    if not truth:
        return {"accuracy": None, "unknown_rate": None, "per_class": {}, "confusion": None}
    rows = sorted(set(truth))
    answers = set(classes) if classes is not None else set(truth)
    columns = [*sorted((answers | set(pred)) - {UNKNOWN}), UNKNOWN]
    col = {c: j for j, c in enumerate(columns)}
    row = {r: i for i, r in enumerate(rows)}
    matrix = [[0] * len(columns) for _ in rows]
    for t, p in zip(truth, pred, strict=True):
        matrix[row[t]][col[p]] += 1
    return {
        "accuracy": accuracy(truth, pred),
        "unknown_rate": sum(p == UNKNOWN for p in pred) / len(pred),
        "per_class": per_class_scores(truth, pred),
        "confusion": {"rows": rows, "columns": columns, "matrix": matrix},
    }
