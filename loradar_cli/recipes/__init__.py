"""Training recipes (loss given clean and adversarial batches) and the adapter/base training loops."""

from loradar_cli.recipes.losses import RECIPES, recipe_loss

__all__ = ["RECIPES", "recipe_loss"]
