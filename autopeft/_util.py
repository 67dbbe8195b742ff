"""Small helpers shared across layers (it imports only the leaf module :mod:`autopeft.errors`).

* :func:`is_finite`: is a JSON value a real, finite number (scores, parameter counts, memory).
* :func:`read_yaml`: parse a YAML file, a syntax error raised as the caller's own one-line error.
* :func:`check_can_write`: refuse, before any work, an output path that cannot be written.
* :func:`validation_message`: every field a pydantic validation found bad, in one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from autopeft.errors import first_line


def validation_message(exc: Any, prefix: str = "", whole: str = "") -> str:
    """One line naming every field a pydantic ``ValidationError`` found bad, in its order:
    ``<prefix><field.path>: <message>`` joined by ``"; "`` (``whole`` stands for the path of an error
    about the whole object). A user fixing a file sees every bad field at once, not one per try."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or whole
        parts.append(f"{prefix}{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def is_finite(x: Any) -> bool:
    """``True`` for an ``int`` or ``float`` (not a ``bool``) that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require_file(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse a ``path`` that is not a file, in one line that says whether it is a folder or missing.

    Raises:
        error: ``"<what> '<path>' is a folder: give the YAML file"`` (naming ``recipe.yaml`` inside a
            trained output) or ``"<what> '<path>' does not exist"``.
    """
    if path.is_dir():
        hint = " (a trained output: its recipe is recipe.yaml inside it)" if (path / "recipe.yaml").is_file() else ""
        raise error(f"{what} {str(path)!r} is a folder: give the YAML file{hint}")
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed content of YAML file ``path`` (``None`` for an empty file).

    Raises:
        error: the file is not valid YAML, or not UTF-8 text, or a mapping names one key twice (PyYAML
            keeps the last silently: ``r: 4`` then ``r: 16`` would train r=16 without a word); one line,
            ``"<path>: not valid YAML (<first line of the reason>)"`` / ``"<path>: not a UTF-8 text file
            (...)"``.
        OSError: the file cannot be read.
    """
    import yaml

    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({first_line(exc)})") from None
    except UnicodeDecodeError as exc:  # a binary file given as YAML: name the file, not just the byte
        raise error(f"{path}: not a UTF-8 text file ({first_line(exc)})") from None


def _unique_key_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a mapping naming one key twice (line and key in the error)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # a list as key: SafeLoader's own error names it below
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def check_can_write(path: str | Path, what: str, error: type[Exception], folder: bool = True) -> None:
    """Refuse, before the work that fills it, an output ``path`` that cannot be written: ``folder``:
    it must be a folder or creatable as one; else a file's place (its folder must be). A file where a
    folder must be, or a folder that cannot be written (:func:`os.access`: root passes it), fails here,
    not after minutes of training (was: ``FileExistsError`` at the save, the trained weights lost).

    Raises:
        error: one line, ``"<what> '<path>': <why>"``.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise error(f"{what} {str(path)!r} is a file, not a folder")
    place = path if folder and path.is_dir() else path.parent
    while not place.exists() and place != place.parent:  # the nearest folder that exists: mkdir starts there
        place = place.parent
    if not place.is_dir():
        raise error(f"{what} {str(path)!r} cannot be created: {str(place)!r} is a file, not a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        raise error(f"{what} {str(path)!r} cannot be written: no write permission in {str(place)!r}")
