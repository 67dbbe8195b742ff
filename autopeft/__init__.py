"""autopeft: find the best parameter-efficient fine-tuning configuration under a parameter budget.

Public API (see :mod:`autopeft.api`): :func:`search`, :func:`export`, :func:`train`, :func:`count`,
:func:`predict`, :func:`resume`;
recipes: :class:`Recipe`, :func:`load_recipe`, :func:`build_model`.

The modules live in one folder per layer (ARCHITECTURE.md); their old paths (``autopeft.trainer``,
``autopeft.hpo.searchers``, ...) still import the same modules (:mod:`autopeft._aliases`).
"""

from autopeft import _aliases

_aliases.install()  # before anything else: old names work from here on (pickles, Ray, users)

from autopeft._version import __version__  # noqa: E402,F401
from autopeft.api import count, export, predict, resume, search, train  # noqa: E402,F401
from autopeft.composition.recipe import Recipe, build_model, load_recipe, recipe_from_dict  # noqa: E402,F401

__all__ = ["search", "resume", "export", "train", "count", "predict", "Recipe", "build_model", "load_recipe", "recipe_from_dict"]


def __getattr__(name: str):
    """``autopeft.trainer`` and the other old module names as attributes, imported on first use."""
    return _aliases.old_attribute(name)
