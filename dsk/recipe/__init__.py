"""TOML recipes: layered loading (``[dsk] extends``), overrides, validation with key paths, provenance."""

from dsk.recipe.errors import RecipeError
from dsk.recipe.load import Recipe, load_recipe
from dsk.recipe.validate import ValidatedRecipe, validate_recipe

__all__ = ["Recipe", "RecipeError", "ValidatedRecipe", "load_recipe", "validate_recipe"]
