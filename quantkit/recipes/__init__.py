"""Recipes: a whole quantization pipeline (quantizer, scheme, activations, calibration, transform, allocation,
export) in one YAML file whose every field is a ``quantkit quantize`` option."""

from quantkit.recipes.catalog import find_recipe, load_recipe, shipped_recipes
from quantkit.recipes.fields import FIELDS, RecipeField
from quantkit.recipes.recipe import Recipe, recipe_from_settings, resolve

__all__ = ["FIELDS", "Recipe", "RecipeField", "find_recipe", "load_recipe", "recipe_from_settings", "resolve",
           "shipped_recipes"]
