"""Pareto front and hypervolume over (task score max, trainable parameters min, peak memory min).

A point ``a`` dominates ``b`` when it is no worse in every objective and strictly better in one
(Deb et al., NSGA-II, 2002, definition 1). Hypervolume is the volume of objective space dominated
by the front and bounded by a reference point (Zitzler & Thiele 1998), computed exactly here by
coordinate compression, which is fast for the few dozen points a search produces.
"""

from __future__ import annotations

from itertools import product
from typing import Sequence

import numpy as np

from autopeft._util import is_finite

#: (key in a trial row, direction) of the three objectives.
OBJECTIVES: tuple[tuple[str, str], ...] = (("score", "max"), ("trainable_params", "min"), ("peak_memory_bytes", "min"))


def _as_min(rows: Sequence[dict], objectives=OBJECTIVES) -> np.ndarray:
    """(n, k) array where every objective is to be minimised."""
    return np.array([[(-r[k] if d == "max" else r[k]) for k, d in objectives] for r in rows], dtype=float)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` (both in minimisation form)."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all(a <= b) and np.any(a < b))


def pareto_front(rows: Sequence[dict], objectives=OBJECTIVES) -> list[int]:
    """Indices of the non-dominated rows, sorted by score descending (first objective).

    Rows with a non-finite objective (a NaN score: STS-B's Pearson of constant predictions) are
    failed trials: they are never on the front and never dominate anything.
    """
    valid = finite_rows(rows, objectives)
    pts = _as_min([rows[i] for i in valid], objectives)
    keep = [i for i in range(len(pts)) if not any(dominates(pts[j], pts[i]) for j in range(len(pts)) if j != i)]
    return [valid[i] for i in sorted(keep, key=lambda i: tuple(pts[i]))]


def search_front(records: dict, top: int, limit: int) -> list[dict]:
    """The Pareto front a search reports: of every trial record (``trial id -> TrialRecord``) that
    ``finished``, its row at the top fidelity ``top`` (training examples) when that row's trainable
    parameters are within ``limit`` and its dev score is finite; then :func:`pareto_front` of those
    rows. Each returned row carries ``trial_id`` and ``recipe``. Rows of lower rungs, stopped, failed,
    rejected and over-budget trials never enter it."""
    candidates = []
    for r in records.values():
        row = r.row_at(top)
        if row is not None and r.status == "finished" and row["trainable_params"] <= limit and is_finite(row.get("score")):
            candidates.append({"trial_id": r.trial_id, **row, "recipe": r.recipe})
    return [candidates[i] for i in pareto_front(candidates)]


def hypervolume(points_min: np.ndarray, reference: Sequence[float]) -> float:
    """Exact hypervolume of ``points_min`` (n, k), all objectives minimised, w.r.t. ``reference`` (k,).

    Points not strictly better than the reference in every objective contribute nothing.
    Cost: O(n^k * n); fine for n up to ~60 with k = 3.
    """
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray([p for p in np.asarray(points_min, dtype=float).reshape(-1, len(ref)) if np.all(p < ref)])
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([pts[:, j], [ref[j]]])) for j in range(len(ref))]
    total = 0.0
    for cell in product(*[range(len(a) - 1) for a in axes]):
        low = np.array([axes[j][c] for j, c in enumerate(cell)])
        if np.any(np.all(pts <= low, axis=1)):
            total += float(np.prod([axes[j][c + 1] - axes[j][c] for j, c in enumerate(cell)]))
    return total


def front_hypervolume(rows: Sequence[dict], param_limit: int, objectives=OBJECTIVES) -> float:
    """Hypervolume of ``rows`` normalised to the unit cube: score in [0, 1] (reference 0), parameters
    divided by ``param_limit`` (reference 1), memory divided by 1.1x the largest memory (reference 1)."""
    if not rows:
        return 0.0
    mem_ref = 1.1 * max(r["peak_memory_bytes"] for r in rows)
    pts = np.array([[-r["score"], r["trainable_params"] / param_limit, r["peak_memory_bytes"] / mem_ref] for r in rows])
    return hypervolume(pts, [0.0, 1.0, 1.0])


def finite_rows(rows: Sequence[dict], objectives=OBJECTIVES) -> list[int]:
    """Indices of the rows whose every objective is a finite number (a NaN score is a failed trial)."""
    return [i for i, r in enumerate(rows) if all(is_finite(r.get(k)) for k, _ in objectives)]


def nondominated_fronts(points_min: np.ndarray) -> list[list[int]]:
    """Non-dominated sorting (Deb et al. 2002, NSGA-II, sec. III-A): fronts of indices, best first."""
    pts = np.asarray(points_min, dtype=float)
    left = list(range(len(pts)))
    fronts = []
    while left:
        front = [i for i in left if not any(dominates(pts[j], pts[i]) for j in left if j != i)]
        fronts.append(front)
        left = [i for i in left if i not in front]
    return fronts


def crowding_distance(points_min: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point within one front (sec. III-B); extremes get ``inf``."""
    pts = np.asarray(points_min, dtype=float)
    n, k = pts.shape if pts.ndim == 2 else (len(pts), 0)
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(k):
        order = np.argsort(pts[:, j], kind="stable")
        span = pts[order[-1], j] - pts[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (pts[order[2:], j] - pts[order[:-2], j]) / span
    return dist


def rank_keys(points_min: np.ndarray) -> list[tuple[int, float]]:
    """Per point, its NSGA-II rank key ``(front index, -crowding distance)``: smaller is better
    (Deb et al. 2002, the crowded-comparison operator; MO-ASHA's NSGA-II selection, Schmucker et al.
    2021, arXiv:2106.12639, sec. 3)."""
    pts = np.asarray(points_min, dtype=float)
    keys: list[tuple[int, float]] = [(0, 0.0)] * len(pts)
    for f, front in enumerate(nondominated_fronts(pts)):
        cd = crowding_distance(pts[front])
        for i, idx in enumerate(front):
            keys[idx] = (f, -float(cd[i]))
    return keys


def rank_order(points_min: np.ndarray) -> list[int]:
    """All indices, best first by :func:`rank_keys`, ties by index (earlier first)."""
    keys = rank_keys(points_min)
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))
