"""Searchers by name, and the Ray Tune search algorithm that asks them for configurations.

``--searcher`` picks the Optuna sampler that proposes configurations (all seeded):

* ``tpe`` (default): multi-objective, multivariate TPE (Ozaki et al. 2022, "Multiobjective
  tree-structured Parzen estimator", JAIR 73; Optuna's ``TPESampler``).
* ``random``: uniform random search over the same space (Optuna's ``RandomSampler``): the baseline.
* ``nsga2``: the genetic NSGA-II (Deb et al. 2002; Optuna's ``NSGAIISampler``).
* ``qnehvi``: multi-objective Bayesian optimisation with the noisy expected hypervolume improvement
  (Daulton et al. 2021, arXiv:2105.08195), as in the AutoPEFT paper (Zhou et al. 2024,
  arXiv:2301.12132, sec. 3); BoTorch through ``optuna-integration``'s ``BoTorchSampler``
  (``pip install 'autopeft[botorch]'``).

:class:`SpaceSearcher` is the Ray Tune search algorithm. It asks the sampler with Optuna's
ask-and-tell interface and **checks every sampled point before Ray sees it**: the point becomes a
recipe and is counted on the meta device (milliseconds). A point that is over the parameter
budget, has no PEFT component, or does not make a valid recipe is *rejected*: it is told to the
sampler as infeasible (``Trial.set_constraint``, which TPE, NSGA-II and BoTorch read as constraint
violations: TPE puts it in its "bad" group, NSGA-II ranks it below every feasible point), handed to
``on_reject`` (the search records it as ``over_budget`` / ``empty`` / ``invalid`` in MLflow), and the
sampler is asked again. A rejected point never starts a Ray trial and never takes a trial slot.

**Constraints** are told the same way for every sampled point: ``budget`` (how far over the
parameter limit, relative), ``nonempty`` and ``valid`` (1.0 when violated); every point that passes
the check gets 0.0 for all three when it is sampled (BoTorch's qNEHVI needs
the same constraint names on every complete trial; TPE and NSGA-II read them as feasibility).

Multi-fidelity and the sampler: only a trial that reached the **top fidelity** is told to the
sampler as complete, with its top-fidelity objectives. A trial the scheduler stopped at a lower
rung is told as ``PRUNED`` with no values: the sampler never reads a low-rung score as a final one,
and the rung result still counts as its own signal (Optuna's TPE ranks pruned trials after every
complete one when it splits good from bad; NSGA-II and BoTorch leave them out). Failed trials and
trials with a non-finite score are told as ``FAIL``.

Pickling: Ray pickles the search algorithm and the resume checkpoint pickles the Optuna study with
its sampler. Optuna's NSGA-II sampler holds a ``threading.Lock``, which cannot be pickled;
:class:`PicklableNSGAIISampler` leaves its locks out of the pickle and makes new ones on load.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autopeft.hpo.space import Dim, SearchSpace

#: Searcher names accepted by ``--searcher``.
SEARCHERS = ("tpe", "random", "nsga2", "qnehvi")
#: Consecutive rejected samples after which the searcher gives up (the space is nearly all infeasible).
MAX_CONSECUTIVE_REJECTS = 500

_LOCK, _RLOCK = type(threading.Lock()), type(threading.RLock())


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's ``NSGAIISampler`` (same arguments, same proposals) that can be pickled.

    Optuna 5's genetic samplers keep a ``threading.Lock`` (``BaseGASampler._thread_lock``) that
    ``pickle`` refuses ("cannot pickle '_thread.lock' object"). This subclass pickles every other
    attribute (random state, generation caches) and replaces each lock attribute by a new lock of
    the same kind on load; nothing is changed in Optuna itself.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = {k: isinstance(v, _RLOCK) for k, v in state.items() if isinstance(v, (_LOCK, _RLOCK))}
        for k in locks:
            del state[k]
        state["_autopeft_locks"] = locks  # name -> reentrant
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        locks = state.pop("_autopeft_locks", {})
        self.__dict__.update(state)
        for k, reentrant in locks.items():
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())


class SearcherError(ValueError):
    """Unknown searcher name, or a searcher whose library is not installed."""


def make_sampler(name: str, seed: int, n_startup_trials: int = 6):
    """The seeded Optuna sampler of searcher ``name`` (see the module docstring).

    Every sampler returned pickles (``nsga2`` is a :class:`PicklableNSGAIISampler`).

    Raises:
        SearcherError: unknown name, or ``qnehvi`` without BoTorch / optuna-integration.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return PicklableNSGAIISampler(seed=seed, population_size=max(4, n_startup_trials))
    if name == "qnehvi":
        try:
            from optuna_integration import BoTorchSampler
            from optuna_integration.botorch import qnehvi_candidates_func
        except ImportError:
            raise SearcherError("searcher 'qnehvi' needs BoTorch: pip install 'autopeft[botorch]' "
                                "(botorch and optuna-integration)") from None
        return BoTorchSampler(candidates_func=qnehvi_candidates_func, n_startup_trials=n_startup_trials, seed=seed)
    raise SearcherError(f"unknown searcher {name!r}; valid: {', '.join(SEARCHERS)}")


