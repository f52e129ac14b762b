"""Torch-free names of the registries, for `--help` text (tests keep each equal to its registry)."""

RECIPE_NAMES: tuple[str, ...] = ("advlora", "amt", "autolora", "hyperat", "loradar", "mart", "pgd-at", "trades")
LORA_INIT_NAMES: tuple[str, ...] = ("cluster", "kaiming", "svd")
