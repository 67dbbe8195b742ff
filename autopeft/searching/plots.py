"""The Pareto plot of a search (``pareto.png``), with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autopeft._util import is_finite

#: One marker per rung, lowest first (the top rung is the last one used).
RUNG_MARKERS = ("v", "s", "D", "o", "^", "P", "X")


def pareto_plot(path: str | Path, trials: list[dict[str, Any]], front: list[dict[str, Any]], metric: str,
                param_limit: int | None = None, rungs: list[int] | None = None,
                reference: dict[str, Any] | None = None) -> None:
    """Draw dev score against trainable parameters for every trained trial, at the last rung it reached.

    * colour: peak training memory (MiB, colour bar; the same scale for every point);
    * marker: the rung the point was measured at (legend ``rung k: n examples, dev on m``: the dev
      examples scored there, fewer below the top rung, ``training.rung_eval_examples``);
    * a black ring: the point is on the Pareto front (top fidelity, within budget);
    * a dashed vertical line: the budget ``param_limit`` (trainable parameters without the head);
    * error bars: the front's 95% dev intervals (``score_low``/``score_high``), and beside each front
      point its test score (red ``x``) with its 95% test interval (``test_low``/``test_high``);
    * a dotted horizontal line: the ``--reference`` run's test score (``reference["test_score"]``).

    Args:
        path: the PNG to write.
        trials: trial records (``TrialRecord.as_dict``: ``rows`` with ``trainable_params``, ``score``,
            ``peak_memory_bytes`` (bytes), ``examples_seen``); trials without rows are skipped.
        front: the Pareto rows (``trainable_params``, ``score``).
        metric: the task metric, for the y label.
        param_limit: the budget in parameters (no line when ``None``).
        rungs: the search's rungs in examples seen (else the distinct ``examples_seen`` of the points).
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for t in trials:
        row = (t.get("rows") or [None])[-1]
        if not row or not all(is_finite(row.get(k)) for k in ("trainable_params", "score", "peak_memory_bytes")):
            continue
        points.append((row["trainable_params"], row["score"], row["peak_memory_bytes"] / 2**20,
                       int(row.get("examples_seen") or 0), row.get("eval_examples")))
    rungs = sorted(rungs or {p[3] for p in points})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if points:
        mems = [p[2] for p in points]
        norm = matplotlib.colors.Normalize(min(mems), max(mems) if max(mems) > min(mems) else min(mems) + 1)
        for k, rung in enumerate(rungs):
            at = [p for p in points if p[3] == rung or (k == 0 and p[3] not in rungs)]
            if at:
                scored = {p[4] for p in at}  # dev examples scored there (lower rungs: the search's sample)
                on = f", dev on {scored.pop():,}" if len(scored) == 1 and isinstance(next(iter(scored)), int) else ""
                ax.scatter([p[0] for p in at], [p[1] for p in at], c=[p[2] for p in at], cmap="viridis",
                           norm=norm, marker=RUNG_MARKERS[min(k, len(RUNG_MARKERS) - 1)], s=40,
                           label=f"rung {k + 1}: {rung:,} examples{on}", edgecolors="none")
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                     label="peak training memory (MiB)")
    if front:
        ax.scatter([r["trainable_params"] for r in front], [r["score"] for r in front], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto front (top rung), dev")
        _error_bars(ax, front, "score", "score_low", "score_high", "black", None)
        tested = [r for r in front if is_finite(r.get("test_score"))]
        if tested:
            ax.scatter([r["trainable_params"] for r in tested], [r["test_score"] for r in tested], marker="x",
                       color="tab:red", s=50, label="same points, test (95% interval)")
            _error_bars(ax, tested, "test_score", "test_low", "test_high", "tab:red", None)
    if reference and is_finite(reference.get("test_score")):
        ax.axhline(reference["test_score"], color="tab:gray", linestyle=":", linewidth=1.2,
                   label=f"{reference.get('kind', 'reference')} fine-tuning, test {reference['test_score']:.4f}")
    if param_limit is not None and math.isfinite(param_limit):
        ax.axvline(param_limit, color="tab:red", linestyle="--", linewidth=1, label=f"budget {param_limit:,}")
    ax.set_xlabel("trainable parameters (without the head)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _error_bars(ax, rows: list[dict], key: str, low: str, high: str, color: str, label: str | None) -> None:
    """Vertical 95% interval bars ``[row[low], row[high]]`` around ``row[key]`` (rows without one: none)."""
    rows = [r for r in rows if is_finite(r.get(low)) and is_finite(r.get(high)) and is_finite(r.get(key))]
    if not rows:
        return
    ax.errorbar([r["trainable_params"] for r in rows], [r[key] for r in rows],
                yerr=[[r[key] - r[low] for r in rows], [r[high] - r[key] for r in rows]], fmt="none",
                ecolor=color, elinewidth=1, capsize=3, label=label)
