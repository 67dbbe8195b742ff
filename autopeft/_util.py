"""Small helpers shared across layers (it imports only the leaf module :mod:`autopeft.errors`).

* :func:`is_finite`: is a JSON value a real, finite number (scores, parameter counts, memory).
* :func:`read_yaml`: parse a YAML file, a syntax error raised as the caller's own one-line error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from autopeft.errors import first_line


def is_finite(x: Any) -> bool:
    """``True`` for an ``int`` or ``float`` (not a ``bool``) that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed content of YAML file ``path`` (``None`` for an empty file).

    Raises:
        error: the file is not valid YAML; one line, ``"<path>: not valid YAML (<first line of the reason>)"``.
        OSError: the file cannot be read.
    """
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({first_line(exc)})") from None
