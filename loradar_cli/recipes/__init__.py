"""Training recipes behind one registry (`RECIPES`), the recipe-agnostic loop, and resumable checkpoints.

To add a recipe, write `recipes/<name>.py` with a `@register_recipe` class (every module of this package is
imported on import) and add its name to `loradar_cli.names.RECIPES`.
"""

import importlib
import pkgutil

from loradar_cli.recipes.base import RECIPES, Recipe, RecipeConfig, StepOutput, build_recipe, register_recipe


def _import_recipe_modules() -> None:
    """Import every public module of this package, so a recipe registers itself by existing."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_recipe_modules()

__all__ = ["RECIPES", "Recipe", "RecipeConfig", "StepOutput", "build_recipe", "register_recipe"]
