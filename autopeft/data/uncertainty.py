"""How sure a score is: 95% bootstrap intervals over the evaluation examples, and a noise-aware pick.

A score on a few hundred examples is noisy: SST-2's 872 validation sentences give an accuracy near
86% a binomial standard error of 1.2 points. Every score autopeft reports (dev at each rung, test
after the search) carries a percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13): the
evaluation examples are resampled with replacement ``n_resamples`` times (seeded), the metric is
recomputed on each resample (pairs of prediction and label stay together), and the 2.5th and 97.5th
percentiles bound it (``scipy.stats.bootstrap``, ``method="percentile"``, ``paired=True``).
The interval covers the noise of the evaluation sample only, not of training (seeds): for that,
``--confirm-seeds K`` retrains a point with K more seeds.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from autopeft._util import is_finite

#: Resamples of a bootstrap interval (1,000: the interval's ends move by < 0.2 points between seeds
#: on 872 examples; milliseconds for accuracy, F1, MCC and Pearson, which are vectorised).
N_RESAMPLES = 1000
#: Confidence level of every reported interval.
LEVEL = 0.95


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], predictions: Sequence, labels: Sequence,
                 seed: int = 0, n_resamples: int = N_RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(predictions, labels)`` over the examples.

    Args:
        metric: ``fn(predictions, labels) -> float`` (e.g. :data:`autopeft.data.tasks.METRICS` values).
        predictions / labels: (N,) class ids, or floats for regression.
        seed: seeds the resampling (the same seed gives the same interval).
        n_resamples: resamples drawn.
        level: confidence level (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than two examples or a metric that is undefined on
        most resamples (e.g. Pearson of constant predictions).
    """
    from scipy.stats import bootstrap

    pred, gold = np.asarray(predictions), np.asarray(labels)
    if len(pred) < 2:
        return float("nan"), float("nan")
    stat = vectorised_metric(metric.__name__, pred, gold)
    vectorized = stat is not None
    if stat is None:
        def stat(p, g):
            with np.errstate(all="ignore"):
                return float(metric(p, g))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (constant predictions) warn
        res = bootstrap((pred, gold), stat, n_resamples=n_resamples, paired=True, vectorized=vectorized,
                        confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return float("nan"), float("nan")
    return lo, hi


def _binary_counts(p: np.ndarray, g: np.ndarray, axis: int):
    p1, g1 = p == 1, g == 1
    return ((p1 & g1).sum(axis).astype(float), (p1 & ~g1).sum(axis).astype(float),
            (~p1 & g1).sum(axis).astype(float), (~p1 & ~g1).sum(axis).astype(float))


def vectorised_metric(name: str, pred: np.ndarray, gold: np.ndarray) -> Callable | None:
    """The metric ``name`` (a :data:`autopeft.data.tasks.METRICS` function's ``__name__``) as a statistic on
    resamples stacked along the leading axes (``stat(p, g, axis=-1)``, as ``scipy.stats.bootstrap``
    calls a vectorised statistic), or ``None`` when it has no closed form here. Each is the same number
    as the scalar metric on every resample: accuracy; binary F1 and MCC (labels in {0, 1}: 0 where
    undefined, as scikit-learn returns); Pearson's r (``nan`` on a constant resample, as scipy returns).
    One interval on 1,000 resamples then costs milliseconds instead of seconds (scikit-learn's MCC:
    ~8 s per interval on 855 CoLA examples, paid at every rung of every trial)."""
    binary = (name in ("_f1", "_mcc") and np.isin(pred, (0, 1)).all() and np.isin(gold, (0, 1)).all())
    if name == "_accuracy":
        return lambda p, g, axis=-1: np.mean(p == g, axis=axis)
    if binary and name == "_f1":
        def f1(p, g, axis=-1):
            tp, fp, fn, _ = _binary_counts(p, g, axis)
            with np.errstate(all="ignore"):
                return np.nan_to_num(2 * tp / (2 * tp + fp + fn), nan=0.0)
        return f1
    if binary and name == "_mcc":
        def mcc(p, g, axis=-1):
            tp, fp, fn, tn = _binary_counts(p, g, axis)
            with np.errstate(all="ignore"):
                return np.nan_to_num((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)),
                                     nan=0.0)
        return mcc
    if name == "_pearson":
        def pearson(p, g, axis=-1):
            a = p - p.mean(axis, keepdims=True)
            b = g - g.mean(axis, keepdims=True)
            with np.errstate(all="ignore"):
                return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
        return pearson
    return None


def within_noise(rows: list[dict], score: str = "score", low: str = "score_low") -> list[dict]:
    """The rows whose ``score`` is at least the lower end of the best row's interval (``low``): the
    points a user cannot tell apart from the best by this evaluation. A row without an interval
    counts only itself as the best."""
    finite = [r for r in rows if isinstance(r.get(score), (int, float)) and math.isfinite(r[score])]
    if not finite:
        return []
    best = max(finite, key=lambda r: r[score])
    floor = best.get(low)
    if not isinstance(floor, (int, float)) or not math.isfinite(floor):
        floor = best[score]
    return [r for r in finite if r[score] >= floor]


def fmt_ci(score: object, low: object = None, high: object = None) -> str:
    """A score with its 95% interval as every report prints it: ``0.8761 [0.8541, 0.8968]``; the score
    alone without a finite interval; ``n/a`` without a finite score (``None``, NaN, a failed run)."""
    if not is_finite(score):
        return "n/a"
    return f"{score:.4f} [{low:.4f}, {high:.4f}]" if is_finite(low) and is_finite(high) else f"{score:.4f}"
