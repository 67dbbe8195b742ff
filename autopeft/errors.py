"""The one base of autopeft's own errors (a leaf module: it imports nothing from autopeft).

Every error class autopeft raises derives from :class:`AutopeftError` and keeps the builtin base it
had before (``RecipeError`` is still a ``ValueError``, ``RayStartError`` a ``RuntimeError``), so
``except ValueError`` goes on working. The command line catches :class:`AutopeftError`: a user error
(``user_error``, the default) prints one ``error:`` line and exits 2; the few that mean a bug or a
failed trial (``user_error = False``) take the generic path (one line, exit 1).

Where each class lives: with the module that raises it (``autopeft.composition.recipe.RecipeError``,
``autopeft.searching.budget.BudgetError``, ...); those that modules of two layers raise live here
(:class:`CompositionError`: the methods and the composition; :class:`TaskError`: the task table and
the user-data reader; :class:`ExportError`: the export registry and the exporter;
:class:`OutputPathError`: training, the search and the exporters), re-exported from their old homes.
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


class OutputPathError(AutopeftError, OSError):
    """An output folder or file that cannot be written (a file in the way, no permission), found
    before the work that would fill it (:func:`autopeft._util.check_can_write`)."""


def first_line(error: BaseException | str, with_type: bool = False) -> str:
    """The first non-blank line of an error's message (or of a recorded error text), stripped; an
    exception with an empty message gives its class name, an empty text ``""``. ``with_type``: an
    exception's line as ``"<ExceptionClass>: <line>"``. Never raises (``str(exc).splitlines()[0]``
    raised IndexError on an empty message and lost the real error)."""
    line = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
    if not isinstance(error, BaseException):
        return line
    name = type(error).__name__
    if not line:
        return name
    return f"{name}: {line}" if with_type else line


def one_line(exc: BaseException) -> str:
    """``"<ExceptionClass>: <whole message on one line>"`` (whitespace runs, newlines included, made one
    space); the class name alone for an empty message. For records (a failed confirm seed, the
    reference run) where the whole message matters but the record is one line."""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
