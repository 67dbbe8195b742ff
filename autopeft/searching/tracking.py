"""MLflow, behind one module: a parent run per search, one nested run per trial.

Default store: a SQLite file ``mlflow.db`` in the working folder; ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` override it. Everything is written from the driver process (the Ray Tune
callback in :mod:`autopeft.searching.tune`), so trial workers never touch the store.

A value longer than MLflow takes (a parameter over :data:`MAX_PARAM_VALUE_LENGTH` characters, e.g. a
long search-space path or target list; a tag over :data:`MAX_TAG_VALUE_LENGTH`, e.g. an error) is
never cut silently: MLflow gets its start and a visible marker (:func:`cut_value`), and the whole
value is an artifact of the run, ``long_values/params/<key>.txt`` or ``long_values/tags/<key>.txt``.

Per trial run: the flattened configuration as params, metrics per rung (``step`` = training
examples seen), and the tags ``status`` (finished | stopped_early | failed for trials;
over_budget | empty | invalid for rejected samples, and duplicate for samples whose recipe a trial
already had, tagged ``duplicate_of`` with its id: neither was trained),
``pareto`` (true | false), ``trial_id``; a trial interrupted by Ctrl-C / SIGTERM is tagged
``status=interrupted`` and ended ``KILLED``, and so is the parent run of an interrupted search.
On the parent: the search settings as params, the Pareto front as a table artifact (``pareto.json``,
also ``pareto.csv``) and a plot, and the best recipe.

In MLflow's UI (3.x) the experiment is tagged as model training (:data:`EXPERIMENT_KIND`), and two
shared runs views carry the search's columns (score, trainable parameters, status, pareto, ...):
the experiment's (:data:`RUNS_VIEW_KEY`) and one per search listing its trials with their
``space.*`` parameters; :func:`runs_view_url` gives their addresses (``autopeft ui`` prints them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from autopeft._util import is_finite
from autopeft.errors import AutopeftError

#: Trial statuses: trained to the top fidelity, stopped at a lower rung by the scheduler, failed
#: (an exception or a non-finite score), interrupted (Ctrl-C / SIGTERM stopped the search while it
#: ran: ``autopeft resume`` runs it again; its MLflow run ends ``KILLED``), and the samples that never
#: became trials: rejected (over the budget, without a PEFT component, or not a valid recipe) or a
#: duplicate (the recipe of a trial already trained or running, answered from it).
STATUSES = ("finished", "stopped_early", "failed", "interrupted", "over_budget", "empty", "invalid", "duplicate")


class TrackingStoreError(AutopeftError):
    """The MLflow tracking store (``--tracking-uri``) or experiment cannot be opened: an unsupported
    URI scheme, an unreachable server, an experiment name held by a deleted experiment."""


#: MLflow 3's experiment-kind tag and the kind that makes its UI treat the experiment as model training
#: (runs, metrics, parameters) instead of GenAI (traces, token usage). Values from MLflow's UI source,
#: ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` (mlflow/server/js, ``experimentKind`` utils).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow's shared runs-view state: an experiment tag ``mlflow.sharedViewState.<key>`` holding JSON
#: (``selectedColumns`` and search facets such as ``searchFilter``), opened by the runs page URL
#: ``#/experiments/<id>/runs?viewStateShareKey=<key>``. Without it the runs table shows only
#: name, created, dataset, duration, source and models: none of a search's numbers.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: The experiment-wide view (every search and its trials) and the prefix of one search's trials view.
RUNS_VIEW_KEY = "autopeft"
TRIALS_VIEW_PREFIX = "autopeft-trials-"
#: Columns of both views, as MLflow names them (``<metrics|params|tags>.`<key>```).
VIEW_COLUMNS = ("metrics.`score`", "metrics.`trainable_params`", "metrics.`trainable_percent`",
                "metrics.`peak_memory_bytes`", "metrics.`examples_seen`", "tags.`status`", "tags.`pareto`",
                "metrics.`best_score`", "metrics.`hypervolume`")


def runs_view_state(params: list[str] = (), search_filter: str | None = None,
                    group_by_tag: str | None = None, expanded: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON of a shared runs view: :data:`VIEW_COLUMNS`, then ``params.`<p>``` for each of
    ``params``, the runs filter ``search_filter`` (MLflow search syntax) if given, and rows grouped
    by the value of tag ``group_by_tag``, the groups of the values ``expanded`` open. Grouping
    lists runs flat in their groups: without it MLflow shows nested runs folded under their parent,
    and a shared view cannot unfold them (MLflow leaves ``runsExpanded`` out of shared views)."""
    state: dict[str, Any] = {"selectedColumns": [*VIEW_COLUMNS, *(f"params.`{p}`" for p in params)]}
    if search_filter:
        state["searchFilter"] = search_filter
    if group_by_tag:
        state["groupBy"] = {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}]}
        state["groupsExpanded"] = {f"tag.{group_by_tag}.{v}": True for v in expanded}
    return state


