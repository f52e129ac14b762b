"""Torch-free names of every registry, for `--help` text and option declarations.

Registries fill themselves when their modules import torch; the CLI must not, so `loradar --help` stays instant.
These tuples mirror the registries, and `tests/test_names.py` keeps them equal: registering a new attack, recipe,
merge or vote method, LoRA initialisation, identifier mode or dataset without adding its name here fails the suite.
"""

ATTACKS: tuple[str, ...] = (
    "apgd",
    "apgd-l2",
    "apgd-t",
    "apgd-t-l2",
    "fab-t",
    "fgsm",
    "fia",
    "pgd",
    "pgd-l2",
    "roa",
    "square",
    "square-l2",
)
RECIPES: tuple[str, ...] = ("advlora", "amt", "autolora", "hyperat", "loradar", "mart", "pgd-at", "trades")
LORA_INITS: tuple[str, ...] = ("cluster", "kaiming", "svd")
SUITES: tuple[str, ...] = ("plus", "quick", "standard")
NORMS: tuple[str, ...] = ("linf", "l2")
MERGE_METHODS: tuple[str, ...] = ("cat", "linear", "ties", "tts")
VOTE_METHODS: tuple[str, ...] = ("majority", "soft", "weighted")
ENSEMBLE_METHODS: tuple[str, ...] = (*VOTE_METHODS, "route")
IDENTIFY_MODES: tuple[str, ...] = ("calibrated", "relative-rule", "rule")
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "mnist", "npz")
TARGET_PRESETS: tuple[str, ...] = ("all", "attn-mlp", "block-conv1", "convs")


def choices(names: tuple[str, ...]) -> str:
    """'a, b or c': a list of valid names for help text."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
