"""Adversarial attacks behind one registry: `build_attack("pgd", eps=8/255)(model, x, y) -> x_adv`.

Importing this package imports torch (the attack modules register themselves on import); torch-free code
such as CLI option declarations should use `ATTACK_NAMES`, which a test keeps equal to `ATTACKS.names()`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from loradar_cli.attacks import apgd, fgsm, fia, pgd, roa, square
from loradar_cli.attacks.apgd import APGD, APGDL2, APGDT, APGDTL2, APGDConfig, APGDL2Config, APGDTConfig, APGDTL2Config
from loradar_cli.attacks.base import ATTACKS, Attack, AttackConfig, ThreatModel, Tracker, register_attack
from loradar_cli.attacks.fgsm import FGSM
from loradar_cli.attacks.fia import FIA, FIAConfig, default_feature_layer
from loradar_cli.attacks.pgd import PGD, PGDL2, PGDConfig, PGDL2Config
from loradar_cli.attacks.roa import ROA, ROAConfig
from loradar_cli.attacks.square import Square, SquareConfig, SquareL2, SquareL2Config
from loradar_cli.errors import InvalidValueError

ATTACK_NAMES: tuple[str, ...] = (
    "apgd",
    "apgd-l2",
    "apgd-t",
    "apgd-t-l2",
    "fgsm",
    "fia",
    "pgd",
    "pgd-l2",
    "roa",
    "square",
    "square-l2",
)

__all__ = [
    "APGD",
    "APGDL2",
    "APGDT",
    "APGDTL2",
    "ATTACKS",
    "ATTACK_NAMES",
    "FGSM",
    "FIA",
    "PGD",
    "PGDL2",
    "ROA",
    "APGDConfig",
    "APGDL2Config",
    "APGDTConfig",
    "APGDTL2Config",
    "Attack",
    "AttackConfig",
    "FIAConfig",
    "PGDConfig",
    "PGDL2Config",
    "ROAConfig",
    "Square",
    "SquareConfig",
    "SquareL2",
    "SquareL2Config",
    "ThreatModel",
    "Tracker",
    "attack_names",
    "build_attack",
    "default_feature_layer",
    "register_attack",
    "route_options",
]

_MODULES = (apgd, fgsm, fia, pgd, roa, square)  # imported for their registrations


def attack_names() -> list[str]:
    """Registered attack names, sorted."""
    return ATTACKS.names()


def build_attack(name: str, **options: Any) -> Attack[Any]:
    """The attack registered as `name` with its config built from `options` (errors as one-line LoradarErrors)."""
    cls = ATTACKS.get(name)
    fields = cls.config_cls.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise InvalidValueError(
            f"unknown option(s) {', '.join(unknown)} for attack {name!r}; valid: {', '.join(fields)}"
        )
    try:
        config = cls.config_cls(**options)
    except ValidationError as err:
        raise InvalidValueError(f"invalid options for attack {name!r}: {_one_line(err)}") from None
    return cls(config)


def _one_line(err: ValidationError) -> str:
    """Pydantic's multi-line report as `field: message (got value)` items joined by '; '."""
    items = [f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']} (got {e['input']!r})" for e in err.errors()]
    return "; ".join(items)


def attack_fields(name: str) -> set[str]:
    """Option names an attack's config accepts (to route shared --eps/--steps only where they apply)."""
    return set(ATTACKS.get(name).config_cls.model_fields)


def route_options(
    names: Sequence[str], shared: Mapping[str, Any], specific: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per attack: shared options it accepts, then `name.key=value` options for it alone."""
    routed: dict[str, dict[str, Any]] = {}
    for name in names:
        fields = attack_fields(name)
        routed[name] = {k: v for k, v in shared.items() if k in fields and v is not None}
        routed[name].update(specific.get(name, {}))
    return routed
