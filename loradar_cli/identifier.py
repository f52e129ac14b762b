"""A stored attack identifier: its metadata, the loaded model that turns members' outputs (and inputs) into attack
labels, and the checks that it is read on the base and adapters it was fitted on."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, validation_message
from loradar_cli.members import BASE_MEMBER
from loradar_cli.models import weights_fingerprint
from loradar_cli.ops.identify import IdentifierModel
from loradar_cli.ops.identify_features import IDENTIFY_FEATURES, FeatureInputs, compute_features
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
        return compute_features(self.meta.feature_groups, feature_inputs(self.members, probs, x))

    def probabilities(self, probs: Mapping[str, Tensor], x: Tensor | None = None) -> Tensor:
        """Soft assignment [B, n_classes] over `meta.classes`, differentiable in probs and x (no rejection)."""
        return self.model.predict_proba(self.features(probs, x))

    def predict(self, probs: Mapping[str, Tensor], x: Tensor | None = None, *, reject: bool = True) -> list[str]:
        """Attack label per input ("unknown" where rejected, if `reject` and rejection was fitted)."""
        return self.model.predict(self.features(probs, x), reject=reject)


def feature_inputs(order: Sequence[str], probs: Mapping[str, Tensor], x: Tensor | None) -> FeatureInputs:
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
