"""Recipes: the YAML files that describe a fine-tuning run, their schema and their loader."""

from affinage.recipe.loader import (
    LoadedRecipe,
    RecipeError,
    dump_resolved,
    load_recipe,
    load_recipe_dict,
    load_recipe_with_sources,
    write_resolved,
)
from affinage.recipe.schema import Recipe

__all__ = [
    "LoadedRecipe",
    "Recipe",
    "RecipeError",
    "dump_resolved",
    "load_recipe",
    "load_recipe_dict",
    "load_recipe_with_sources",
    "write_resolved",
]
