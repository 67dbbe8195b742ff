"""MO-ASHA: asynchronous successive halving that promotes by non-dominated sorting.

Schmucker, Donini, Zafar, Salinas, Archambeau, "Multi-objective asynchronous successive halving",
arXiv:2106.12639 (2021), alg. 1: ASHA (Li et al., arXiv:1810.05934) with the single-metric
"top 1/eta" rule replaced by a multi-objective ranking of the results recorded at a rung.

Rule used here (stopping form of ASHA, as Ray Tune's ``ASHAScheduler``): when a trial reports at
rung ``r_k`` (a milestone in training examples seen), its objective vector (score max, trainable
parameters min, peak training memory min) is recorded there; all vectors recorded at ``r_k`` are
ranked by non-dominated front, then NSGA-II crowding distance (larger first: the ends of each front
are kept, so the most accurate *and* the smallest configurations go on), then arrival order
(:func:`autopeft.searching.pareto.rank_keys`). The trial continues if fewer than ``ceil(n / eta)`` of
the ``n`` recorded results rank strictly ahead of it, else it stops (ties never stop a trial, so
the extremes of the first front, which all have infinite crowding distance, continue). The first
trial at a rung always continues.

A rung without signal decides nothing: while every score recorded at a rung is the same value, as
when every trial so far predicts one class there (the majority class's accuracy, MCC 0), the trial
continues. Ranking such a rung would stop trials by size alone: in the CoLA benchmark (seed 0, first
rung 2,592 examples) every trial scored MCC 0 there, and LoRA r=8 on W_q/W_v was stopped because a
smaller adapter tied with it, though at more examples it learns (MCC 0.142 at 32,512). Once one
score differs, the rung ranks as above, every result recorded at it included.

Why this rule: the search's answer is a Pareto front at the top fidelity, so promotion has to
keep a smaller, slightly weaker configuration alive when nothing at the rung dominates it;
ranking by score alone (plain ASHA) stops it at the first rung. Crowding distance is the
selection MO-ASHA's NSGA-II variant uses; it costs nothing extra for the few dozen points of a
search.

The milestones are exactly the rungs the trials report at (``rungs[:-1]``; the last rung is the
top fidelity where a trial ends by itself), so no rung is skipped whatever the top fidelity. A
report with ``status`` ``failed`` or a non-finite score stops the trial and is never recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from autopeft._util import is_finite
from autopeft.searching.pareto import OBJECTIVES, rank_keys


def _scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class MultiObjectiveASHA(_scheduler_base()):
    """Ray Tune scheduler implementing the rule of the module docstring.

    Args:
        rungs: ascending examples-seen milestones the trials report at, the last one the top fidelity.
        reduction_factor: ``eta``: about one in ``eta`` results at a rung continues.
        time_attr: the result key holding the fidelity (training examples seen).
        objectives: ``(key, "max"|"min")`` pairs, as :data:`autopeft.searching.pareto.OBJECTIVES`.

    Attributes:
        milestones: the rungs where a trial may be stopped (all but the top).
        score_index: which objective is the task score (the first), read by the no-signal rule.
        recorded: ``{milestone: {trial_id: objective vector (minimisation form)}}``.
        decisions: ``(trial_id, milestone, "continue"|"stop")`` in the order they were taken.

    Raises:
        ValueError: rungs not strictly ascending, or ``reduction_factor`` < 2.
    """

    def __init__(self, rungs: list[int], reduction_factor: int = 3, time_attr: str = "examples_seen",
                 objectives=OBJECTIVES) -> None:
        super().__init__()
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or not rungs:
            raise ValueError(f"rungs must be strictly ascending, got {rungs}")
        if reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {reduction_factor}")
        self.rungs = list(rungs)
        self.milestones = list(rungs[:-1])
        self.eta = reduction_factor
        self.time_attr = time_attr
        self.objectives = tuple(objectives)
        self.score_index = 0  # the task score: the first objective (OBJECTIVES' order)
        self.recorded: dict[int, dict[str, list[float]]] = {m: {} for m in self.milestones}
        self.decisions: list[tuple[str, int, str]] = []

    def set_search_properties(self, metric, mode, **spec) -> bool:  # objectives are fixed at construction
        return True

    def vector(self, result: dict[str, Any]) -> list[float] | None:
        """The objective vector of a result in minimisation form; ``None`` if any is not finite."""
        out = []
        for key, direction in self.objectives:
            v = result.get(key)
            if not is_finite(v):
                return None
            out.append(-float(v) if direction == "max" else float(v))
        return out

    def decide(self, trial_id: str, result: dict[str, Any]) -> str:
        """``continue`` or ``stop`` for one report (pure: usable without Ray)."""
        if result.get("status") == "failed":
            return "stop"
        vec = self.vector(result)
        if vec is None:
            return "stop"
        t = result.get(self.time_attr)
        if t not in self.recorded:
            return "continue"
        rung = self.recorded[t]
        rung[trial_id] = vec
        if len({v[self.score_index] for v in rung.values()}) == 1:  # no signal at this rung (yet)
            self.decisions.append((trial_id, int(t), "continue"))
            return "continue"
        ids = list(rung)
        keys = rank_keys(np.array([rung[i] for i in ids]))
        mine = keys[ids.index(trial_id)]
        ahead = sum(1 for k in keys if k < mine)  # strictly better ranked: ties do not count
        decision = "continue" if ahead < math.ceil(len(ids) / self.eta) else "stop"
        self.decisions.append((trial_id, int(t), decision))
        return decision

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.CONTINUE if self.decide(trial.trial_id, result) == "continue" else self.STOP

    def debug_string(self) -> str:
        return "MO-ASHA: " + ", ".join(f"rung {m}: {len(r)} recorded" for m, r in self.recorded.items())

    def get_state(self) -> dict[str, Any]:
        """The recorded rung results (arrival order kept: it breaks ties) and the decisions, for a
        resumed search (:mod:`autopeft.searching.resume`); plain lists and numbers."""
        return {"recorded": {int(m): [[tid, list(vec)] for tid, vec in rung.items()] for m, rung in self.recorded.items()},
                "decisions": [list(d) for d in self.decisions]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`; milestones it does not hold stay empty.

        Raises:
            ValueError: the state has results at a rung that is not one of this scheduler's milestones.
        """
        extra = set(int(m) for m in state["recorded"]) - set(self.milestones)
        if extra:
            raise ValueError(f"the saved scheduler state has rungs {sorted(extra)} that are not milestones "
                             f"{self.milestones}")
        self.recorded = {m: {} for m in self.milestones}
        for m, rung in state["recorded"].items():
            self.recorded[int(m)] = {tid: list(vec) for tid, vec in rung}
        self.decisions = [(tid, int(t), d) for tid, t, d in state["decisions"]]

    def save(self, checkpoint_path: str) -> None:
        """Ray Tune's scheduler checkpoint: :meth:`get_state` as JSON."""
        import json

        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import json

        with open(checkpoint_path) as f:
            self.set_state(json.load(f))
