"""Ensembles of adapters: majority, weighted and soft votes, identify-then-route, and the models to attack them."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer
from torch import Tensor, nn

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.identifier import Identifier, load_identifier
from loradar_cli.members import (
    InputSet,
    Members,
    ensemble_probs,
    input_sets,
    load_members,
    member_models,
    write_json,
)
from loradar_cli.metrics import prediction_accuracy
from loradar_cli.ops.vote import VOTE_METHODS, normalise_weights, reliability_weights, vote
from loradar_cli.store.store import Store

ENSEMBLE_METHODS = (*VOTE_METHODS, "route")


class VoteRow(BaseModel):
    """One input set's accuracies: per method, per adapter alone, and (route only) how often each adapter was picked."""

    n: int
    attack: str
    accuracy: dict[str, float]
    adapters: dict[str, float]
    routed_to: dict[str, int] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k == "routed_to" and v is None)}


class VoteReport(BaseModel):
    """What `ensemble-vote` measured: the voters, how each method decides, and one row per input set."""

    base: str
    members: list[str]
    compare: list[str]
    methods: list[str]
    weighting: dict[str, Any] | None  # weighted: {"weights", "source"}
    route: dict[str, str] | None  # route: how it picks the adapter
    sets: dict[str, VoteRow]


class MeanLogits(nn.Module):
    """An ensemble's white-box surrogate: the mean of its members' logits, differentiable so attacks can adapt.

    Attacks that read internal features (FIA) recognise the `members` ModuleList and tap every member.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise InvalidValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


class SoftVote(nn.Module):
    """Log of the (weighted) mean of member probabilities: its argmax is the soft (or weighted) vote itself.

    Attacking it is attacking the vote's decision through its smooth form (Tramèr, Carlini, Brendel, Madry,
    "On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020, arXiv:2002.08347).
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise InvalidValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        w = torch.tensor(list(weights) if weights else [1.0] * len(members))
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([m(x).softmax(dim=-1) for m in self.members])
        return torch.einsum("k,kbc->bc", self.weights.to(probs.dtype), probs).clamp_min(1e-30).log()


