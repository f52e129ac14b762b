"""Training recipes behind one registry (`RECIPES`), the recipe-agnostic loop, and resumable checkpoints."""

from loradar_cli.recipes import advlora, amt, autolora, hyperat, loradar, mart, pgd_at, trades
from loradar_cli.recipes.base import RECIPES, Recipe, RecipeConfig, StepOutput, build_recipe, register_recipe

_MODULES = (advlora, amt, autolora, hyperat, loradar, mart, pgd_at, trades)  # imported for their registrations

__all__ = ["RECIPES", "Recipe", "RecipeConfig", "StepOutput", "build_recipe", "register_recipe"]
