"""Ray Tune, behind one module: Tuner + :class:`SpaceSearcher` (Optuna, 3 objectives) + MO-ASHA.

* Search algorithm: :class:`autopeft.hpo.searchers.SpaceSearcher` over the space's dimensions with
  the searcher chosen by name (``tpe`` default, ``random``, ``nsga2``, ``qnehvi``); known good
  configurations of the space (``start_points``) are tried first. Every sampled point is counted
  on the meta device before Ray sees it: over budget, empty (no PEFT component) or invalid points
  are told to the sampler as infeasible, recorded (``over_budget`` / ``empty`` / ``invalid``) and
  never start a Ray trial or take a trial slot.
* Scheduler: :class:`autopeft.hpo.scheduler.MultiObjectiveASHA` (Schmucker et al.,
  arXiv:2106.12639) over training examples seen; its milestones are exactly the rungs the trials
  report at (:meth:`Fidelity.search_rungs`).
* The sampler only learns top-fidelity results as final; trials stopped at a lower rung are told
  as pruned (see :mod:`autopeft.hpo.searchers`).
* Failures: an exception in a trial, or a non-finite score, is recorded ``failed``; the search goes on.
* Ray: without ``ray_address`` the search always starts its own local Ray instance
  (``address="local"``), whatever cluster another Ray user left on the machine.

Every trial's record (config, recipe, status, per-rung rows) is collected on the driver by a
:class:`ray.tune.Callback`, which also writes MLflow through :class:`autopeft.tracking.SearchTracker`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autopeft.hpo.space import SearchSpace

@dataclass
class TrialRecord:
    """Everything the driver knows about one trial."""

    trial_id: str
    config: dict[str, Any]
    recipe: dict[str, Any] | None = None
    status: str = "running"
    error: str | None = None
    trainable_params: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def row_at(self, examples: int) -> dict[str, Any] | None:
        """The measurement at fidelity ``examples`` (training examples seen), if reached."""
        return next((r for r in self.rows if r.get("examples_seen") == examples), None)

    def as_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "status": self.status, "error": self.error, "config": self.config,
                "recipe": self.recipe, "trainable_params": self.trainable_params, "rows": self.rows}


@dataclass
class TuneSettings:
    """How to run the trials.

    Attributes:
        num_samples: trials to sample (including start points).
        time_budget_s: wall-clock cap of the whole search, seconds (``None``: none).
        cpus_per_trial / gpus_per_trial: Ray resources of one trial.
        ray_address: an existing cluster (``auto`` or ``ray://host:port``); ``None`` starts a local one.
        seed: seeds the sampler.
        storage_path: where Ray keeps its experiment folder (absolute).
        device: forced trial device (``cpu``/``cuda``), default: CUDA if the trial got a GPU.
        searcher: sampler name (:data:`autopeft.hpo.searchers.SEARCHERS`).
        start_points: partial points tried first (default: the space's own).
    """

    num_samples: int
    time_budget_s: float | None
    cpus_per_trial: float
    gpus_per_trial: float
    ray_address: str | None
    seed: int
    storage_path: str
    device: str | None = None
    searcher: str = "tpe"
    start_points: list[dict[str, Any]] | None = None


class NonFiniteScore(FloatingPointError):
    """A rung's score is NaN or infinite (e.g. STS-B's Pearson of constant predictions): the trial fails."""


def _trial_fn(config: dict[str, Any], space: SearchSpace, base: dict[str, Any], rungs: list[int],
              data_dir: str | None, device: str | None) -> None:
    """The Ray Tune trainable: runs in a worker; reports one row per rung (``rungs``, examples seen)."""
    from ray import tune

    from autopeft.trainer import run_trial

    def report(row: dict[str, Any]) -> None:
        score = row.get("score")
        if not (isinstance(score, (int, float)) and math.isfinite(score)):
            raise NonFiniteScore(f"validation score is {score} at {row.get('examples_seen')} examples "
                                 "(constant predictions?)")
        tune.report({**row, "status": "running"})

    try:
        recipe = space.to_recipe(config, base)
        dev = device or ("cuda" if _has_gpu() else "cpu")
        run_trial(recipe, data_dir, rungs, report=report, device=dev)
    except Exception as exc:  # a failing trial is recorded as failed; the search goes on
        if type(exc).__name__ in ("TuneError", "StopTraining", "SystemExit", "KeyboardInterrupt"):
            raise
        tune.report({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000], "score": float("nan"),
                     "trainable_params": -1, "peak_memory_bytes": float("nan"), "examples_seen": 0})


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def start_ray(ray_address: str | None) -> None:
    """Connect to ``ray_address``, or start a private local Ray instance (never joining a cluster
    that another program started on this machine).

    Raises:
        RuntimeError: Ray could not start or reach the cluster (one line).
    """
    import ray

    if ray.is_initialized():
        return
    try:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR", configure_logging=True)
    except Exception as exc:
        raise RuntimeError(f"cannot start Ray ({'address ' + ray_address if ray_address else 'local'}): "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def run_tune(space: SearchSpace, base: dict[str, Any], param_limit: int, settings: TuneSettings,
             data_dir: str | None, tracker=None, progress: Callable[[str], None] | None = None) -> dict[str, TrialRecord]:
    """Run the search; returns the driver's record of every trial and every rejected sample, by id.

    Raises:
        RuntimeError: Ray could not start or reach the cluster.
        SearcherError: unknown searcher, or its library is missing.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from autopeft.hpo.scheduler import MultiObjectiveASHA
    from autopeft.hpo.searchers import SpaceSearcher, make_sampler

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fid = space.fidelity
    rungs = fid.search_rungs(int(base.get("training", {}).get("batch_size", 32)))
    start_points = space.start_points if settings.start_points is None else settings.start_points
    sampler = make_sampler(settings.searcher, settings.seed, n_startup_trials=max(4, len(start_points) + 2))
    start_ray(settings.ray_address)

    records: dict[str, TrialRecord] = {}
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            progress(f"[{time.time() - t0:6.0f}s] {msg}")

    def on_reject(config: dict[str, Any], verdict) -> None:
        rid = f"rejected_{sum(1 for r in records.values() if r.trial_id.startswith('rejected_')) + 1:04d}"
        rec = records[rid] = TrialRecord(rid, space.decode(config), verdict.recipe, verdict.status, verdict.error,
                                         verdict.trainable_params)
        if tracker:
            tracker.start_trial(rid, rec.config, rec.recipe)
            if rec.trainable_params:
                tracker.log_rung(rid, {"trainable_params": rec.trainable_params}, 0)
            tracker.end_trial(rid, rec.status, rec.error)
        why = rec.error or (f"{rec.trainable_params:,} params > limit {param_limit:,}" if rec.status == "over_budget"
                            else "no PEFT component")
        say(f"sample {rid} rejected ({rec.status}): {_summary(rec.recipe)}: {why}")
        _save_progress()

    def on_accept(trial_id: str, config: dict[str, Any], verdict) -> None:
        records[trial_id] = TrialRecord(trial_id, space.decode(config), verdict.recipe, "running", None,
                                        verdict.trainable_params)

    class _Recorder(tune.Callback):
        def _record(self, trial) -> TrialRecord:
            rec = records.get(trial.trial_id)
            if rec is None:  # not seen by on_accept (should not happen): rebuild from the config
                rec = records[trial.trial_id] = TrialRecord(trial.trial_id, space.decode(dict(trial.config)))
            return rec

        def on_trial_start(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            if tracker:
                tracker.start_trial(trial.trial_id, rec.config, rec.recipe)
            say(f"trial {trial.trial_id} started: {_summary(rec.recipe)} ({rec.trainable_params:,} params)"
                if rec.trainable_params is not None else f"trial {trial.trial_id} started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec = self._record(trial)
            if result.get("status") == "failed":
                rec.status, rec.error = "failed", result.get("error")
                say(f"trial {trial.trial_id} failed: {rec.error}")
                return
            row = {k: v for k, v in result.items() if k in _ROW_KEYS or k in _metric_keys(result)}
            rec.rows.append(row)
            rec.trainable_params = row.get("trainable_params", rec.trainable_params)
            if tracker:
                tracker.log_rung(trial.trial_id, row, int(row["examples_seen"]))
            say(f"trial {trial.trial_id} rung {row['examples_seen']:>6} examples: score={row['score']:.4f} "
                f"params={row['trainable_params']:,} mem={row['peak_memory_bytes'] / 2**20:.0f}MiB")

        def on_trial_complete(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            if rec.status == "running":
                reached = max((r["examples_seen"] for r in rec.rows), default=0)
                rec.status = "finished" if reached >= fid.max_train_examples else "stopped_early"
                if rec.rows and rec.status == "stopped_early":
                    say(f"trial {trial.trial_id} stopped early by MO-ASHA at {reached} examples")
            if tracker:
                tracker.end_trial(trial.trial_id, rec.status, rec.error)
            _save_progress()

        def on_trial_error(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            rec.status = "failed"
            rec.error = rec.error or str(getattr(trial, "error_file", "") or "worker crashed")
            say(f"trial {trial.trial_id} failed: {rec.error}")
            if tracker:
                tracker.end_trial(trial.trial_id, "failed", rec.error)
            _save_progress()

    def _save_progress() -> None:
        """Keep ``trials.json`` current, so an interrupted search loses no finished trial."""
        path = Path(settings.storage_path) / "trials.json"
        path.write_text(json.dumps([r.as_dict() for r in records.values()], indent=2, default=str))

    searcher = SpaceSearcher(space, base, param_limit, sampler, fid.max_train_examples, start_points,
                             on_reject=on_reject, on_accept=on_accept)
    total = ray.cluster_resources()
    per_trial = settings.gpus_per_trial if settings.gpus_per_trial else settings.cpus_per_trial
    available = total.get("GPU", 0) if settings.gpus_per_trial else total.get("CPU", 1)
    concurrent = max(1, int(available // max(per_trial, 1e-9)))
    scheduler = MultiObjectiveASHA(rungs, reduction_factor=fid.reduction_factor)
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, space=space, base=base, rungs=rungs, data_dir=data_dir,
                             device=settings.device), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                                    scheduler=scheduler, num_samples=settings.num_samples,
                                    time_budget_s=settings.time_budget_s),
        run_config=tune.RunConfig(name="ray", storage_path=settings.storage_path, verbose=0,
                                  callbacks=[_Recorder()], failure_config=tune.FailureConfig(max_failures=0)),
    )
    say(f"Ray Tune: {settings.num_samples} trials, searcher {settings.searcher} (seed {settings.seed}), "
        f"MO-ASHA rungs {rungs} examples, {settings.cpus_per_trial:g} CPU / {settings.gpus_per_trial:g} GPU per trial, "
        f"{concurrent} at a time")
    tuner.fit()
    for rec in records.values():  # trials cut by the time budget
        if rec.status == "running":
            rec.status = "stopped_early"
    if searcher.exhausted:
        say(f"the searcher stopped: {searcher.rejected} samples in a row were over budget, empty or invalid")
    _save_progress()
    return records


_ROW_KEYS = {"score", "trainable_params", "head_params", "backbone_params", "trainable_percent", "peak_memory_bytes",
             "examples_seen", "steps", "train_time_s", "wall_time_s"}


def _metric_keys(result: dict) -> set[str]:
    from autopeft.tasks import TASKS

    names = {m for t in TASKS.values() for m in t.metrics}
    return {k for k in result if k in names}


def _summary(recipe: dict | None) -> str:
    if not recipe:
        return "invalid configuration"
    parts = []
    for c in recipe.get("components", []):
        keys = [k for k in ("r", "target_modules", "placement", "reduction_factor", "bottleneck_size", "num_virtual_tokens")
                if k in c and c[k] is not None]
        parts.append(c["method"] + "(" + ", ".join(f"{k}={c[k]}" for k in keys) + ")")
    lr = recipe.get("training", {}).get("learning_rate")
    gate = " gated" if recipe.get("gating") else ""
    return (" + ".join(parts) or "head only") + gate + (f" lr={lr:.2g}" if lr else "")