def runs_view_url(base_url: str, experiment_id: str, view_key: str = RUNS_VIEW_KEY) -> str:
    """The MLflow UI address of a shared runs view, in the model-training workflow
    (``workflowType=machine_learning``: MLflow 3.17 otherwise opens the GenAI overview)."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?"
            f"workflowType=machine_learning&viewStateShareKey={view_key}")


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
#: MLflow's limit on a run tag's value (``mlflow.utils.validation.MAX_TAG_VAL_LENGTH``).
MAX_TAG_VALUE_LENGTH = 8000
#: The run's artifact folder that keeps whole the values MLflow could only take cut.
LONG_VALUES_DIR = "long_values"
#: Prefix of a trial's search-space parameters (``space.<dimension>``); the search space checks that
#: every dimension's key fits :data:`MAX_PARAM_KEY_LENGTH` with it (``SearchSpace.from_dict``).
SPACE_PARAM_PREFIX = "space."
#: What MLflow accepts in a key on every platform (alphanumerics, ``_ - . space``; slashes too, but a
#: slash makes the key a path that must not normalise to another, so autopeft does not write them).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


def space_param_key(dim: str) -> str:
    """The MLflow parameter key of search-space dimension ``dim`` on a trial run."""
    return SPACE_PARAM_PREFIX + dim


def long_value_artifact(kind: str, key: str) -> str:
    """The artifact path that keeps the whole value of parameter (``kind="params"``) or tag
    (``kind="tags"``) ``key`` when MLflow could only take it cut."""
    return f"{LONG_VALUES_DIR}/{kind}/{_BAD_KEY_CHARS.sub('_', key)}.txt"


def cut_value(value: str, limit: int, artifact: str | None = None) -> str:
    """``value`` when it fits ``limit`` characters; else its start followed by a visible marker,
    `` …[cut: <n> characters in all; whole value: artifact <artifact>]``, ``limit`` characters in all
    (a limit too small for the marker: the start of the value and ``…``)."""
    if len(value) <= limit:
        return value
    marker = f" …[cut: {len(value):,} characters in all" + (f"; whole value: artifact {artifact}]" if artifact else "]")
    if len(marker) >= limit:
        return value[:max(0, limit - 1)] + "…"[:limit]
    return value[:limit - len(marker)] + marker


def safe_param_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, value)`` pairs that MLflow accepts in one ``log_batch``: keys with characters MLflow
    forbids replaced by ``_``, keys longer than :data:`MAX_PARAM_KEY_LENGTH` cut and suffixed with a
    hash of the full key, every key distinct (a collision gets a hash suffix too), values as strings;
    a value over :data:`MAX_PARAM_VALUE_LENGTH` is cut with a visible marker naming the artifact
    (:func:`long_value_artifact`) where :class:`SearchTracker` keeps it whole. Keys that are already
    valid and short are unchanged, in the order of ``params``."""
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
        out.append((key, cut_value(str(value), MAX_PARAM_VALUE_LENGTH, long_value_artifact("params", key))))
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


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (``<db folder>/mlartifacts``),
    not in MLflow's default ``./mlruns`` of whatever folder the search was started from; ``None``
    (MLflow's default) for other stores."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
    return None


class SearchTracker:
    """Writes one search into MLflow.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created if missing).
        run_name: name of the parent run.
        params: search settings logged on the parent run.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 parent_run_id: str | None = None) -> None:
        """``parent_run_id``: resume that search's parent run (:meth:`_reopen_parent`) instead of
        creating one; its nested runs are reconciled by :func:`autopeft.searching.resume.reconcile_mlflow`.

        Raises:
            TrackingStoreError: the store or the experiment cannot be opened (nothing was written).
        """
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri
        try:
            mlflow.set_tracking_uri(tracking_uri)
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=artifact_location(tracking_uri))
        except Exception as exc:  # MLflow's own message, first sentence, on one line
            first = " ".join(str(exc).split()).split(". ")[0]
            raise TrackingStoreError(f"cannot open MLflow experiment {experiment!r} at tracking URI "
                                     f"{tracking_uri!r}: {type(exc).__name__}: {first}") from None
        self._mark_experiment(exp)
        if parent_run_id:
            self._reopen_parent(parent_run_id)
        else:
            self.parent = self.client.create_run(self.experiment_id, run_name=run_name, tags={"autopeft.kind": "search"})
            self.parent_id = self.parent.info.run_id
            self._log_params(self.parent_id, _flat(params))
        self.trial_runs: dict[str, str] = {}
        self._trial_param_keys: list[str] = []  # space.<dim> columns of the trials view
        self._write_trials_view()

    @property
    def trials_view_key(self) -> str:
        """The shared-view key of this search's trials (:func:`runs_view_url`)."""
        return TRIALS_VIEW_PREFIX + self.parent_id

    def _mark_experiment(self, exp) -> None:
        """Open the experiment in MLflow's UI as model training, on views with the search's columns
        (:data:`VIEW_COLUMNS`); a kind the user set on the experiment is kept."""
        tags = dict(exp.tags) if exp else {}
        if EXPERIMENT_KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self._write_view(RUNS_VIEW_KEY, runs_view_state())

    def _write_view(self, key: str, state: dict[str, Any]) -> None:
        import json

        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG_PREFIX + key, json.dumps(state))

    def _write_trials_view(self) -> None:
        self._write_view(self.trials_view_key, runs_view_state(
            self._trial_param_keys, f"tags.`mlflow.parentRunId` = '{self.parent_id}'", "autopeft.kind", ("trial",)))

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log ``params`` (:func:`safe_param_items`); each value MLflow takes cut is kept whole as an
        artifact of the run."""
        from mlflow.entities import Param

        pairs = safe_param_items(params)
        items = [Param(k, v) for k, v in pairs]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        for (key, shown), value in zip(pairs, params.values()):
            if shown != str(value):
                self.client.log_text(run_id, str(value), long_value_artifact("params", key))

    def _set_tag(self, run_id: str, key: str, value: Any) -> None:
        """Set a run tag; a value over :data:`MAX_TAG_VALUE_LENGTH` is cut with a visible marker and
        kept whole as an artifact of the run (:func:`long_value_artifact`)."""
        text = str(value)
        artifact = long_value_artifact("tags", key)
        shown = cut_value(text, MAX_TAG_VALUE_LENGTH, artifact)
        if shown != text:
            self.client.log_text(run_id, text, artifact)
        self.client.set_tag(run_id, key, shown)

    def start_trial(self, trial_id: str, config: dict[str, Any], recipe: dict[str, Any] | None,
                    trainable_params: int | None = None) -> str:
        """Create the nested run of a trial; returns its run id. ``trainable_params`` (counted before
        training) is logged at step 0, so the column is filled while the trial runs."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags={
            "mlflow.parentRunId": self.parent_id, "trial_id": trial_id, "autopeft.kind": "trial", "status": "running"})
        self.trial_runs[trial_id] = run.info.run_id
        if trainable_params is not None:
            self.client.log_metric(run.info.run_id, "trainable_params", float(trainable_params), step=0)
        new_keys = [space_param_key(k) for k in config if space_param_key(k) not in self._trial_param_keys]
        if new_keys:
            self._trial_param_keys += new_keys
            self._write_trials_view()
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

    def tag_trial(self, trial_id: str, tags: dict[str, str]) -> None:
        """Set tags on a trial's run (e.g. ``node_id`` and ``hostname``: where it ran on the cluster)."""
        for k, v in tags.items():
            self._set_tag(self.trial_runs[trial_id], k, v)

    def end_trial(self, trial_id: str, status: str, error: str | None = None) -> None:
        """Close a trial's run with its status tag (one of :data:`STATUSES`)."""
        run_id = self.trial_runs[trial_id]
        self.client.set_tag(run_id, "status", status)
        if error:
            self._set_tag(run_id, "error", error)
        self.client.set_terminated(run_id, {"failed": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED"))

    def log_test(self, trial_id: str, row: dict[str, Any]) -> None:
        """After the search: a Pareto point's test score, its 95% interval (``test_low`` /
        ``test_high``), every test metric (``test_<metric>``) and, with ``--confirm-seeds``, the mean and
        standard deviation over seeds (``confirm_test_mean`` / ``confirm_test_std``) on its trial's run.
        Its dev interval (``score_low`` / ``score_high``) is logged with each rung."""
        if trial_id not in self.trial_runs:
            return
        values = {k: row.get(k) for k in ("test_score", "test_low", "test_high")}
        values.update({f"test_{k}": v for k, v in (row.get("test_metrics") or {}).items()})
        confirm = row.get("confirm") or {}
        values.update({f"confirm_{k}": confirm.get(k) for k in ("test_mean", "test_std", "dev_mean", "dev_std")})
        self._log_values(self.trial_runs[trial_id], values)

    def log_reference(self, ref: dict[str, Any]) -> None:
        """The ``--reference`` run's dev and test scores on the parent run (``reference_<key>``); a failed
        one's error as the tag ``reference_error``."""
        self._log_values(self.parent_id, {f"reference_{k}": ref.get(k) for k in
                                          ("score", "score_low", "score_high", "test_score", "test_low", "test_high")})
        self.client.set_tag(self.parent_id, "reference", str(ref.get("kind")))
        if ref.get("status") == "failed":
            self._set_tag(self.parent_id, "reference_error", str(ref.get("error")))

    def _log_values(self, run_id: str, values: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in values.items()
              if is_finite(v)]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def finish(self, pareto_ids: set[str], artifacts_dir: Path, metrics: dict[str, float]) -> None:
        """Tag every trial ``pareto=true|false``, attach the front's files to the parent, close it."""
        for trial_id, run_id in self.trial_runs.items():
            self.client.set_tag(run_id, "pareto", "true" if trial_id in pareto_ids else "false")
        for k, v in metrics.items():
            self.client.log_metric(self.parent_id, k, float(v))
        if "best_score" in metrics:  # the parent's row in the score column: the best point of the front
            self.client.log_metric(self.parent_id, "score", float(metrics["best_score"]))
        self.client.set_tag(self.parent_id, "status", "finished")
        from autopeft.searching.runs import ARTIFACT_FILES

        for name in ARTIFACT_FILES:
            f = artifacts_dir / name
            if f.exists():
                self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def interrupt(self, message: str) -> None:
        """End the parent run ``KILLED``, tagged ``status=interrupted`` and ``interrupted=<message>``
        (e.g. the signal): the search stopped on Ctrl-C / SIGTERM and can be resumed, which reopens it."""
        self._set_tag(self.parent_id, "interrupted", message)
        self.client.set_tag(self.parent_id, "status", "interrupted")
        self.client.set_terminated(self.parent_id, "KILLED")

    def fail(self, message: str) -> None:
        """End the parent run ``FAILED`` with the ``error`` tag ``message`` (whole as an artifact when long)."""
        self._set_tag(self.parent_id, "error", message)
        self.client.set_tag(self.parent_id, "status", "failed")
        self.client.set_terminated(self.parent_id, "FAILED")

    def _reopen_parent(self, parent_run_id: str) -> None:
        """Take over the parent run of an interrupted search: status ``RUNNING`` again, the
        ``error``/``status`` tags of a failed end removed, ``autopeft.resumes`` counting the resumes.

        Raises:
            ValueError: no such run in this store (a different ``--tracking-uri``?).
        """
        from mlflow.exceptions import MlflowException

        try:
            self.parent = self.client.get_run(parent_run_id)
        except MlflowException:
            raise ValueError(f"the search's MLflow run {parent_run_id} is not in {self.uri}") from None
        self.parent_id = parent_run_id
        self.experiment_id = self.parent.info.experiment_id
        tags = self.parent.data.tags
        for key in ("error", "status", "interrupted"):
            if key in tags:
                self.client.delete_tag(parent_run_id, key)
        self.client.set_tag(parent_run_id, "autopeft.resumes", str(int(tags.get("autopeft.resumes", 0)) + 1))
        self.client.update_run(parent_run_id, status="RUNNING")


def _components_flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """Recipe with components keyed by position and method, for flat params (``components.0.lora.r``)."""
    out = dict(recipe)
    out["components"] = {f"{i}.{c['method']}": {k: v for k, v in c.items() if k != "method"}
                         for i, c in enumerate(recipe.get("components", []))}
    return out