class RoutedLogits(nn.Module):
    """Route's decision as a differentiable model: the routed member's logits, with a straight-through gradient.

    The forward value is exactly the logits of the member route picks (its argmax is route's decision); the
    gradient flows through a soft assignment, softmax over members of their top probability / `temperature`,
    times each member's logits. Where route uses an identifier (not differentiable) its choice is used as is
    in the forward pass and the soft confidence assignment stands in for it backwards (BPDA: Athalye, Carlini,
    Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018, arXiv:1802.00420).
    The temperature 0.1 is a choice, unverified against alternatives.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        decision: "Decision",
        temperature: float = 0.1,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.extra = nn.ModuleList(list(dict(extra or {}).values()))  # non-voting models the router reads (the base)
        self.decision, self.temperature = decision, temperature
        self._extra_names = list(extra or {})  # ModuleDict keys cannot hold ':base'

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.stack([m(x) for m in self.members])  # [K, B, C]
        probs = logits.softmax(dim=-1)
        soft = (probs.max(dim=-1).values / self.temperature).softmax(dim=0)  # [K, B]
        with torch.no_grad():
            named = dict(zip(self.decision.voters, probs.detach(), strict=True))
            named.update({n: m(x).softmax(dim=-1) for n, m in zip(self._extra_names, self.extra, strict=True)})
            routed = route_choice(probs.detach(), self.decision.voters, self.decision.router, named, x.detach())
        hard = nn.functional.one_hot(routed.to(x.device), len(self.members)).T.to(soft.dtype)
        weights = hard + soft - soft.detach()
        return (weights[..., None] * logits).sum(dim=0)


@dataclass(frozen=True)
class Decision:
    """How an ensemble decides from its members' probabilities: a vote, or identify-then-route."""

    method: str
    voters: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    router: Identifier | None = None

    def predict(self, probs: Mapping[str, Tensor], x: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Class per input, and for `route` the index of the voter that classified it (else None).

        `x` (the inputs) is needed by routers whose features read the image.
        """
        stack = torch.stack([probs[n] for n in self.voters])
        if self.method != "route":
            return vote(stack, self.method, list(self.weights) if self.weights else None), None
        routed = route_choice(stack, self.voters, self.router, probs, x)
        return stack[routed, torch.arange(stack.shape[1])].argmax(dim=-1), routed


class EnsembleClassifier(nn.Module):
    """An ensemble as one classifier: forward gives one-hot scores of its decision (not differentiable).

    Attacks target `Ensemble.targets(method)`, differentiable models of the decision; this class judges them.
    """

    def __init__(self, models: Mapping[str, nn.Module], decision: Decision) -> None:
        super().__init__()
        self.names = list(models)
        self.nets = nn.ModuleList(models.values())
        self.decision = decision

    def member_probs(self, x: Tensor) -> dict[str, Tensor]:
        return {n: m(x).softmax(dim=-1) for n, m in zip(self.names, self.nets, strict=True)}

    def forward(self, x: Tensor) -> Tensor:
        probs = self.member_probs(x)
        pred, _ = self.decision.predict(probs, x)
        return nn.functional.one_hot(pred, probs[self.names[0]].shape[-1]).to(x.dtype)

    def surrogate(self) -> MeanLogits:
        """Mean logits of the voting members (shared modules, no copies)."""
        return MeanLogits([self.nets[self.names.index(n)] for n in self.decision.voters])


@dataclass(frozen=True)
class Ensemble:
    """Merged member models (each ΔW folded once) and one decision per method, ready to vote or be attacked."""

    members: Members
    models: dict[str, nn.Module]
    decisions: dict[str, Decision]
    weighting: dict[str, Any] | None
    router: Identifier | None

    @property
    def voters(self) -> tuple[str, ...]:
        return next(iter(self.decisions.values())).voters

    def classifier(self, method: str) -> EnsembleClassifier:
        """The classifier of one method, sharing this ensemble's member models."""
        return EnsembleClassifier(self.models, self.decisions[method])

    def surrogate(self) -> MeanLogits:
        """The mean logits of the voters: one differentiable view of every method."""
        return MeanLogits([self.models[n] for n in self.voters])

    def targets(self, method: str) -> dict[str, nn.Module]:
        """What to attack to attack a method's decision: votes through the mean logits and through the soft vote
        of member probabilities (the worst case of both counts), route through the routed decision itself."""
        decision = self.decisions[method]
        members = [self.models[n] for n in self.voters]
        if method == "route":
            extra = {n: m for n, m in self.models.items() if n not in self.voters}
            return {"routed decision": RoutedLogits(members, decision, extra=extra)}
        weighted = method == "weighted" and decision.weights is not None
        soft = SoftVote(members, decision.weights if weighted else None)
        return {"mean logits": self.surrogate(), "weighted soft vote" if weighted else "soft vote": soft}

    def report(self) -> dict[str, Any]:
        """The report fields that describe the decisions: methods, the weighted vote's weights, route's rule."""
        methods = list(self.decisions)
        return {
            "methods": methods,
            "weighting": self.weighting,
            "route": _route_info(self.router) if "route" in methods else None,
        }


def load_ensemble(
    store: Store,
    names: Sequence[str],
    *,
    methods: Sequence[str],
    base: str | None = None,
    weights: Sequence[float] | None = None,
    identifier: str | None = None,
    compare: Sequence[str] = (),
) -> Ensemble:
    """Load voters (and `compare` adapters) once and set up each method's decision."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in ENSEMBLE_METHODS]
    if unknown or not methods:
        raise InvalidValueError(
            f"unknown ensemble method {(unknown or [''])[0]!r} (valid: {', '.join(ENSEMBLE_METHODS)})"
        )
    if identifier and "route" not in methods:
        raise InvalidValueError("--identifier is used by route only")
    if weights is not None and "weighted" not in methods:
        raise InvalidValueError("--weights is used by the weighted vote only")
    voters = tuple(dict.fromkeys(names))
    members = load_members(store, list(dict.fromkeys([*voters, *compare])), base)
    router = _router(store, identifier, voters, members) if "route" in methods else None
    weighting = _vote_weights(members, voters, weights) if "weighted" in methods else None
    decisions = {
        m: Decision(
            m,
            voters,
            tuple(weighting["weights"]) if m == "weighted" and weighting else None,
            router if m == "route" else None,
        )
        for m in methods
    }
    return Ensemble(members, member_models(members, router.members if router else ()), decisions, weighting, router)


def vote_sets(
    store: Store,
    names: Sequence[str],
    *,
    base: str | None = None,
    methods: Sequence[str] = ("majority",),
    weights: Sequence[float] | None = None,
    data: str | None = None,
    split: str = "test",
    adv_sets: Sequence[Path] = (),
    limit: int | None = None,
    identifier: str | None = None,
    compare: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 256,
    out: Path | None = None,
) -> VoteReport:
    """Ensemble votes (majority, weighted, soft) and identify-then-route per input set; accuracy and predictions.

    `compare` adapters (e.g. merged ones) are evaluated alone on the same sets, for one table.
    """
    ensemble = load_ensemble(
        store, names, methods=methods, base=base, weights=weights, identifier=identifier, compare=compare
    )
    names = list(ensemble.voters)
    sets = input_sets(ensemble.members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    rows: dict[str, VoteRow] = {}
    samples: dict[str, Any] = {}
    models = ensemble.models
    for s in sets:
        probs = dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size), strict=True))
        decided = {m: d.predict(probs, s.x) for m, d in ensemble.decisions.items()}
        preds = {m: pred for m, (pred, _) in decided.items()}
        routed = decided["route"][1] if "route" in decided else None
        singles = {n: probs[n].argmax(dim=-1) for n in dict.fromkeys([*names, *compare])}
        rows[s.label] = _vote_row(s, preds, singles, routed, names)
        samples[s.label] = {
            "y": s.y.tolist(),
            "attack": s.attack,
            "methods": {m: p.tolist() for m, p in preds.items()},
            "adapters": {n: p.tolist() for n, p in singles.items()},
            "routed_to": None if routed is None else [names[i] for i in routed.tolist()],
        }
    if out is not None:
        write_json(out, {"members": names, "sets": samples})
    return VoteReport(
        base=ensemble.members.base.meta.name, members=names, compare=list(compare), **ensemble.report(), sets=rows
    )


def _router(store: Store, identifier: str | None, names: Sequence[str], members: Members) -> "Identifier | None":
    """The calibrated identifier for `route`, checked against base and adapters; None for the rule."""
    if not identifier:
        return None
    router = load_identifier(store, identifier, members.base.meta)
    missing = [m for m in router.adapter_names if m not in names]
    if missing:
        raise IncompatibleError(
            f"identifier {identifier!r} reads adapters {router.adapter_names}; "
            f"{missing[0]!r} is not among the voting adapters"
        )
    return router


def _vote_weights(members: Members, names: Sequence[str], weights: Sequence[float] | None) -> dict[str, Any]:
    """Weights of the weighted vote: given, else reliability from each adapter's stored validation metrics."""
    if weights is not None:
        return {"weights": normalise_weights(weights, len(names)).tolist(), "source": "--weights"}
    metas = {a.meta.name: a.meta for a in members.adapters}
    rel = reliability_weights([metas[n].metrics for n in names])
    source = f"metrics.{rel.key}" if rel.key else "uniform: no validation metric common to all adapters"
    if rel.uniform_fallback and rel.key:
        source += " (unusable values: uniform)"
    return {"weights": rel.weights, "source": source}


def _route_info(router: "Identifier | None") -> dict[str, str]:
    """How `route` picks its adapter, for the report."""
    if router is None:
        return {"mode": "rule", "rule": "the most confident adapter classifies"}
    return {
        "mode": "calibrated",
        "identifier": router.meta.name,
        "fallback": "the most confident adapter when no voting adapter was trained on the identified attack",
    }


def _vote_row(
    s: "InputSet",
    preds: Mapping[str, Tensor],
    singles: Mapping[str, Tensor],
    routed: Tensor | None,
    names: Sequence[str],
) -> VoteRow:
    """One set's accuracies: per method, per adapter alone, and how often route picked each adapter."""
    return VoteRow(
        n=len(s.y),
        attack=s.attack,
        accuracy={m: prediction_accuracy(p, s.y) for m, p in preds.items()},
        adapters={n: prediction_accuracy(p, s.y) for n, p in singles.items()},
        routed_to=None if routed is None else {n: int((routed == i).sum()) for i, n in enumerate(names)},
    )


def route_choice(
    stack: Tensor,
    names: Sequence[str],
    router: "Identifier | None",
    probs: Mapping[str, Tensor],
    x: Tensor | None = None,
) -> Tensor:
    """Index of the adapter that classifies each input: the identified attack's adapter, else the most confident."""
    confident = stack.to(torch.float64).max(dim=-1).values.argmax(dim=0)
    if router is None:
        return confident
    by_attack: dict[str, int] = {}
    for i, n in enumerate(names):
        by_attack.setdefault(router.meta.member_labels.get(n, n), i)
    attacks = router.predict(probs, x)
    return torch.tensor(
        [by_attack.get(a, c) for a, c in zip(attacks, confident.tolist(), strict=True)], dtype=torch.long
    )