def optuna_distribution(dim: Dim):
    """The Optuna distribution of a (non-fixed) dimension; list/dict choices travel as JSON strings."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    a = dim.values
    if dim.kind == "choice":
        return CategoricalDistribution([dim.encode(v) for v in a])
    if dim.kind in ("uniform", "loguniform"):
        return FloatDistribution(float(a[0]), float(a[1]), log=dim.kind == "loguniform")
    if dim.kind in ("int", "logint"):
        return IntDistribution(int(a[0]), int(a[1]), log=dim.kind == "logint")
    raise ValueError(f"no distribution for a {dim.kind} dimension")


@dataclass
class Verdict:
    """What the pre-check found for one sampled point.

    Attributes:
        status: ``ok``, ``over_budget``, ``empty`` (no PEFT component) or ``invalid`` (not a valid recipe).
        recipe: the recipe as a JSON-able dict (``None`` when invalid).
        trainable_params: counted on the meta device (``None`` when invalid).
        error: the one-line reason of an ``invalid`` point.
    """

    status: str
    recipe: dict[str, Any] | None = None
    trainable_params: int | None = None
    error: str | None = None


def check_point(space: SearchSpace, config: dict[str, Any], base: dict[str, Any], param_limit: int) -> Verdict:
    """Pre-check one sampled (encoded) configuration: recipe, components, meta-device count."""
    from autopeft.recipe import RecipeError, count_recipe

    try:
        recipe = space.to_recipe(config, base)
    except (RecipeError, ValueError) as exc:
        return Verdict("invalid", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    as_dict = recipe.model_dump(mode="json")
    if not recipe.components:
        return Verdict("empty", as_dict, 0)
    try:
        params = count_recipe(recipe).trainable_params
    except Exception as exc:  # noqa: BLE001 - CompositionError, limits at build time, or a method's bug:
        # recorded as invalid with its reason; the search goes on
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return Verdict("invalid", as_dict, error=f"{type(exc).__name__}: {msg}" if not isinstance(exc, ValueError) else msg)
    if params > param_limit:
        return Verdict("over_budget", as_dict, params)
    return Verdict("ok", as_dict, params)


def _ray_searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class SpaceSearcher(_ray_searcher_base()):
    """Ray Tune search algorithm over a :class:`SearchSpace`, driven by an Optuna sampler.

    Args:
        space: the search space.
        base: recipe fields the search fixes (backbone, task, training defaults).
        param_limit: the budget, trainable parameters.
        sampler: an Optuna sampler (see :func:`make_sampler`).
        top_fidelity: training examples of the top rung; only trials that reach it are told complete.
        start_points: partial points tried first (the space's known good configurations).
        on_reject: ``fn(config, verdict)`` for every rejected sample (the search records it).
        on_accept: ``fn(trial_id, config, verdict)`` when a point becomes a Ray trial.

    The module docstring explains rejection and how multi-fidelity results reach the sampler.
    """

    def __init__(self, space: SearchSpace, base: dict[str, Any], param_limit: int, sampler, top_fidelity: int,
                 start_points: list[dict[str, Any]] | None = None,
                 on_reject: Callable[[dict[str, Any], Verdict], None] | None = None,
                 on_accept: Callable[[str, dict[str, Any], Verdict], None] | None = None) -> None:
        import optuna

        super().__init__(metric="score", mode="max")
        self.space, self.base, self.param_limit, self.top = space, base, param_limit, top_fidelity
        self.distributions = {k: optuna_distribution(d) for k, d in space.tunable().items()}
        self.study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
        for point in start_points or []:
            self.study.enqueue_trial(space.complete_point(point))
        self.on_reject, self.on_accept = on_reject, on_accept
        self._live: dict[str, Any] = {}
        self._verdicts: dict[str, Verdict] = {}  # config JSON -> verdict (the count is deterministic)
        self.rejected = 0
        self.exhausted = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:  # the space is ours, not Ray's
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Ask the sampler until a point passes :func:`check_point`; ``FINISHED`` after too many rejects."""
        if trial_id in self._live:  # a resumed search re-creates a trial that was running: same point
            return dict(self._live[trial_id].params)
        for _ in range(MAX_CONSECUTIVE_REJECTS):
            trial = self.study.ask(self.distributions)
            config = dict(trial.params)
            key = json.dumps(config, sort_keys=True, default=str)
            verdict = self._verdicts.get(key) or check_point(self.space, config, self.base, self.param_limit)
            self._verdicts[key] = verdict
            _set_constraints(trial, verdict, self.param_limit)
            if verdict.status == "ok":
                self._live[trial_id] = trial
                if self.on_accept:
                    self.on_accept(trial_id, config, verdict)
                return config
            # Infeasible: told as such (constraints > 0) and asked again.
            self.study.tell(trial, [0.0, float(verdict.trainable_params or 0), 0.0], state=TrialState.COMPLETE)
            self.rejected += 1
            if self.on_reject:
                self.on_reject(config, verdict)
        self.exhausted = True
        return self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the sampler: complete only at the top fidelity; pruned below it; failed on error/NaN."""
        trial = self._live.pop(trial_id, None)
        if trial is None:
            return
        score = (result or {}).get("score")
        if error or result is None or result.get("status") == "failed" or not _finite(score):
            self.study.tell(trial, state=TrialState.FAIL)
        elif int(result.get("examples_seen", 0)) >= self.top:
            self.study.tell(trial, [float(score), float(result["trainable_params"]), float(result["peak_memory_bytes"])])
        else:
            self.study.tell(trial, state=TrialState.PRUNED)

    def get_state(self) -> dict[str, Any]:
        """What a resumed search needs (:mod:`autopeft.hpo.resume`), picklable: the Optuna study with
        its sampler (random state included, so the next proposals are the ones an uninterrupted
        search would make), which study trial each live Ray trial is, and the reject counters."""
        return {"study": self.study, "live": {tid: t._trial_id for tid, t in self._live.items()},
                "rejected": self.rejected, "exhausted": self.exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (the study replaces this searcher's own, start points included)."""
        import optuna

        self.study = state["study"]
        self._live = {tid: optuna.trial.Trial(self.study, storage_id) for tid, storage_id in state["live"].items()}
        self.rejected, self.exhausted = int(state["rejected"]), bool(state["exhausted"])

    def save(self, checkpoint_path: str) -> None:
        """Ray Tune's searcher checkpoint: :meth:`get_state` pickled to ``checkpoint_path``."""
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Load what :meth:`save` wrote (a pickle: only from a trusted search folder)."""
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def told(self) -> list[tuple[str, tuple | None]]:
        """``(state, values)`` of every sampler trial, in order (for tests and reports)."""
        return [(t.state.name, tuple(t.values) if t.values else None) for t in self.study.trials]


def _set_constraints(trial, verdict: Verdict, param_limit: int) -> None:
    """The three constraints of a sampled point, the same names for every point (> 0: violated)."""
    over = (verdict.trainable_params or 0) - param_limit
    trial.set_constraint("budget", over / param_limit if verdict.status == "over_budget" else 0.0)
    trial.set_constraint("nonempty", 1.0 if verdict.status == "empty" else 0.0)
    trial.set_constraint("valid", 1.0 if verdict.status == "invalid" else 0.0)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
