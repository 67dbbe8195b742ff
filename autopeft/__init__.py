"""autopeft: find the best parameter-efficient fine-tuning configuration under a parameter budget.

Public API (see :mod:`autopeft.api`): :func:`search`, :func:`export`, :func:`train`, :func:`count`,
:func:`predict`, :func:`resume`;
recipes: :class:`Recipe`, :func:`load_recipe`, :func:`build_model`.
"""

from autopeft._version import __version__  # noqa: F401
from autopeft.api import count, export, predict, resume, search, train  # noqa: E402,F401
from autopeft.recipe import Recipe, build_model, load_recipe, recipe_from_dict  # noqa: E402,F401

__all__ = ["search", "resume", "export", "train", "count", "predict", "Recipe", "build_model", "load_recipe", "recipe_from_dict"]
