"""Ray Tune, behind one module: Tuner + OptunaSearch (3 objectives) + ASHA over training examples.

* Search algorithm: ``OptunaSearch`` with objectives task score (max), trainable parameters (min)
  and peak training memory (min); a seeded multi-objective TPE sampler; known good configurations
  of the space (``start_points``) are evaluated first.
* Scheduler: ``ASHAScheduler`` (Li et al., arXiv:1810.05934) on the task score with
  ``time_attr = examples_seen``: rungs at ``min * rf^k`` training examples up to the top fidelity.
* Budget: each sampled point is counted on the meta device first; over budget, it is reported with
  ``status = over_budget`` and never trained.
* Failures: an exception in a trial is reported with ``status = failed``; the search goes on.

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

#: Objective values reported for trials that were not trained (over budget, failed), so that the
#: sampler learns to avoid them. Never shown as measurements: MLflow and the front skip them.
WORST_SCORE = -1.0
WORST_MEMORY = float(2**50)


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
    """

    num_samples: int
    time_budget_s: float | None
    cpus_per_trial: float
    gpus_per_trial: float
    ray_address: str | None
    seed: int
    storage_path: str
    device: str | None = None


def _trial_fn(config: dict[str, Any], space: SearchSpace, base: dict[str, Any], param_limit: int,
              rungs: list[int], data_dir: str | None, device: str | None) -> None:
    """The Ray Tune trainable: runs in a worker; reports one row per rung."""
    from ray import tune

    from autopeft.recipe import count_recipe
    from autopeft.trainer import run_trial

    params = None
    try:
        recipe = space.to_recipe(config, base)
        params = count_recipe(recipe).trainable_params
        if params > param_limit:
            tune.report({"status": "over_budget", "score": WORST_SCORE, "trainable_params": params,
                         "peak_memory_bytes": WORST_MEMORY, "examples_seen": 0})
            return
        dev = device or ("cuda" if _has_gpu() else "cpu")
        run_trial(recipe, data_dir, rungs, report=lambda row: tune.report({**row, "status": "running"}), device=dev)
    except Exception as exc:  # a failing trial is recorded as failed; the search goes on
        if type(exc).__name__ in ("TuneError", "StopTraining", "SystemExit", "KeyboardInterrupt"):
            raise
        tune.report({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000], "score": WORST_SCORE,
                     "trainable_params": params if params is not None else -1,
                     "peak_memory_bytes": WORST_MEMORY, "examples_seen": 0})


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_tune(space: SearchSpace, base: dict[str, Any], param_limit: int, settings: TuneSettings,
             data_dir: str | None, tracker=None, progress: Callable[[str], None] | None = None) -> dict[str, TrialRecord]:
    """Run the search; returns the driver's record of every trial, by trial id.

    Raises:
        RuntimeError: Ray could not start or reach the cluster.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    batch = int(base.get("training", {}).get("batch_size", 32))
    rungs = [int(math.ceil(r / batch) * batch) for r in space.fidelity.rungs()[:-1]] + [space.fidelity.max_train_examples]
    fid = space.fidelity
    if not ray.is_initialized():
        try:
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", configure_logging=True)
        except Exception as exc:
            raise RuntimeError(f"cannot start Ray ({'address ' + settings.ray_address if settings.ray_address else 'local'}): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    records: dict[str, TrialRecord] = {}
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            progress(f"[{time.time() - t0:6.0f}s] {msg}")

    class _Recorder(tune.Callback):
        def _record(self, trial) -> TrialRecord:
            rec = records.get(trial.trial_id)
            if rec is None:
                rec = records[trial.trial_id] = TrialRecord(trial.trial_id, space.decode(dict(trial.config)))
                try:
                    rec.recipe = space.to_recipe(dict(trial.config), base).model_dump(mode="json")
                except ValueError:
                    rec.recipe = None
                if tracker:
                    tracker.start_trial(trial.trial_id, rec.config, rec.recipe)
                say(f"trial {trial.trial_id} started: {_summary(rec.recipe)}")
            return rec

        def on_trial_start(self, iteration, trials, trial, **info):
            self._record(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec = self._record(trial)
            status = result.get("status", "running")
            rec.trainable_params = result.get("trainable_params", rec.trainable_params)
            if status in ("over_budget", "failed"):
                rec.status, rec.error = status, result.get("error")
                if tracker:
                    if rec.trainable_params and rec.trainable_params > 0:
                        tracker.log_rung(trial.trial_id, {"trainable_params": rec.trainable_params}, 0)
                say(f"trial {trial.trial_id} {status}: " + (rec.error or f"{rec.trainable_params:,} params > limit {param_limit:,}"))
                return
            row = {k: v for k, v in result.items() if k in _ROW_KEYS or k in _metric_keys(result)}
            rec.rows.append(row)
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
                    say(f"trial {trial.trial_id} stopped early by ASHA at {reached} examples")
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

    objectives = ["score", "trainable_params", "peak_memory_bytes"]
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(4, len(space.start_points) + 2),
                                         multivariate=True)
    searcher = OptunaSearch(metric=objectives, mode=["max", "min", "min"],
                            points_to_evaluate=[space.complete_point(p) for p in space.start_points] or None,
                            sampler=sampler)
    scheduler = ASHAScheduler(time_attr="examples_seen", metric="score", mode="max", max_t=fid.max_train_examples,
                              grace_period=rungs[0], reduction_factor=fid.reduction_factor)
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, space=space, base=base, param_limit=param_limit, rungs=rungs,
                             data_dir=data_dir, device=settings.device), resources)
    tuner = tune.Tuner(
        trainable,
        param_space=space.ray_param_space(),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=settings.num_samples,
                                    time_budget_s=settings.time_budget_s),
        run_config=tune.RunConfig(name="ray", storage_path=settings.storage_path, verbose=0,
                                  callbacks=[_Recorder()], failure_config=tune.FailureConfig(max_failures=0)),
    )
    say(f"Ray Tune: {settings.num_samples} trials, rungs {rungs} examples, "
        f"{settings.cpus_per_trial:g} CPU / {settings.gpus_per_trial:g} GPU per trial")
    tuner.fit()
    for rec in records.values():  # trials cut by the time budget
        if rec.status == "running":
            rec.status = "stopped_early"
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
