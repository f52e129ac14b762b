"""Adversarial attacks behind one registry: `build_attack("pgd", eps=8/255)(model, x, y) -> x_adv`.

Importing this package imports torch (the attack modules register themselves on import); torch-free code
such as CLI option declarations uses `loradar_cli.names.ATTACKS`, which a test keeps equal to `ATTACKS.names()`.

To add an attack: write `attacks/<name>.py` with a pydantic config and a class decorated `@register_attack`
(see `pgd.py`; every module of this package is imported on import), and add its name to
`loradar_cli.names.ATTACKS`.
"""

import importlib
import math
import pkgutil
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from loradar_cli.attacks import apgd, fab, fgsm, fia, pgd, roa, square
from loradar_cli.attacks.apgd import APGD, APGDL2, APGDT, APGDTL2, APGDConfig, APGDL2Config, APGDTConfig, APGDTL2Config
from loradar_cli.attacks.base import ATTACKS, Attack, AttackConfig, ThreatModel, Tracker, register_attack
from loradar_cli.attacks.fab import FABT, FABTConfig
from loradar_cli.attacks.fgsm import FGSM
from loradar_cli.attacks.fia import FIA, FIAConfig, default_feature_layer
from loradar_cli.attacks.pgd import PGD, PGDL2, PGDConfig, PGDL2Config
from loradar_cli.attacks.roa import ROA, ROAConfig
from loradar_cli.attacks.square import Square, SquareConfig, SquareL2, SquareL2Config
from loradar_cli.errors import InvalidValueError, validation_message


def _import_attack_modules() -> None:
    """Import every public module of this package, so an attack registers itself by existing (as timm models do)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_attack_modules()
ATTACK_NAMES: tuple[str, ...] = tuple(ATTACKS.names())

__all__ = [
    "APGD",
    "APGDL2",
    "APGDT",
    "APGDTL2",
    "ATTACKS",
    "ATTACK_NAMES",
    "FABT",
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
    "FABTConfig",
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

_MODULES = (apgd, fab, fgsm, fia, pgd, roa, square)  # imported for their registrations


def attack_names() -> list[str]:
    """Registered attack names, sorted."""
    return ATTACKS.names()


def build_attack(name: str, **options: Any) -> Attack[Any]:
    """The attack registered as `name` with its config built from `options` (errors as one-line LoradarErrors).

    Unknown keys are refused with the valid ones listed; a boolean for a number and any non-finite number are
    refused too (pydantic would read `true` as 1 and accept `inf` for a `ge=0` budget).
    """
    cls = ATTACKS.get(name)
    fields = cls.config_cls.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise InvalidValueError(
            f"unknown option(s) {', '.join(unknown)} for attack {name!r}; valid: {', '.join(fields)}"
        )
    for key, value in options.items():
        if isinstance(value, bool) and bool not in _types(fields[key].annotation):
            raise InvalidValueError(f"invalid options for attack {name!r}: {key} must be a number, got {value!r}")
    try:
        config = cls.config_cls(**options)
    except ValidationError as err:
        raise InvalidValueError(f"invalid options for attack {name!r}: {validation_message(err)}") from None
    for key, value in config:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidValueError(f"invalid options for attack {name!r}: {key} must be finite, got {value}")
    return cls(config)


def _types(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits (`int | None` -> {int, NoneType})."""
    args = typing.get_args(annotation)
    return {annotation} if not args else {t for arg in args for t in _types(arg)}


def attack_fields(name: str) -> set[str]:
    """Option names an attack's config accepts (to route shared --eps/--steps only where they apply)."""
    return set(ATTACKS.get(name).config_cls.model_fields)


def route_options(
    names: Sequence[str], shared: Mapping[str, Any], specific: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per attack: shared options it accepts, then `name.key=value` options for it alone.

    A shared option that none of the named attacks accepts, and a per-attack key its attack does not have, are
    refused with the valid keys listed: an ignored option would silently run a different attack than asked.
    """
    fields = {name: attack_fields(name) for name in names}
    for key, value in shared.items():
        if value is not None and not any(key in f for f in fields.values()):
            valid = "; ".join(f"{n}: {', '.join(sorted(f))}" for n, f in fields.items()) or "no attack was named"
            raise InvalidValueError(
                f"attack option {key!r} applies to none of {', '.join(names) or '(none)'}", hint=f"valid: {valid}"
            )
    for name, options in specific.items():
        if name not in fields:
            raise InvalidValueError(f"attack option for {name!r}, which is not among {', '.join(names) or '(none)'}")
        unknown = sorted(set(options) - fields[name])
        if unknown:
            raise InvalidValueError(
                f"unknown option(s) {', '.join(unknown)} for attack {name!r}; valid: {', '.join(sorted(fields[name]))}"
            )
    routed: dict[str, dict[str, Any]] = {}
    for name in names:
        routed[name] = {k: v for k, v in shared.items() if k in fields[name] and v is not None}
        routed[name].update(specific.get(name, {}))
    return routed
