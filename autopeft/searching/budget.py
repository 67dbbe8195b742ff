"""Parameter budgets: ``0.5%``, ``0.005`` (a fraction of the backbone) or ``120k`` / ``1.2M`` / ``73728``.

The budget limits trainable parameters without the task head (see ``ParameterCount``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from autopeft.errors import AutopeftError

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


class BudgetError(AutopeftError, ValueError):
    """A budget string that is not a positive percentage, fraction or parameter count."""


@dataclass(frozen=True)
class Budget:
    """Either a fraction of the backbone's parameters or an absolute parameter count."""

    fraction: float | None = None
    absolute: int | None = None
    text: str = ""

    def limit(self, backbone_params: int) -> int:
        """Largest allowed trainable-parameter count (parameters) for a backbone of that size."""
        if self.absolute is not None:
            return self.absolute
        return int(self.fraction * backbone_params)

    def __str__(self) -> str:
        return self.text or (f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.absolute))


def parse_budget(text: str | float | int) -> Budget:
    """Parse a budget.

    ``"0.5%"`` and ``"0.005"`` are fractions (at most 100%); a number above 1 or with a ``k``/``M``/``B``
    suffix is an absolute parameter count.

    Raises:
        BudgetError: empty, negative, zero, above 100%, infinite, a fractional count, or not a number.
    """
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(%|k|m|b)?", s)
    if not m:
        raise BudgetError(f"invalid budget {text!r}: use a percentage (0.5%), a fraction (0.005) or a count (120k)")
    value, unit = float(m.group(1)), m.group(2) or ""
    if value <= 0:
        raise BudgetError(f"invalid budget {text!r}: it must be positive")
    if not math.isfinite(value * _SUFFIX[unit] if unit != "%" else value):  # 1e999: float("inf")
        raise BudgetError(f"invalid budget {text!r}: it must be a finite number")
    if unit == "%":
        if value > 100:
            raise BudgetError(f"invalid budget {text!r}: a percentage cannot exceed 100%")
        return Budget(fraction=value / 100, text=str(text).strip())
    if unit == "" and value <= 1:
        return Budget(fraction=value, text=str(text).strip())
    count = value * _SUFFIX[unit]
    if count != int(count):
        raise BudgetError(f"invalid budget {text!r}: a parameter count must be a whole number")
    return Budget(absolute=int(count), text=str(text).strip())
