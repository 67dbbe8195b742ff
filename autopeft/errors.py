"""The one base of autopeft's own errors (a leaf module: it imports nothing from autopeft).

Every error class autopeft raises derives from :class:`AutopeftError` and keeps the builtin base it
had before (``RecipeError`` is still a ``ValueError``, ``RayStartError`` a ``RuntimeError``), so
``except ValueError`` goes on working. The command line catches :class:`AutopeftError`: a user error
(``user_error``, the default) prints one ``error:`` line and exits 2; the few that mean a bug or a
failed trial (``user_error = False``) take the generic path (one line, exit 1).

Where each class lives: with the module that raises it (``autopeft.composition.recipe.RecipeError``,
``autopeft.searching.budget.BudgetError``, ...); those that modules of two layers raise live here
(:class:`CompositionError`: the methods and the composition; :class:`TaskError`: the task table and
the user-data reader; :class:`ExportError`: the export registry and the exporter), re-exported from
their old homes.
"""

from __future__ import annotations


class AutopeftError(Exception):
    """Base of every error autopeft raises on purpose; the message is one line.

    Attributes:
        user_error: ``True`` when the input (a setting, file, name) is at fault: the CLI exits 2.
    """

    user_error: bool = True


class CompositionError(AutopeftError, ValueError):
    """Two components claim the same slot in an incompatible way, or a component does not fit."""


class ExportError(AutopeftError, ValueError):
    """The model cannot be exported in the asked format, or the export did not reproduce its logits.

    The message is one line: what blocks it and what to use instead.
    """


class TaskError(AutopeftError, ValueError):
    """Unknown task or missing data."""
