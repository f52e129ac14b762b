"""Attack identification from adapters' outputs and the inputs: the LoRADAR rule (absolute or relative to each
member's clean confidence) and calibrated identifiers fitted, with held-out accuracy, and stored."""

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError, validation_message
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
from loradar_cli.models import weights_fingerprint
from loradar_cli.ops.identify import (
    UNKNOWN,
    IdentifierModel,
    accuracy,
    calibrate_rejection,
    clean_confidence_stats,
    fit_identifier,
    identify_relative,
    identify_rule,
    per_class_scores,
    select_feature_groups,
    stratified_split,
)
from loradar_cli.ops.identify_features import IDENTIFY_FEATURES, FeatureInputs, compute_features, feature_names
from loradar_cli.ops.identify_modes import DEFAULT_MARGINS, IDENTIFY_MODES
from loradar_cli.store.meta import AdapterMeta, BaseMeta, now
from loradar_cli.store.store import Store


class IdentifierMeta(BaseModel):
    """A stored attack identifier: members (adapters, BASE_MEMBER = the base), classes, features and provenance.

    Identifiers stored before feature groups (member confidences only) load as feature group "confidence".
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = (
        1  # the store format (store.meta.SCHEMA_VERSION); older identifiers default their feature groups
    )
    name: str
    base: str
    base_fingerprint: str
    members: list[str]
    member_labels: dict[str, str]
    classes: list[str]
    feature_names: list[str]
    feature_groups: list[str] = Field(default_factory=lambda: ["confidence"])
    clean_confidence: dict[str, list[float]] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    tensors_sha256: str = ""
    created_at: datetime = Field(default_factory=now)


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


class HeldOutReport(BaseModel):
    """The fitted identifier on the inputs held out of fitting, with rejection."""

    n: int
    accuracy: float | None
    unknown_rate: float | None
    per_class: dict[str, ClassScores]
    confusion: Confusion | None


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


@dataclass(frozen=True)
class Identifier:
    """A loaded identifier: metadata and the logistic-regression model (with rejection when fitted)."""

    meta: IdentifierMeta
    model: IdentifierModel

    @property
    def members(self) -> list[str]:
        return list(self.meta.members)

    @property
    def adapter_names(self) -> list[str]:
        return [m for m in self.meta.members if m != BASE_MEMBER]

    @property
    def needs_input(self) -> bool:
        """Whether its features read the input images (then `x` must be passed)."""
        return any(IDENTIFY_FEATURES.get(g).needs_input for g in self.meta.feature_groups)

    def features(self, probs: Mapping[str, Tensor], x: Tensor | None = None) -> Tensor:
        """Feature rows [B, F] from the members' probabilities (keyed by member name) and the inputs [B, C, H, W]."""
        if x is None and self.needs_input:
            raise IncompatibleError(
                f"identifier {self.meta.name!r} reads the inputs (features {', '.join(self.meta.feature_groups)}); "
                "pass x as well as the members' probabilities"
            )
        return compute_features(self.meta.feature_groups, _feature_inputs(self.members, probs, x))

    def probabilities(self, probs: Mapping[str, Tensor], x: Tensor | None = None) -> Tensor:
        """Soft assignment [B, n_classes] over `meta.classes`, differentiable in probs and x (no rejection)."""
        return self.model.predict_proba(self.features(probs, x))

    def predict(self, probs: Mapping[str, Tensor], x: Tensor | None = None, *, reject: bool = True) -> list[str]:
        """Attack label per input ("unknown" where rejected, if `reject` and rejection was fitted)."""
        return self.model.predict(self.features(probs, x), reject=reject)


def _feature_inputs(order: Sequence[str], probs: Mapping[str, Tensor], x: Tensor | None) -> FeatureInputs:
    """Feature inputs with the members stacked in `order` (the base, if a member, flagged by index)."""
    missing = [m for m in order if m not in probs]
    if missing:
        raise IncompatibleError(f"no probabilities for identifier member {missing[0]!r}")
    base_index = list(order).index(BASE_MEMBER) if BASE_MEMBER in order else None
    return FeatureInputs(torch.stack([probs[m] for m in order]), x, base_index, tuple(order))


def load_identifier(store: Store, name: str, base: BaseMeta | None = None) -> Identifier:
    """Read and validate a stored identifier; with `base`, refuse one fitted on other base weights."""
    raw, tensors = store.load_identifier(name)
    try:
        meta = IdentifierMeta.model_validate(raw)
    except ValidationError as err:
        raise CorruptError(
            f"identifier {name!r} has invalid metadata: {validation_message(err, first=True, values=False)}"
        ) from None
    if weights_fingerprint(tensors) != meta.tensors_sha256:
        raise CorruptError(f"identifier {name!r}: tensors do not match their recorded sha256")
    ident = Identifier(meta, IdentifierModel.from_tensors(tensors, meta.classes))
    if base is not None:
        check_identifier_base(ident, base)
    return ident


def check_identifier_base(ident: Identifier, base: BaseMeta) -> None:
    """An identifier reads adapter outputs on the exact base weights it was fitted on."""
    if base.fingerprint != ident.meta.base_fingerprint:
        raise IncompatibleError(
            f"identifier {ident.meta.name!r} was fitted on base {ident.meta.base!r}, not on base {base.name!r}"
        )


def member_label(meta: AdapterMeta) -> str:
    """The attack an adapter stands for in identification (its name if it has no attack)."""
    return meta.attack or meta.name


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
    inputs = _feature_inputs(order, dict(zip(order, probs, strict=True)), torch.cat([s.x for s in sets]))
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
