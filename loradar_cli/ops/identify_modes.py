"""How `identify-attack` decides, as a registry of mode names and descriptions (torch-free, for CLI help)."""

from loradar_cli.registry import Registry

IDENTIFY_MODES: Registry[str] = Registry("identification mode")
IDENTIFY_MODES.register("calibrated")("a fitted --identifier on input and member features")
IDENTIFY_MODES.register("relative-rule")("the member most confident relative to its confidence on clean inputs")
IDENTIFY_MODES.register("rule")("the most confident member, as first described for LoRADAR")

DEFAULT_MARGINS = {"rule": 0.1, "relative-rule": 0.0}
"""Lead over the runner-up member needed to name an attack: probability units (rule), clean-std units (relative)."""


def modes_help() -> str:
    """One line per mode for --help, generated from the registry."""
    return "; ".join(f"{name}: {IDENTIFY_MODES.get(name)}" for name in IDENTIFY_MODES.names())
