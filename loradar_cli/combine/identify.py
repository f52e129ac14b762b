"""Attack identification from adapters' outputs: the LoRADAR rule, and calibrated identifiers fitted and stored."""

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from loradar_cli.combine.members import (
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
from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError
from loradar_cli.models import weights_fingerprint
from loradar_cli.ops.identify import (
    IdentifierModel,
    accuracy,
    confusion_matrix,
    fit_identifier,
    identify_rule,
    identity_feature_names,
    identity_features,
)
from loradar_cli.store.meta import AdapterMeta, BaseMeta, now
from loradar_cli.store.store import Store

IDENTIFY_MODES = ("rule", "calibrated")


class IdentifierMeta(BaseModel):
    """A stored attack identifier: its members (adapters, BASE_MEMBER = the base), classes, base and training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    base: str
    base_fingerprint: str
    members: list[str]
    member_labels: dict[str, str]
    classes: list[str]
    feature_names: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    tensors_sha256: str = ""
    created_at: datetime = Field(default_factory=now)


@dataclass(frozen=True)
class Identifier:
    """A loaded identifier: metadata and the logistic-regression model."""

    meta: IdentifierMeta
    model: IdentifierModel

    @property
    def members(self) -> list[str]:
        return list(self.meta.members)

    @property
    def adapter_names(self) -> list[str]:
        return [m for m in self.meta.members if m != BASE_MEMBER]

    def predict(self, probs: Mapping[str, Tensor]) -> list[str]:
        """Attack label per input from the members' probabilities (keyed by member name)."""
        return self.model.predict(identity_features(torch.stack([probs[m] for m in self.members])))


def load_identifier(store: Store, name: str, base: BaseMeta | None = None) -> Identifier:
    """Read and validate a stored identifier; with `base`, refuse one fitted on other base weights."""
    raw, tensors = store.load_identifier(name)
    try:
        meta = IdentifierMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise CorruptError(
            f"identifier {name!r} has invalid metadata: {'.'.join(map(str, first['loc']))}: {first['msg']}"
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


def _rule_predict(
    probs: Mapping[str, Tensor], *, order: Sequence[str], labels: Sequence[str], margin: float, clean_index: int | None
) -> list[str]:
    """The LoRADAR rule over the members in `order`."""
    return identify_rule(torch.stack([probs[m] for m in order]), labels, margin=margin, clean_index=clean_index)


def identify_sets(
    store: Store,
    names: Sequence[str],
    *,
    base: str | None = None,
    mode: str = "rule",
    identifier: str | None = None,
    margin: float = 0.1,
    clean: str = "base",
    data: str | None = None,
    split: str = "test",
    adv_sets: Sequence[Path] = (),
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    out: Path | None = None,
) -> dict[str, Any]:
    """Per input, the attack family it came from (rule or calibrated); accuracy and confusion matrix vs the truth."""
    if mode not in IDENTIFY_MODES:
        raise InvalidValueError(f"unknown mode {mode!r} (valid: {', '.join(IDENTIFY_MODES)})")
    if mode == "calibrated":
        ident = _calibrated_identifier(store, identifier, names)
        members = load_members(store, ident.adapter_names, base or ident.meta.base)
        check_identifier_base(ident, members.base.meta)
        order, predict = ident.members, ident.predict
        setup: dict[str, Any] = {"identifier": ident.meta.name, "classes": ident.meta.classes}
    else:
        members = load_members(store, names, base)
        order, labels, clean_index = _rule_members(members, clean)
        predict = functools.partial(_rule_predict, order=order, labels=labels, margin=margin, clean_index=clean_index)
        setup = {"margin": margin, "clean": clean, "labels": dict(zip(order, labels, strict=True))}
    models = member_models(members, order)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    predicted = {
        s.label: predict(dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size), strict=True)))
        for s in sets
    }
    truth = [s.attack for s in sets for _ in range(len(s.y))]
    report = {
        "base": members.base.meta.name,
        "members": members.names,
        "mode": mode,
        **setup,
        **identification_summary(truth, [p for s in sets for p in predicted[s.label]]),
        "sets": {s.label: _identify_row(s, predicted[s.label]) for s in sets},
    }
    if out is not None:
        write_json(
            out, {"mode": mode, "sets": {s.label: {"attack": s.attack, "predicted": predicted[s.label]} for s in sets}}
        )
    return report


def _calibrated_identifier(store: Store, identifier: str | None, names: Sequence[str]) -> Identifier:
    """The stored identifier for --mode calibrated, checked against the adapters given (if any)."""
    if not identifier:
        raise InvalidValueError(
            "--mode calibrated needs --identifier NAME (fit one with `loradar identify-attack fit`)"
        )
    ident = load_identifier(store, identifier)
    if names and list(names) != ident.adapter_names:
        raise IncompatibleError(
            f"identifier {identifier!r} was fitted on adapters {ident.adapter_names}, got {list(names)}",
            hint="give the same adapters in the same order, or none",
        )
    return ident


def _identify_row(s: "InputSet", predicted: Sequence[str]) -> dict[str, Any]:
    """One set's identification accuracy and predicted-label counts."""
    counts: dict[str, int] = {}
    for label in predicted:
        counts[label] = counts.get(label, 0) + 1
    return {
        "n": len(predicted),
        "attack": s.attack,
        "accuracy": accuracy([s.attack] * len(predicted), predicted) if predicted else None,
        "predicted": dict(sorted(counts.items())),
    }


def identification_summary(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy and the confusion matrix (rows: true attack, columns: predicted)."""
    if not truth:
        return {"accuracy": None, "confusion": None}
    labels, matrix = confusion_matrix(truth, pred)
    return {"accuracy": accuracy(truth, pred), "confusion": {"labels": labels, "matrix": matrix}}


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
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    overwrite: bool = False,
) -> tuple[IdentifierMeta, dict[str, Any]]:
    """Fit the calibrated identifier on labelled sets (adversarial sets by attack, --data as clean) and store it."""
    store.check_free("identifier", name, overwrite)
    if clean not in ("base", "none"):
        raise InvalidValueError(f"--clean must be 'base' or 'none' when fitting, got {clean!r}")
    members = load_members(store, names, base)
    order = [*members.names, *([BASE_MEMBER] if clean == "base" else [])]
    models = member_models(members, order)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    features = torch.cat([identity_features(ensemble_probs([models[m] for m in order], s.x, batch_size)) for s in sets])
    labels = [s.attack for s in sets for _ in range(len(s.y))]
    model = fit_identifier(features, labels, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    summary = identification_summary(labels, model.predict(features))
    training = {
        "sets": {s.label: {"attack": s.attack, "n": len(s.y)} for s in sets},
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "train_accuracy": summary["accuracy"],
    }
    tensors = model.state_dict()
    meta = IdentifierMeta(
        name=name,
        base=members.base.meta.name,
        base_fingerprint=members.base.meta.fingerprint,
        members=order,
        member_labels={a.meta.name: member_label(a.meta) for a in members.adapters},
        classes=model.classes,
        feature_names=identity_feature_names(len(order)),
        training=training,
        tensors_sha256=weights_fingerprint(tensors),
    )
    store.save_identifier(name, meta.model_dump(mode="json"), tensors, overwrite=overwrite)
    return meta, {
        "name": name,
        "base": meta.base,
        "members": order,
        "classes": model.classes,
        **summary,
        "training": training,
    }
