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

**Duplicates.** A point that passes the check but whose recipe (``space.to_recipe``'s dict: it drops
disabled components, so dimensions that do not reach the recipe do not matter; the training seed is
part of it) equals that of a trial already trained or running is a *duplicate*: it is answered from
that trial instead of being trained again. The sampler is told the original's result (its
top-fidelity values if it finished, ``PRUNED`` if it was stopped, ``FAIL`` if it failed; while the
original still runs, the duplicate waits and is told when the original completes), ``on_duplicate``
records it (status ``duplicate``, ``duplicate_of`` the original's trial id), and, like a rejected
point, it never starts a Ray trial or takes a trial slot.

**Constraints** are told the same way for every sampled point: ``budget`` (how far over the
parameter limit, relative), ``nonempty`` and ``valid`` (1.0 when violated); every point that passes
the check, trained or duplicate, gets 0.0 for all three when it is sampled (BoTorch's qNEHVI needs
the same constraint names on every complete trial; TPE and NSGA-II read them as feasibility).

**Stopping.** The searcher ends the search (Ray's ``FINISHED``) when the space is exhausted: when
every point of a finite space (only categorical and integer dimensions) has been sampled, every
configuration in it has been trained, rejected or answered as a duplicate; and in any space after
:data:`MAX_CONSECUTIVE_REJECTS` samples in a row that were rejected or duplicates.

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
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autopeft.searching.space import Dim, SearchSpace
from autopeft.errors import AutopeftError, first_line
from autopeft._util import is_finite

#: Consecutive samples that were rejected or duplicates after which the searcher gives up (the
#: space is nearly all infeasible, or every configuration the sampler still proposes was tried).
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


class SearcherError(AutopeftError, ValueError):
    """Unknown searcher name, or a searcher whose library is not installed."""


def make_sampler(name: str, seed: int, n_startup_trials: int = 6):
    """The seeded Optuna sampler of searcher ``name`` (see the module docstring).

    Every sampler returned pickles (``nsga2`` is a :class:`PicklableNSGAIISampler`).

    Raises:
        SearcherError: unknown name, or ``qnehvi`` without BoTorch / optuna-integration.
    """
    if name not in SAMPLERS:
        raise SearcherError(f"unknown searcher {name!r}; valid: {', '.join(SEARCHERS)}")
    return SAMPLERS[name](seed, n_startup_trials)


def _qnehvi(seed: int, n_startup_trials: int):
    """qNEHVI through BoTorch (the AutoPEFT paper's multi-objective Bayesian optimisation)."""
    try:
        from optuna_integration import BoTorchSampler
        import optuna_integration.botorch  # noqa: F401 - qNEHVI's candidates (looked up per call): fail here if absent
    except ImportError:
        raise SearcherError("searcher 'qnehvi' needs BoTorch: pip install 'autopeft[botorch]' "
                            "(botorch and optuna-integration)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return BoTorchSampler(candidates_func=_quiet_qnehvi_candidates, n_startup_trials=n_startup_trials, seed=seed)


def _quiet_qnehvi_candidates(*args, **kwargs):
    """``optuna_integration.botorch.qnehvi_candidates_func`` (same arguments and result), without the
    ExperimentalWarning Optuna prints on every call: a notice that the integration's interface may
    change, meant for whoever writes against it, not for a user running a search. Module-level, so a
    sampler holding it pickles."""
    from optuna_integration import botorch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return botorch.qnehvi_candidates_func(*args, **kwargs)


#: The searchers: ``--searcher`` name -> ``factory(seed, n_startup_trials)`` of its seeded, picklable
#: Optuna sampler. A new searcher is one entry here (and its factory).
SAMPLERS: dict[str, Callable[[int, int], Any]] = {
    "tpe": lambda seed, n: optuna.samplers.TPESampler(seed=seed, n_startup_trials=n, multivariate=True),
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed, n: PicklableNSGAIISampler(seed=seed, population_size=max(4, n)),
    "qnehvi": _qnehvi,
}
#: Searcher names accepted by ``--searcher``.
SEARCHERS = tuple(SAMPLERS)


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
        status: ``ok``, ``over_budget``, ``empty`` (no PEFT component), ``invalid`` (not a valid
            recipe) or, set by :class:`SpaceSearcher`, ``duplicate`` (the recipe of a trial already
            trained or running).
        recipe: the recipe as a JSON-able dict (``None`` when invalid).
        trainable_params: counted on the meta device (``None`` when invalid).
        error: the one-line reason of an ``invalid`` point.
        duplicate_of: the trial id whose recipe a ``duplicate`` point repeats.
    """

    status: str
    recipe: dict[str, Any] | None = None
    trainable_params: int | None = None
    error: str | None = None
    duplicate_of: str | None = None


def check_point(space: SearchSpace, config: dict[str, Any], base: dict[str, Any], param_limit: int) -> Verdict:
    """Pre-check one sampled (encoded) configuration: recipe, components, meta-device count."""
    from autopeft.composition.recipe import RecipeError, count_recipe

    try:
        recipe = space.to_recipe(config, base)
    except (RecipeError, ValueError) as exc:
        return Verdict("invalid", error=first_line(exc))
    as_dict = recipe.model_dump(mode="json")
    if not recipe.components:
        return Verdict("empty", as_dict, 0)
    try:
        params = count_recipe(recipe).trainable_params
    except Exception as exc:  # noqa: BLE001 - CompositionError, limits at build time, or a method's bug:
        # recorded as invalid with its reason; the search goes on
        return Verdict("invalid", as_dict, error=first_line(exc, with_type=not isinstance(exc, ValueError)))
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
        on_duplicate: ``fn(config, verdict)`` for every duplicate sample (``verdict.status ==
            "duplicate"``, ``verdict.duplicate_of`` the original's trial id).

    Attributes:
        rejected / duplicates: samples rejected / answered as duplicates so far (all sessions).
        exhausted: the searcher ended the search; ``stop_reason`` says why (one line).

    The module docstring explains rejection, duplicates, stopping, and how multi-fidelity results
    reach the sampler.
    """

    def __init__(self, space: SearchSpace, base: dict[str, Any], param_limit: int, sampler, top_fidelity: int,
                 start_points: list[dict[str, Any]] | None = None,
                 on_reject: Callable[[dict[str, Any], Verdict], None] | None = None,
                 on_accept: Callable[[str, dict[str, Any], Verdict], None] | None = None,
                 on_duplicate: Callable[[dict[str, Any], Verdict], None] | None = None) -> None:
        super().__init__(metric="score", mode="max")
        self.space, self.base, self.param_limit, self.top = space, base, param_limit, top_fidelity
        self.distributions = {k: optuna_distribution(d) for k, d in space.tunable().items()}
        self.points = _count_points(self.distributions)
        self.study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
        for point in start_points or []:
            self.study.enqueue_trial(space.complete_point(point))
        self.on_reject, self.on_accept, self.on_duplicate = on_reject, on_accept, on_duplicate
        self._live: dict[str, Any] = {}  # Ray trial id -> its Optuna trial, while it runs
        self._verdicts: dict[str, Verdict] = {}  # config JSON -> verdict (the count is deterministic)
        self._seen: set[str] = set()  # config JSON of every point sampled
        self._origins: dict[str, tuple[str, int]] = {}  # recipe JSON -> (Ray trial id, Optuna trial number)
        self._waiting: dict[str, list[int]] = {}  # Ray trial id -> Optuna numbers of duplicates still untold
        self.rejected = self.duplicates = 0
        self.exhausted = False
        self.stop_reason: str | None = None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:  # the space is ours, not Ray's
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Ask the sampler until a point passes :func:`check_point` and is no duplicate; returns its
        (encoded) config, or ``FINISHED`` once the space is exhausted (module docstring, Stopping)."""
        if trial_id in self._live:  # a resumed search re-creates a trial that was running: same point
            return dict(self._live[trial_id].params)
        if self.exhausted:
            return self.FINISHED
        for _ in range(MAX_CONSECUTIVE_REJECTS):
            if self.points is not None and len(self._seen) >= self.points:
                return self._stop(f"all {self.points} points of the space were sampled (every configuration "
                                  f"was trained, rejected or a duplicate)")
            trial = self.study.ask(self.distributions)
            config = dict(trial.params)
            key = _key(config)
            self._seen.add(key)
            verdict = self._verdicts.get(key) or check_point(self.space, config, self.base, self.param_limit)
            self._verdicts[key] = verdict
            _set_constraints(trial, verdict, self.param_limit)
            if verdict.status != "ok":  # infeasible: told as such (constraints > 0), asked again
                self.study.tell(trial, [0.0, float(verdict.trainable_params or 0), 0.0], state=TrialState.COMPLETE)
                self.rejected += 1
                if self.on_reject:
                    self.on_reject(config, verdict)
                continue
            recipe_key = _key(verdict.recipe)
            origin = self._origins.get(recipe_key)
            if origin is None:
                self._origins[recipe_key] = (trial_id, trial.number)
                self._live[trial_id] = trial
                if self.on_accept:
                    self.on_accept(trial_id, config, verdict)
                return config
            self._answer_duplicate(trial.number, *origin)
            self.duplicates += 1
            if self.on_duplicate:
                self.on_duplicate(config, Verdict("duplicate", verdict.recipe, verdict.trainable_params,
                                                  duplicate_of=origin[0]))
        return self._stop(f"{MAX_CONSECUTIVE_REJECTS} samples in a row were over budget, empty, invalid or duplicates")

    def _stop(self, reason: str) -> str:
        self.exhausted, self.stop_reason = True, reason
        return self.FINISHED

    def _answer_duplicate(self, number: int, original: str, original_number: int) -> None:
        """Tell Optuna trial ``number`` what its original's trial was told, or let it wait for it."""
        frozen = self.study.get_trials(deepcopy=False)[original_number]
        if frozen.state == TrialState.RUNNING:
            self._waiting.setdefault(original, []).append(number)
        else:
            self._tell(number, frozen.state, frozen.values)

    def _tell(self, trial, state, values=None) -> None:
        if state == TrialState.COMPLETE:
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, state=state)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the sampler: complete only at the top fidelity; pruned below it; failed on error/NaN.
        The duplicates that waited for this trial are told the same."""
        trial = self._live.pop(trial_id, None)
        if trial is None:
            return
        score = (result or {}).get("score")
        if error or result is None or result.get("status") == "failed" or not is_finite(score):
            state, values = TrialState.FAIL, None
        elif int(result.get("examples_seen", 0)) >= self.top:
            state = TrialState.COMPLETE
            values = [float(score), float(result["trainable_params"]), float(result["peak_memory_bytes"])]
        else:
            state, values = TrialState.PRUNED, None
        self._tell(trial, state, values)
        for number in self._waiting.pop(trial_id, []):
            self._tell(number, state, values)

    def get_state(self) -> dict[str, Any]:
        """What a resumed search needs (:mod:`autopeft.searching.resume`), picklable: the Optuna study with
        its sampler (random state included, so the next proposals are the ones an uninterrupted
        search would make), which study trial each live Ray trial is, which trial holds each recipe
        trained or running and the duplicates waiting for one, and the counters."""
        return {"study": self.study, "live": {tid: t._trial_id for tid, t in self._live.items()},
                "rejected": self.rejected, "exhausted": self.exhausted,
                "origins": {k: list(v) for k, v in self._origins.items()},
                "waiting": {k: list(v) for k, v in self._waiting.items()},
                "duplicates": self.duplicates, "stop_reason": self.stop_reason}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (the study replaces this searcher's own, start points included;
        a state without duplicate bookkeeping, from before it existed, starts with none)."""
        self.study = state["study"]
        self._live = {tid: optuna.trial.Trial(self.study, storage_id) for tid, storage_id in state["live"].items()}
        self.rejected, self.exhausted = int(state["rejected"]), bool(state["exhausted"])
        self._origins = {_current_recipe_key(k): (str(v[0]), int(v[1])) for k, v in state.get("origins", {}).items()}
        self._waiting = {k: [int(n) for n in v] for k, v in state.get("waiting", {}).items()}
        self.duplicates = int(state.get("duplicates", 0))
        self.stop_reason = state.get("stop_reason")
        self._seen = {_key(t.params) for t in self.study.get_trials(deepcopy=False)
                      if t.state != TrialState.WAITING}  # enqueued start points not yet asked
        self._verdicts = {}

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


def _key(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _current_recipe_key(key: str) -> str:
    """A saved recipe key as this version's :class:`~autopeft.composition.recipe.Recipe` writes it (the
    defaults of fields added since filled in), so a search saved by an earlier version and resumed by this
    one still finds the recipes it trained and never trains one again; a key that does not validate is
    kept as it is."""
    from autopeft.composition.recipe import Recipe

    try:
        return _key(Recipe.model_validate(json.loads(key)).model_dump(mode="json"))
    except Exception:  # noqa: BLE001 - only ever a lookup key: at worst the recipe is trained again
        return key


def _set_constraints(trial, verdict: Verdict, param_limit: int) -> None:
    """The three constraints of a sampled point, the same names for every point (> 0: violated)."""
    over = (verdict.trainable_params or 0) - param_limit
    trial.set_constraint("budget", over / param_limit if verdict.status == "over_budget" else 0.0)
    trial.set_constraint("nonempty", 1.0 if verdict.status == "empty" else 0.0)
    trial.set_constraint("valid", 1.0 if verdict.status == "invalid" else 0.0)


def _count_points(distributions: dict[str, Any]) -> int | None:
    """How many distinct points the distributions hold; ``None`` when one of them is continuous."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    n = 1
    for d in distributions.values():
        if isinstance(d, CategoricalDistribution):
            n *= len({_key({"v": c}) for c in d.choices})
        elif isinstance(d, IntDistribution):  # step 1 when log
            n *= (d.high - d.low) // d.step + 1
        else:
            return None
    return n
