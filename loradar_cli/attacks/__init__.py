"""Adversarial attacks behind one registry: `build_attack("pgd", eps=8/255)(model, x, y) -> x_adv`.

Importing this package imports torch (the attack modules register themselves on import); torch-free code
such as CLI option declarations should use `ATTACK_NAMES`, which a test keeps equal to `ATTACKS.names()`.
"""

from typing import Any

from pydantic import ValidationError

from loradar_cli.attacks import fgsm, fia, pgd, roa
from loradar_cli.attacks.base import ATTACKS, Attack, AttackConfig, ThreatModel, register_attack
from loradar_cli.attacks.fgsm import FGSM
from loradar_cli.attacks.fia import FIA, FIAConfig, default_feature_layer
from loradar_cli.attacks.pgd import PGD, PGDL2, PGDConfig, PGDL2Config
from loradar_cli.attacks.roa import ROA, ROAConfig
from loradar_cli.errors import InvalidValueError

ATTACK_NAMES: tuple[str, ...] = ("fgsm", "fia", "pgd", "pgd-l2", "roa")

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "FGSM",
    "FIA",
    "PGD",
    "PGDL2",
    "ROA",
    "Attack",
    "AttackConfig",
    "FIAConfig",
    "PGDConfig",
    "PGDL2Config",
    "ROAConfig",
    "ThreatModel",
    "attack_names",
    "build_attack",
    "default_feature_layer",
    "register_attack",
]

_MODULES = (fgsm, fia, pgd, roa)  # imported for their registrations


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
