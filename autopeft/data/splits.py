"""A split of text data, and how a data column becomes texts (a leaf of the data layer: both
:mod:`autopeft.data.tasks` and :mod:`autopeft.data.userfiles` build splits with it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """One split: ``texts[i]`` is a tuple of 1 or 2 strings; ``labels[i]`` an int or float."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, seed: int = 0) -> "Split":
        """``n`` seeded rows of this split (all of it when ``n >= len(self)``), in their original order.

        The same ``(n, seed)`` gives the same rows whatever else runs, so every trial of a search scores
        its lower rungs on the same sample (:attr:`autopeft.composition.recipe.TrainingConfig.rung_eval_examples`).
        """
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return Split([self.texts[i] for i in idx], np.asarray(self.labels)[idx])


def cell_texts(series) -> list[str]:
    """The cells of a data column as texts: a missing cell (``None``, NaN, ``pd.NA``: an empty cell of
    the file) is ``""``, every other cell ``str(value)``, whatever it says (``"None"`` and ``"NA"``
    are words, not missing values)."""
    import pandas as pd

    return ["" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)
            for v in series.tolist()]
