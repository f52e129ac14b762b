"""What `loradar attack` crafts against: one stored model, or an ensemble's decision, optionally evading an identifier.

An attacker who targets the defended system attacks its decision, not the base: a vote through the differentiable
models of its decision (the members' mean logits and the soft vote of their probabilities, a point keeping the
first example that fools the decision), identify-then-route through its routed decision. An adaptive attacker
also hides the attack's family from a stored identifier (`loradar_cli.ops.identify_adaptive`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from loradar_cli.device import Engine, using
from loradar_cli.errors import InvalidValueError
from loradar_cli.store.store import Store


@dataclass(frozen=True)
class EnsembleSpec:
    """An ensemble to attack: voting adapters, the decision (a vote method or route) and route's identifier."""

    members: Sequence[str]
    method: str = "soft"
    identifier: str | None = None


@dataclass(frozen=True)
class EvasionSpec:
    """The adaptive attacker's second aim: lower `identifier`'s probability of `family`, at `weight`."""

    identifier: str
    family: str
    weight: float = 1.0


@dataclass(frozen=True)
class AttackTarget:
    """The decision that judges success, and the differentiable models attacked to fool it (by description)."""

    judge: nn.Module
    targets: dict[str, nn.Module]
    info: dict[str, Any] = field(default_factory=dict)


def ensemble_target(store: Store, base: str | None, spec: EnsembleSpec) -> AttackTarget:
    """The ensemble's decision and what attacking it goes through (`Ensemble.targets`)."""
    from loradar_cli.jobs.ensemble_vote import load_ensemble

    ensemble = load_ensemble(store, spec.members, methods=[spec.method], base=base, identifier=spec.identifier)
    targets = ensemble.targets(spec.method)
    info = {"members": list(ensemble.voters), "decision": spec.method, "identifier": spec.identifier}
    return AttackTarget(ensemble.classifier(spec.method), targets, {**info, "through": list(targets)})


def evading(store: Store, base: str, target: AttackTarget, spec: EvasionSpec) -> AttackTarget:
    """`target` with each gradient model replaced by the adaptive objective against a stored identifier."""
    from loradar_cli.identifier import load_identifier
    from loradar_cli.members import load_members, member_models
    from loradar_cli.ops.identify_adaptive import EvadeIdentifier

    ident = load_identifier(store, spec.identifier, store.base_meta(base))
    classes = ident.meta.classes
    if spec.family not in classes:
        raise InvalidValueError(
            f"identifier {spec.identifier!r} does not know attack family {spec.family!r} (its classes: "
            f"{', '.join(classes)})"
        )
    readers = member_models(load_members(store, ident.adapter_names, base), ident.members)
    hidden = [classes.index(spec.family)]
    targets = {
        f"{name} + evading {spec.identifier}": EvadeIdentifier(model, readers, ident.probabilities, hidden, spec.weight)
        for name, model in target.targets.items()
    }
    evasion = {"identifier": spec.identifier, "family": spec.family, "weight": spec.weight}
    return AttackTarget(target.judge, targets, {**target.info, "evades": evasion, "through": list(targets)})


def craft_against(
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor], target: AttackTarget, x: Tensor, y: Tensor
) -> Tensor:
    """Attack each gradient model in turn; a point keeps the first example that fools the judge, else the last."""
    if len(target.targets) == 1:
        return attack(next(iter(target.targets.values())), x, y)
    best: Tensor | None = None
    fooled = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for model in target.targets.values():
        x_adv = attack(model, x, y)
        best = x_adv if best is None else torch.where(fooled[:, None, None, None], best, x_adv)
        with torch.no_grad():
            fooled |= target.judge(best).argmax(dim=-1) != y
        if bool(fooled.all()):
            break
    assert best is not None, "an attack target has at least one gradient model"
    return best


def build_target(
    store: Store,
    base: str,
    *,
    adapter: str | None = None,
    ensemble: EnsembleSpec | None = None,
    evade: EvasionSpec | None = None,
    engine: Engine | None = None,
) -> AttackTarget:
    """The target of one `attack` run, its models on the engine's device: base (+ adapter), or an ensemble."""
    from loradar_cli.loading import load_model

    engine = engine or Engine()
    if ensemble is not None and adapter is not None:
        raise InvalidValueError("attack either --adapter or an ensemble (--members), not both")
    with using(engine):
        if ensemble is not None:
            target = ensemble_target(store, base, ensemble)
        else:
            model = load_model(store, base, adapter)
            target = AttackTarget(model, {"white-box": model}, {})
        if evade is not None:
            target = evading(store, base, target, evade)
    for module in (target.judge, *target.targets.values()):
        engine.model(module)
    return target


ADAPTIVE_ROUTE = "route (adaptive vs identifier)"
"""The eval row of route attacked by the adaptive attacker."""


def adaptive_route_targets(ensemble: Any, weight: float = 1.0) -> dict[str, nn.Module]:
    """Route's routed decision with the identifier term that hides every attack family its router knows.

    The attack a suite runs may be any of them, so the attacker lowers the router's total probability of all
    attack classes (not "clean"), which lowers the true family's whatever it is; needs a calibrated router.
    """
    from loradar_cli.members import CLEAN
    from loradar_cli.ops.identify_adaptive import EvadeIdentifier

    router = ensemble.router
    if router is None:
        raise InvalidValueError("the adaptive route row needs route's --identifier")
    hidden = [i for i, c in enumerate(router.meta.classes) if c != CLEAN]
    readers = {m: ensemble.models[m] for m in router.members}
    return {
        f"{name} + evading {router.meta.name}": EvadeIdentifier(model, readers, router.probabilities, hidden, weight)
        for name, model in ensemble.targets("route").items()
    }
