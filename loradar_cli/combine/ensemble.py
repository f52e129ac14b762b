"""Ensembles of adapters: majority, weighted and soft votes, identify-then-route, per input set."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loradar_cli.combine.identify import Identifier, load_identifier
from loradar_cli.combine.members import (
    InputSet,
    Members,
    ensemble_probs,
    input_sets,
    load_members,
    member_models,
    write_json,
)
from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.ops.vote import VOTE_METHODS, normalise_weights, reliability_weights, vote
from loradar_cli.store.store import Store

ENSEMBLE_METHODS = (*VOTE_METHODS, "route")


def vote_sets(store: Store, names: Sequence[str], *, base: str | None = None, methods: Sequence[str] = ("majority",),
              weights: Sequence[float] | None = None, data: str | None = None, split: str = "test",
              adv_sets: Sequence[Path] = (), limit: int | None = None, identifier: str | None = None,
              compare: Sequence[str] = (), seed: int = 0, batch_size: int = 256,
              out: Path | None = None) -> dict[str, Any]:
    """Ensemble votes (majority, weighted, soft) and identify-then-route per input set; accuracy and predictions.

    `compare` adapters (e.g. merged ones) are evaluated alone on the same sets, for one table.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in ENSEMBLE_METHODS]
    if unknown or not methods:
        raise InvalidValueError(f"unknown ensemble method {(unknown or [''])[0]!r} (valid: {', '.join(ENSEMBLE_METHODS)})")
    if identifier and "route" not in methods:
        raise InvalidValueError("--identifier is used by --method route only")
    names = list(names)
    members = load_members(store, list(dict.fromkeys([*names, *compare])), base)
    router = _router(store, identifier, names, members) if "route" in methods else None
    weighting = _vote_weights(members, names, weights) if "weighted" in methods else None
    models = member_models(members, router.members if router else ())
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    report: dict[str, Any] = {"base": members.base.meta.name, "members": names, "compare": list(compare),
                              "methods": methods, "weighting": weighting,
                              "route": _route_info(router) if "route" in methods else None, "sets": {}}
    samples: dict[str, Any] = {}
    for s in sets:
        probs = dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size), strict=True))
        preds, routed = _ensemble_predictions(probs, names, methods, weighting, router)
        singles = {n: probs[n].argmax(dim=-1) for n in dict.fromkeys([*names, *compare])}
        report["sets"][s.label] = _vote_row(s, preds, singles, routed, names)
        samples[s.label] = {"y": s.y.tolist(), "attack": s.attack, "methods": {m: p.tolist() for m, p in preds.items()},
                            "adapters": {n: p.tolist() for n, p in singles.items()},
                            "routed_to": None if routed is None else [names[i] for i in routed.tolist()]}
    if out is not None:
        write_json(out, {"members": names, "sets": samples})
    return report


def _router(store: Store, identifier: str | None, names: Sequence[str], members: Members) -> "Identifier | None":
    """The calibrated identifier for `route`, checked against base and adapters; None for the rule."""
    if not identifier:
        return None
    router = load_identifier(store, identifier, members.base.meta)
    missing = [m for m in router.adapter_names if m not in names]
    if missing:
        raise IncompatibleError(f"identifier {identifier!r} reads adapters {router.adapter_names}; "
                                f"{missing[0]!r} is not among the voting adapters")
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


def _route_info(router: "Identifier | None") -> dict[str, Any]:
    """How `route` picks its adapter, for the report."""
    if router is None:
        return {"mode": "rule", "rule": "the most confident adapter classifies"}
    return {"mode": "calibrated", "identifier": router.meta.name,
            "fallback": "the most confident adapter when no voting adapter was trained on the identified attack"}


def _ensemble_predictions(probs: Mapping[str, Tensor], names: Sequence[str], methods: Sequence[str],
                          weighting: Mapping[str, Any] | None, router: "Identifier | None"
                          ) -> tuple[dict[str, Tensor], Tensor | None]:
    """Predicted class per input for each method, and the adapter index `route` picked (None without route)."""
    stack = torch.stack([probs[n] for n in names])
    preds: dict[str, Tensor] = {}
    routed = None
    for method in methods:
        if method == "route":
            routed = route_choice(stack, names, router, probs)
            preds[method] = stack[routed, torch.arange(stack.shape[1])].argmax(dim=-1)
        else:
            preds[method] = vote(stack, method, weighting["weights"] if weighting and method == "weighted" else None)
    return preds, routed


def _vote_row(s: "InputSet", preds: Mapping[str, Tensor], singles: Mapping[str, Tensor], routed: Tensor | None,
              names: Sequence[str]) -> dict[str, Any]:
    """One set's accuracies: per method, per adapter alone, and how often route picked each adapter."""
    row: dict[str, Any] = {"n": len(s.y), "attack": s.attack, "accuracy": {m: _acc(p, s.y) for m, p in preds.items()},
                           "adapters": {n: _acc(p, s.y) for n, p in singles.items()}}
    if routed is not None:
        row["routed_to"] = {n: int((routed == i).sum()) for i, n in enumerate(names)}
    return row


def _acc(pred: Tensor, y: Tensor) -> float:
    """Fraction of correct predictions (0 for an empty set)."""
    return float((pred == y).double().mean()) if len(y) else 0.0


def route_choice(stack: Tensor, names: Sequence[str], router: "Identifier | None",
                 probs: Mapping[str, Tensor]) -> Tensor:
    """Index of the adapter that classifies each input: the identified attack's adapter, else the most confident."""
    confident = stack.to(torch.float64).max(dim=-1).values.argmax(dim=0)
    if router is None:
        return confident
    by_attack: dict[str, int] = {}
    for i, n in enumerate(names):
        by_attack.setdefault(router.meta.member_labels.get(n, n), i)
    attacks = router.predict(probs)
    return torch.tensor([by_attack.get(a, c) for a, c in zip(attacks, confident.tolist(), strict=True)],
                        dtype=torch.long)
