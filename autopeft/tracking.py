"""MLflow, behind one module: a parent run per search, one nested run per trial.

Default store: a SQLite file ``mlflow.db`` in the working folder; ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` override it. Everything is written from the driver process (the Ray Tune
callback in :mod:`autopeft.hpo.tune`), so trial workers never touch the store.

Per trial run: the flattened configuration as params, metrics per rung (``step`` = training
examples seen), and the tags ``status`` (finished | stopped_early | failed for trials;
over_budget | empty | invalid for rejected samples, which were never trained),
``pareto`` (true | false), ``trial_id``. On the parent: the search settings as params, the Pareto
front as a table artifact (``pareto.json``, also ``pareto.csv``) and a plot, and the best recipe.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: Trial statuses: trained to the top fidelity, stopped at a lower rung by the scheduler, failed
#: (an exception or a non-finite score), and the rejected samples that never became trials:
#: over the budget, without a PEFT component, or not a valid recipe.
STATUSES = ("finished", "stopped_early", "failed", "over_budget", "empty", "invalid")


def default_tracking_uri(workdir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<workdir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


#: MLflow's limits on a parameter (``mlflow.utils.validation``: ``MAX_ENTITY_KEY_LENGTH``,
#: ``MAX_PARAM_VAL_LENGTH``). Longer keys are an error there, longer values too unless truncation is on.
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
#: Prefix of a trial's search-space parameters (``space.<dimension>``); the search space checks that
#: every dimension's key fits :data:`MAX_PARAM_KEY_LENGTH` with it (``SearchSpace.from_dict``).
SPACE_PARAM_PREFIX = "space."
#: What MLflow accepts in a key on every platform (alphanumerics, ``_ - . space``; slashes too, but a
#: slash makes the key a path that must not normalise to another, so autopeft does not write them).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


def space_param_key(dim: str) -> str:
    """The MLflow parameter key of search-space dimension ``dim`` on a trial run."""
    return SPACE_PARAM_PREFIX + dim


def safe_param_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, value)`` pairs that MLflow accepts in one ``log_batch``: keys with characters MLflow
    forbids replaced by ``_``, keys longer than :data:`MAX_PARAM_KEY_LENGTH` cut and suffixed with a
    hash of the full key, every key distinct (a collision gets a hash suffix too), values as strings
    cut to :data:`MAX_PARAM_VALUE_LENGTH`. Keys that are already valid and short are unchanged."""
    import hashlib

    def valid(key: str) -> bool:
        return (0 < len(key) <= MAX_PARAM_KEY_LENGTH and key.strip() != "" and not key.startswith(".")
                and not _BAD_KEY_CHARS.search(key))

    out: list[tuple[str, str]] = []
    seen = {str(k) for k in params if valid(str(k))}  # valid keys keep their names; the others avoid them
    for raw, value in params.items():
        key = str(raw)
        if not valid(key):
            key = _BAD_KEY_CHARS.sub("_", key)
            if not key.strip() or key.startswith("."):
                key = "_" + key  # "", " ", "." and ".." are not keys MLflow takes
            n, base = 0, key
            while len(key) > MAX_PARAM_KEY_LENGTH or key in seen:
                suffix = "-" + hashlib.sha1(f"{raw}#{n}".encode()).hexdigest()[:8]
                key = base[:MAX_PARAM_KEY_LENGTH - len(suffix)] + suffix
                n += 1
            seen.add(key)
        out.append((key, str(value)[:MAX_PARAM_VALUE_LENGTH]))
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class SearchTracker:
    """Writes one search into MLflow.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created if missing).
        run_name: name of the parent run.
        params: search settings logged on the parent run.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.parent = self.client.create_run(self.experiment_id, run_name=run_name, tags={"autopeft.kind": "search"})
        self.parent_id = self.parent.info.run_id
        self._log_params(self.parent_id, _flat(params))
        self.trial_runs: dict[str, str] = {}

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_param_items(params)]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def start_trial(self, trial_id: str, config: dict[str, Any], recipe: dict[str, Any] | None) -> str:
        """Create the nested run of a trial; returns its run id."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags={
            "mlflow.parentRunId": self.parent_id, "trial_id": trial_id, "autopeft.kind": "trial", "status": "running"})
        self.trial_runs[trial_id] = run.info.run_id
        params = {space_param_key(k): v for k, v in config.items()}
        if recipe:
            params.update({f"recipe.{k}": v for k, v in _flat(_components_flat(recipe)).items()})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_rung(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of one rung (``step`` = training examples seen)."""
        from mlflow.entities import Metric

        import time

        run_id = self.trial_runs[trial_id]
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(run_id, metrics=ms)

    def end_trial(self, trial_id: str, status: str, error: str | None = None) -> None:
        """Close a trial's run with its status tag (one of :data:`STATUSES`)."""
        run_id = self.trial_runs[trial_id]
        self.client.set_tag(run_id, "status", status)
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")

    def finish(self, pareto_ids: set[str], artifacts_dir: Path, metrics: dict[str, float]) -> None:
        """Tag every trial ``pareto=true|false``, attach the front's files to the parent, close it."""
        for trial_id, run_id in self.trial_runs.items():
            self.client.set_tag(run_id, "pareto", "true" if trial_id in pareto_ids else "false")
        for k, v in metrics.items():
            self.client.log_metric(self.parent_id, k, float(v))
        for name in ("pareto.json", "pareto.csv", "pareto.png", "best_recipe.yaml", "trials.json"):
            f = artifacts_dir / name
            if f.exists():
                self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def fail(self, message: str) -> None:
        self.client.set_tag(self.parent_id, "error", message[:5000])
        self.client.set_terminated(self.parent_id, "FAILED")


def _components_flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """Recipe with components keyed by position and method, for flat params (``components.0.lora.r``)."""
    out = dict(recipe)
    out["components"] = {f"{i}.{c['method']}": {k: v for k, v in c.items() if k != "method"}
                         for i, c in enumerate(recipe.get("components", []))}
    return out
