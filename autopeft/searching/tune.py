"""Ray Tune, behind one module: Tuner + :class:`SpaceSearcher` (Optuna, 3 objectives) + MO-ASHA.

* Search algorithm: :class:`autopeft.searching.searchers.SpaceSearcher` over the space's dimensions with
  the searcher chosen by name (``tpe`` default, ``random``, ``nsga2``, ``qnehvi``); known good
  configurations of the space (``start_points``) are tried first. Every sampled point is counted
  on the meta device before Ray sees it: over budget, empty (no PEFT component) or invalid points
  are told to the sampler as infeasible, recorded (``over_budget`` / ``empty`` / ``invalid``) and
  never start a Ray trial or take a trial slot. A point whose recipe a trial already has (trained or
  running) is a ``duplicate``: answered from that trial, recorded, never trained again.
* Scheduler: :class:`autopeft.searching.scheduler.MultiObjectiveASHA` (Schmucker et al.,
  arXiv:2106.12639) over training examples seen; its milestones are exactly the rungs the trials
  report at (:meth:`Fidelity.search_rungs`).
* The sampler only learns top-fidelity results as final; trials stopped at a lower rung are told
  as pruned (see :mod:`autopeft.searching.searchers`).
* Failures: an exception in a trial, or a non-finite score, is recorded ``failed``; the search goes on.
* Trial ids are ``trial_0001``, ``trial_0002``, ... in creation order, and every write of
  ``trials.json`` is preceded by a resume checkpoint (:mod:`autopeft.searching.resume`): a killed search
  continues with ``TuneSettings.resume``, the trial that was running re-run from the start.
* Ctrl-C / SIGTERM: the running trials are recorded ``interrupted`` (MLflow runs ``KILLED``), the
  resume checkpoint written, and :class:`SearchInterrupted` raised (:mod:`autopeft.searching.interrupt`);
  ``autopeft resume`` finishes the search as if it had not been interrupted.
* Ray: without ``ray_address`` the search always starts its own local Ray instance
  (``address="local"``), whatever cluster another Ray user left on the machine.

Every trial's record (config, recipe, status, per-rung rows) is kept on the driver by a
:class:`SearchDriver`: the searcher's events and Ray Tune's (through a :class:`ray.tune.Callback`) update it,
and it writes MLflow through :class:`autopeft.searching.tracking.SearchTracker` and the resume checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autopeft._util import is_finite
from autopeft.searching.interrupt import GracefulStop, SearchInterrupted, on_main_thread, signal_name
from autopeft.searching.runs import TRIALS_FILE, write_json
from autopeft.searching.space import SearchSpace
from autopeft.searching.progress import PROGRESS_DIR, progress_file, read_progress
from autopeft.searching.tracking import cut_value
from autopeft.errors import AutopeftError, first_line

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
    node_id: str | None = None  #: the Ray node it ran on (hex id), as the trial reported it
    hostname: str | None = None  #: that node's host name
    duplicate_of: str | None = None  #: a ``duplicate`` sample: the trial whose recipe it repeats
    #: a trial cut by the time budget between rungs: ``{"examples_seen", "train_time_s"}`` where its last
    #: progress file left it (its training past the last rung, which no row holds)
    cut: dict[str, float] | None = None

    def row_at(self, examples: int) -> dict[str, Any] | None:
        """The measurement at fidelity ``examples`` (training examples seen), if reached."""
        return next((r for r in self.rows if r.get("examples_seen") == examples), None)

    def as_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "status": self.status, "error": self.error, "config": self.config,
                "recipe": self.recipe, "trainable_params": self.trainable_params, "rows": self.rows,
                "node_id": self.node_id, "hostname": self.hostname, "duplicate_of": self.duplicate_of,
                "cut": self.cut}


@dataclass
class TuneSettings:
    """How to run the trials.

    Attributes:
        num_samples: trials to sample (including start points).
        time_budget_s: wall-clock cap of the whole search, seconds (``None``: none).
        cpus_per_trial / gpus_per_trial: Ray resources of one trial.
        ray_address: an existing cluster (``host:port`` of its head, or ``auto``; not Ray Client's ``ray://``,
            refused by :func:`autopeft.api.search`); ``None`` starts a local one.
        seed: seeds the sampler.
        storage_path: where Ray keeps its experiment folder (absolute).
        device: forced trial device (``cpu``/``cuda``), default: CUDA if the trial got a GPU.
        searcher: sampler name (:data:`autopeft.searching.searchers.SEARCHERS`).
        start_points: partial points tried first (default: the space's own).
        resume: continue the search saved in ``storage_path`` (:mod:`autopeft.searching.resume`): finished
            trials kept, the trial that was running re-run under its id, sampler and scheduler restored.
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
    resume: bool = False


#: A trial's error message longer than this (characters) is recorded cut, with a visible marker
#: (:func:`autopeft.searching.tracking.cut_value`); MLflow's ``error`` tag keeps up to 8,000 and the whole
#: message as an artifact.
MAX_ERROR_CHARS = 20_000


class NonFiniteScore(AutopeftError, FloatingPointError):
    """A rung's score is NaN or infinite (e.g. STS-B's Pearson of constant predictions): the trial fails."""

    user_error = False


def _trial_fn(config: dict[str, Any], space: SearchSpace, base: dict[str, Any], rungs: list[int],
              data_dir: str | None, device: str | None, search_dir: str | None = None) -> None:
    """The Ray Tune trainable: runs in a worker; reports one row per rung (``rungs``, examples seen).
    It computes on as many threads as the CPUs Ray assigned it (:func:`autopeft.backbones.threads.limit_threads`;
    each row's ``threads`` / ``interop_threads`` say what it ran on).
    With ``search_dir`` it also writes its live progress there (:mod:`autopeft.searching.progress`; a file,
    never a Tune report, so the scheduler and the searcher only ever see rung reports)."""
    from ray import tune

    from autopeft.searching.progress import TrialProgressWriter, progress_file
    from autopeft.backbones.threads import limit_threads, ray_cpus, threads_for
    from autopeft.training.trainer import run_trial

    limit_threads(threads_for(ray_cpus()))  # compute on the CPUs Ray gave this trial, no more
    where = _where()  # node id and host name, in every report: the driver records where each trial ran
    on_step = keep = None
    if search_dir:
        from autopeft.searching.runs import kept_dir

        trial_id = tune.get_context().get_trial_id()
        on_step = TrialProgressWriter(progress_file(search_dir, trial_id), trial_id, rungs)
        keep = kept_dir(search_dir, trial_id)  # top-fidelity weights: scored on test after the search, exported

    def report(row: dict[str, Any]) -> None:
        score = row.get("score")
        if not is_finite(score):
            raise NonFiniteScore(f"dev score is {score} at {row.get('examples_seen')} examples "
                                 "(constant predictions?)")
        tune.report({**row, "status": "running", **where})

    try:
        recipe = space.to_recipe(config, base)
        dev = device or ("cuda" if _has_gpu() else "cpu")
        run_trial(recipe, data_dir, rungs, report=report, device=dev, on_step=on_step, keep_dir=keep)
    except Exception as exc:  # a failing trial is recorded as failed; the search goes on
        if type(exc).__name__ in ("TuneError", "StopTraining", "SystemExit", "KeyboardInterrupt"):
            raise
        tune.report({"status": "failed", "error": cut_value(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS),
                     "score": float("nan"),
                     "trainable_params": -1, "peak_memory_bytes": float("nan"), "examples_seen": 0, **where})
    finally:  # the worker process runs the next trial: give this one's memory back (autopeft.backbones.memory)
        from autopeft.backbones.memory import release_memory

        release_memory()


def _where() -> dict[str, str]:
    """``{"node_id": <hex Ray node id>, "hostname": <host>}`` of the calling Ray worker (``node_id``
    ``None`` outside Ray: asking would start a Ray instance)."""
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node, "hostname": socket.gethostname()}


def _ray_error(trial) -> str:
    """One line from Ray's ``error.txt`` of a trial that died outside ``_trial_fn`` (its worker
    process or its node died): e.g. "The actor died unexpectedly before finishing this task. The
    actor died because its node has died. Node Id: <hex>: health check failed ..."."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    lines = [ln for ln in lines if not ln.startswith("Failure #")]
    if not lines:
        return "the trial's Ray worker died"
    keep = [lines[0]] + [ln for ln in lines[1:] if "died" in ln or "terminated" in ln or "Error" in ln][:2]
    return cut_value(" ".join(keep), MAX_ERROR_CHARS)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class RayStartError(AutopeftError, RuntimeError):
    """Ray could not start locally or reach the cluster at ``--ray-address`` (one line, with what to
    check); the CLI exits 2 on it, as on other bad settings."""


class ClusterTooSmall(AutopeftError, ValueError):
    """A trial asks for more CPUs or GPUs than the whole Ray cluster has: no trial could ever start."""


def check_cluster_fits(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Raise :class:`ClusterTooSmall` (one line) when one trial's resources exceed the connected
    cluster's totals (``ray.cluster_resources()``); Ray would otherwise wait for them forever.
    An autoscaling cluster that would grow on demand is not covered: start it at its needed size."""
    import ray

    total = ray.cluster_resources()
    for what, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)):
        have = float(total.get(what, 0.0))
        if need and need > have:
            raise ClusterTooSmall(f"a trial needs {need:g} {what}s but the Ray cluster has {have:g}: lower "
                                  f"--{what.lower()}s-per-trial or add nodes")


def start_ray(ray_address: str | None) -> None:
    """Connect to ``ray_address``, or start a private local Ray instance (never joining a cluster
    that another program started on this machine).

    Token authentication (Ray >= 2.5x): ``ray start --head`` turns it on by itself when a token
    exists (``~/.ray/auth_token``, which any earlier local ``ray.init()`` writes), but a driver given
    an explicit address does not, and then fails after 20 s ("Failed to connect to Ray cluster").
    So when ``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), the driver sends it, as ``ray start --head``
    would (:func:`_use_token_if_available`); a cluster without authentication ignores it.

    The caller's SIGTERM handler stays: ``ray.init`` would put its own (``sys.exit(15)``) in its place.

    Raises:
        RayStartError: Ray could not start or reach the cluster (one line; for a cluster address,
            with what to check about the token).
    """
    import ray

    if ray.is_initialized():
        return
    # ray.init puts its SIGTERM handler (sys.exit(15)) in place of the search's, which raises
    # SearchInterrupted (autopeft.searching.interrupt): a SIGTERM outside Tune's loop exited 15, unrecorded
    sigterm = signal.getsignal(signal.SIGTERM) if on_main_thread() else None
    try:
        if ray_address:
            _use_token_if_available()
            ray.init(address=ray_address, log_to_driver=False)
        else:
            # Ray starts its workers at nice 15 (worker_niceness), so every trial ran below the
            # driver, its progress display, MLflow and Ray's own processes, and below any other job
            # of the user: 1.2x slower in the search than alone (benchmarks/search_overhead.py).
            # A local search's trials are the work: they run at the driver's priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR", configure_logging=True)
    except Exception as exc:
        hint = ""
        if ray_address and (isinstance(exc, (ConnectionError, TimeoutError)) or "uthenticat" in type(exc).__name__):
            hint = ("; if the head runs with token authentication, give this machine its token "
                    "(copy the head's ~/.ray/auth_token, or set RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token")
        raise RayStartError(f"cannot start Ray ({'address ' + ray_address if ray_address else 'local'}): "
                           f"{first_line(exc)}{hint}") from None
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _use_token_if_available() -> bool:
    """Turn on Ray token authentication in this process when ``RAY_AUTH_MODE`` is unset and a token
    is available, the rule ``ray start --head`` follows (Ray's
    ``maybe_enable_token_auth_if_token_available``). Returns whether token mode is on; ``False`` on
    a Ray without token authentication."""
    import logging

    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # a Ray before token authentication
        return False
    log = logging.getLogger(auth.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is for cluster starters
    try:
        return bool(auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
    finally:
        log.setLevel(level)


class _StopTune(Exception):
    """Raised at the next step of Tune's loop after the interruption is recorded: ends the loop (Tune
    then stops the trials' actors)."""


class SearchDriver:
    """The driver's side of a running search: the record of every trial and rejected sample, and what
    each event does to it, to MLflow, to the progress lines and to the resume checkpoint.

    Events come from two places: the :class:`autopeft.searching.searchers.SpaceSearcher`, before Ray
    sees a sample (:meth:`on_reject`, :meth:`on_duplicate`, :meth:`on_accept`), and Ray Tune's callback
    (:meth:`tune_callback`: the loop's next step, a trial started, a rung result, completed, errored).
    Every event that ends a trial or a sample writes ``trials.json`` and the resume checkpoint (for
    rejected and duplicate samples at most every few seconds: :func:`autopeft.searching.resume.save_checkpoint`)
    (:meth:`save_progress`), so a killed search loses no finished trial.

    Attributes:
        records: every trial and rejected / duplicate sample, by id, in creation order.
        searcher / scheduler / generator: set by :func:`run_tune` once built (the searcher needs this
            driver's ``on_*`` methods); the resume checkpoint holds their states (``get_state``).
        stop: the SIGINT / SIGTERM handler (:class:`autopeft.searching.interrupt.GracefulStop`); its
            first signal freezes the generator (no new sample; the sampler keeps the running trials).
        t0: when the search started (seconds since the epoch); a resumed search moves it back by the
            time already searched.
    """

    def __init__(self, space: SearchSpace, param_limit: int, settings: TuneSettings, tracker,
                 progress: Callable[[str], None] | None, metric: str, top_fidelity: int):
        self.space, self.param_limit, self.settings, self.tracker = space, param_limit, settings, tracker
        self.progress, self.metric, self.top_fidelity = progress, metric, top_fidelity
        self.records: dict[str, TrialRecord] = {}
        self.searcher = self.scheduler = self.generator = None
        self.t0 = time.time()
        self.stop = GracefulStop(on_first=lambda signum: setattr(self.generator, "frozen", True))

    def say(self, msg: str) -> None:
        """One progress line, stamped with the seconds since the search started."""
        if self.progress:
            self.progress(f"[{time.time() - self.t0:6.0f}s] {msg}")

    def save_progress(self, force: bool = False) -> None:
        """Keep ``trials.json`` current, so an interrupted search loses no finished trial."""
        from autopeft.searching.resume import save_checkpoint  # imports Ray: only once a search runs

        # The resume state first: trials.json never shows a trial that a resume would not know.
        save_checkpoint(self.settings.storage_path, self.records, self.searcher, self.scheduler, self.generator,
                        time.time() - self.t0, force=force)
        write_json(Path(self.settings.storage_path) / TRIALS_FILE, [r.as_dict() for r in self.records.values()])

    # --- the searcher's events: a sample before Ray sees it ---

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_{sum(1 for r in self.records.values() if r.trial_id.startswith(prefix + '_')) + 1:04d}"

    def on_reject(self, config: dict[str, Any], verdict) -> None:
        """A sample over budget, empty or invalid: recorded (and in MLflow), never trained."""
        rid = self._next_id("rejected")
        rec = self.records[rid] = TrialRecord(rid, self.space.decode(config), verdict.recipe, verdict.status,
                                              verdict.error, verdict.trainable_params)
        self._record_sample(rec)
        why = rec.error or (f"{rec.trainable_params:,} params > limit {self.param_limit:,}"
                            if rec.status == "over_budget" else "no PEFT component")
        self.say(f"sample {rid} rejected ({rec.status}): {_summary(rec.recipe)}: {why}")
        self.save_progress()

    def on_duplicate(self, config: dict[str, Any], verdict) -> None:
        """A sample whose recipe a trial already has: recorded the way a rejected sample is, never trained."""
        did = self._next_id("duplicate")
        rec = self.records[did] = TrialRecord(did, self.space.decode(config), verdict.recipe, "duplicate", None,
                                              verdict.trainable_params, duplicate_of=verdict.duplicate_of)
        self._record_sample(rec, tags={"duplicate_of": rec.duplicate_of})
        self.say(f"sample {did} duplicates {rec.duplicate_of}: {_summary(rec.recipe)}: answered from "
                 f"{rec.duplicate_of}, not trained")
        self.save_progress()

    def _record_sample(self, rec: TrialRecord, tags: dict[str, str] | None = None) -> None:
        """An untrained sample's MLflow run: its config, recipe, ``tags`` and parameter count, ended
        with its status at once."""
        if not self.tracker:
            return
        self.tracker.start_trial(rec.trial_id, rec.config, rec.recipe)
        if tags:
            self.tracker.tag_trial(rec.trial_id, tags)
        if rec.trainable_params:
            self.tracker.log_rung(rec.trial_id, {"trainable_params": rec.trainable_params}, 0)
        self.tracker.end_trial(rec.trial_id, rec.status, rec.error)

    def on_accept(self, trial_id: str, config: dict[str, Any], verdict) -> None:
        """A sample that becomes Ray trial ``trial_id``: recorded ``running``."""
        self.records[trial_id] = TrialRecord(trial_id, self.space.decode(config), verdict.recipe, "running", None,
                                             verdict.trainable_params)

    # --- Ray Tune's events ---

    def record_interruption(self) -> None:
        """Every trial still running: ``interrupted``, its MLflow run ``KILLED``; checkpoint and
        ``trials.json`` written whatever the checkpoint memo says; the parent marked interrupted."""
        stop, tracker = self.stop, self.tracker
        stop.phase = "recording"
        name = signal_name(stop.signum)
        cut = [rec for rec in self.records.values() if rec.status == "running"]
        for rec in cut:
            rec.status = "interrupted"
            rec.error = f"interrupted by {name}: `autopeft resume` runs it again from the start"
            if tracker and rec.trial_id in tracker.trial_runs:
                tracker.end_trial(rec.trial_id, "interrupted", rec.error)
            progress_file(self.settings.storage_path, rec.trial_id).unlink(missing_ok=True)
        self.save_progress(force=True)
        if tracker:
            tracker.interrupt(f"{name}: {len(cut)} running trial(s) interrupted; `autopeft resume` continues")
        self.say(f"interrupted by {name}: {', '.join(r.trial_id for r in cut) or 'no trial'} running, recorded "
                 "'interrupted'; the search is saved for `autopeft resume`")
        stop.phase = "cleanup"

    def _record(self, trial) -> TrialRecord:
        rec = self.records.get(trial.trial_id)
        if rec is None:  # not seen by on_accept (should not happen): rebuild from the config
            rec = self.records[trial.trial_id] = TrialRecord(trial.trial_id, self.space.decode(dict(trial.config)))
        return rec

    def step_begin(self) -> None:
        """Tune's loop takes its next step: after a signal, record the interruption and end the loop.

        Raises:
            _StopTune: a signal came and the interruption is recorded.
        """
        if self.stop.requested and self.stop.phase == "running":
            self.record_interruption()
            raise _StopTune()

    def trial_started(self, trial) -> None:
        rec = self._record(trial)
        if rec.status == "interrupted":
            return
        if self.tracker:
            self.tracker.start_trial(trial.trial_id, rec.config, rec.recipe, rec.trainable_params)
        self.say(f"trial {trial.trial_id} started: {_summary(rec.recipe)} ({rec.trainable_params:,} params)"
                 if rec.trainable_params is not None else f"trial {trial.trial_id} started")

    def trial_result(self, trial, result: dict[str, Any]) -> None:
        """A trial's report: a rung's row (kept, to MLflow, one progress line), or its failure."""
        rec, tracker = self._record(trial), self.tracker
        if rec.status == "interrupted":
            return
        if result.get("node_id") and result["node_id"] != rec.node_id:  # where it runs (cluster)
            rec.node_id, rec.hostname = result["node_id"], result.get("hostname")
            if tracker:
                tracker.tag_trial(trial.trial_id, {"node_id": rec.node_id, "hostname": rec.hostname})
        if result.get("status") == "failed":
            rec.status, rec.error = "failed", result.get("error")
            self.say(f"trial {trial.trial_id} failed: {rec.error}")
            return
        row = {k: v for k, v in result.items() if k in _ROW_KEYS or k in _metric_keys(result)}
        rec.rows.append(row)
        rec.trainable_params = row.get("trainable_params", rec.trainable_params)
        if tracker:
            tracker.log_rung(trial.trial_id, row, int(row["examples_seen"]))
            if row.get("precision") and len(rec.rows) == 1:
                tracker.tag_trial(trial.trial_id, {"precision": row["precision"]})
        scored_on = f" ({row['eval_examples']:,} dev)" if row.get("eval_examples") else ""
        self.say(f"trial {trial.trial_id} rung {row['examples_seen']:>6} examples: "
                 f"{self.metric}={row['score']:.4f}{scored_on} "
                 f"params={row['trainable_params']:,} mem={row['peak_memory_bytes'] / 2**20:.0f}MiB")

    def trial_complete(self, trial) -> None:
        """A trial ended by itself or by MO-ASHA: ``finished`` at the top fidelity, else ``stopped_early``."""
        rec = self._record(trial)
        if rec.status == "interrupted":  # recorded already; Ray is only stopping it
            return
        if rec.status == "running":
            reached = max((r["examples_seen"] for r in rec.rows), default=0)
            rec.status = "finished" if reached >= self.top_fidelity else "stopped_early"
            if rec.rows and rec.status == "stopped_early":
                self.say(f"trial {trial.trial_id} stopped early by MO-ASHA at {reached} examples")
        if self.tracker:
            self.tracker.end_trial(trial.trial_id, rec.status, rec.error)
        progress_file(self.settings.storage_path, trial.trial_id).unlink(missing_ok=True)
        self.save_progress()

    def trial_error(self, trial) -> None:
        """A trial died outside ``_trial_fn`` (its worker or its node): ``failed``, with Ray's reason."""
        rec, tracker = self._record(trial), self.tracker
        if rec.status == "interrupted" or (self.stop.requested and rec.status == "running"):
            return  # its worker got the Ctrl-C too (the terminal's process group): interrupted, not failed
        rec.status = "failed"
        rec.error = rec.error or _ray_error(trial)
        lost_node = re.search(r"node has died\. Node Id: ([0-9a-f]+)", rec.error)
        if lost_node and rec.node_id is None:  # killed before its first report: Ray names the node
            rec.node_id = lost_node.group(1)
        self.say(f"trial {trial.trial_id} failed: {rec.error}")
        if tracker:
            if rec.node_id:
                tracker.tag_trial(trial.trial_id, {"node_id": rec.node_id, "hostname": rec.hostname or ""})
            tracker.end_trial(trial.trial_id, "failed", rec.error)
        progress_file(self.settings.storage_path, trial.trial_id).unlink(missing_ok=True)
        self.save_progress()

    def tune_callback(self):
        """A :class:`ray.tune.Callback` that hands Tune's events to this driver."""
        from ray import tune

        driver = self

        class _Recorder(tune.Callback):
            def on_step_begin(self, iteration, trials, **info):
                driver.step_begin()

            def on_trial_start(self, iteration, trials, trial, **info):
                driver.trial_started(trial)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                driver.trial_result(trial, result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                driver.trial_complete(trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                driver.trial_error(trial)

        return _Recorder()

    def finish(self, cut_progress: dict[str, dict]) -> None:
        """After Tune's loop: trials still ``running`` were cut by the time budget, ``stopped_early``, with
        how far they trained (``cut_progress``: their last progress files, by trial id)."""
        for rec in self.records.values():
            if rec.status == "running":
                rec.status = "stopped_early"
                p = cut_progress.get(rec.trial_id) or {}
                if is_finite(p.get("train_time_s")) and is_finite(p.get("examples_seen")):
                    rec.cut = {"examples_seen": int(p["examples_seen"]), "train_time_s": float(p["train_time_s"])}
        if self.searcher.exhausted:
            self.say(f"the searcher stopped: {self.searcher.stop_reason}")
        self.save_progress()


def run_tune(space: SearchSpace, base: dict[str, Any], param_limit: int, settings: TuneSettings,
             data_dir: str | None, tracker=None, progress: Callable[[str], None] | None = None,
             timings: dict[str, float] | None = None) -> dict[str, TrialRecord]:
    """Run the search; returns the driver's record of every trial and every rejected sample, by id.

    ``timings``, when given, receives ``ray_start_s`` (starting or reaching Ray) and ``tune_s`` (Ray
    Tune's loop: every trial, the scheduler, the searcher, the driver's callbacks), in seconds.

    ``progress`` receives one line per event (trial started, rung reached, stopped, failed); when it
    also has a ``watch(search_dir)`` context manager (:class:`autopeft.searching.progress.LiveProgress`), Ray
    Tune runs inside it, which draws a live bar per running trial from the trials' progress files.

    What each event does to the records lives in :class:`SearchDriver`; this function builds the
    sampler, searcher, scheduler and Tuner around it and runs Tune's loop.

    Raises:
        RuntimeError: Ray could not start or reach the cluster.
        SearcherError: unknown searcher, or its library is missing.
        SearchInterrupted: SIGINT (Ctrl-C) or SIGTERM while the trials ran: the running trials are
            recorded ``interrupted`` (their MLflow runs and the parent ended ``KILLED``), the resume
            checkpoint and ``trials.json`` written; ``recorded`` is true (:mod:`autopeft.searching.interrupt`).
        ValueError: ``base`` has no ``dev`` split: its trials would be scored on the task's validation
            split, which is the search's untouched test split.
    """
    if not base.get("dev"):
        raise ValueError("a search's trials are scored on a dev split carved from train, and base has none "
                         "(base['dev']): they would read the test split")
    from autopeft.data.tasks import metric_name

    import optuna
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.search import ConcurrencyLimiter

    from autopeft.searching.resume import NumberedSearchGenerator, resume_search
    from autopeft.searching.scheduler import MultiObjectiveASHA
    from autopeft.searching.searchers import SpaceSearcher, make_sampler

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fid = space.fidelity
    rungs = fid.search_rungs(int(base.get("training", {}).get("batch_size", 32)))
    start_points = space.start_points if settings.start_points is None else settings.start_points
    sampler = make_sampler(settings.searcher, settings.seed, n_startup_trials=max(4, len(start_points) + 2))
    t_ray = time.time()
    start_ray(settings.ray_address)
    check_cluster_fits(settings.cpus_per_trial, settings.gpus_per_trial)
    timings = {} if timings is None else timings
    timings["ray_start_s"] = time.time() - t_ray

    # the rung lines name the task's metric (accuracy=, mcc=, pearson=, ...)
    driver = SearchDriver(space, param_limit, settings, tracker, progress, metric_name(base.get("task")),
                          fid.max_train_examples)
    driver.searcher = SpaceSearcher(space, base, param_limit, sampler, fid.max_train_examples, start_points,
                                    on_reject=driver.on_reject, on_accept=driver.on_accept,
                                    on_duplicate=driver.on_duplicate)
    concurrent = _concurrent_trials(settings)
    driver.scheduler = MultiObjectiveASHA(rungs, reduction_factor=fid.reduction_factor)
    driver.generator = NumberedSearchGenerator(ConcurrencyLimiter(driver.searcher, max_concurrent=concurrent))
    time_budget_s = settings.time_budget_s
    if settings.resume:  # records, sampler, scheduler and trial counter as at the last checkpoint
        elapsed = resume_search(settings.storage_path, driver.records, driver.searcher, driver.scheduler,
                                driver.generator, tracker, driver.say)
        driver.t0 -= elapsed
        if time_budget_s is not None:
            time_budget_s = max(time_budget_s - elapsed, 1e-3)
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, space=space, base=base, rungs=rungs, data_dir=data_dir,
                             device=settings.device, search_dir=settings.storage_path), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=driver.generator, scheduler=driver.scheduler,
                                    num_samples=settings.num_samples, time_budget_s=time_budget_s,
                                    # the next trial runs in the finished one's worker: no new process to
                                    # start and import torch/transformers in, and the data, tokenizer and
                                    # backbone files already read (experiments/search_overhead.md: ~6 s a
                                    # trial on 2 CPU cores); _trial_fn releases each trial's memory
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="ray", storage_path=settings.storage_path, verbose=0,
                                  # result.json per trial, on the driver: Tune's end-of-run analysis reads it
                                  # ("Could not fetch metrics ... result.json and progress.csv were not found")
                                  callbacks=[driver.tune_callback(), JsonLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    driver.say(f"Ray Tune: {settings.num_samples} trials, searcher {settings.searcher} (seed {settings.seed}), "
               f"MO-ASHA rungs {rungs} examples, {settings.cpus_per_trial:g} CPU / {settings.gpus_per_trial:g} GPU "
               f"per trial, {concurrent} at a time")
    shutil.rmtree(Path(settings.storage_path) / PROGRESS_DIR, ignore_errors=True)  # stale: a killed earlier driver
    watch = getattr(progress, "watch", None)  # a LiveProgress: bars per running trial while Tune runs
    stop = driver.stop
    with stop:
        t_fit = time.time()
        try:
            with watch(settings.storage_path) if watch else contextlib.nullcontext():
                tuner.fit()
        except _StopTune:
            pass
        except KeyboardInterrupt:  # a second signal during Ray's clean-up: the search is saved already
            if stop.phase != "cleanup":
                raise
        if stop.requested:
            if stop.phase == "running":  # the signal came as Tune's loop ended by itself
                driver.record_interruption()
            shutil.rmtree(Path(settings.storage_path) / PROGRESS_DIR, ignore_errors=True)
            raise SearchInterrupted(stop.signum, Path(settings.storage_path), recorded=True)
    timings["tune_s"] = time.time() - t_fit
    left = read_progress(settings.storage_path)  # trials cut by the time budget: how far they trained
    shutil.rmtree(Path(settings.storage_path) / PROGRESS_DIR, ignore_errors=True)
    driver.finish(left)
    return driver.records


def _concurrent_trials(settings: TuneSettings) -> int:
    """How many trials the cluster (Ray, started) runs at once: its CPUs over a trial's, and with GPUs
    also its GPUs over a trial's (fractional: ``--gpus-per-trial 0.25`` packs four on a GPU)."""
    import ray

    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(settings.cpus_per_trial, 1e-9))
    if not settings.gpus_per_trial:
        return max(1, by_cpu)
    return max(1, min(by_cpu, int(total.get("GPU", 0) // settings.gpus_per_trial)))  # both must fit


_ROW_KEYS = {"score", "score_low", "score_high", "eval_split", "eval_examples", "trainable_params", "head_params",
             "backbone_params", "trainable_percent", "peak_memory_bytes", "examples_seen", "steps", "train_time_s",
             "wall_time_s", "threads", "interop_threads", "precision", "setup_time_s", "eval_time_s"}


def _metric_keys(result: dict) -> set[str]:
    from autopeft.data.tasks import METRICS

    return {k for k in result if k in METRICS}


def _summary(recipe: dict | None) -> str:
    if not recipe:
        return "invalid configuration"
    parts = []
    for c in recipe.get("components", []):
        keys = [k for k in ("r", "target_modules", "placement", "reduction_factor", "bottleneck_size", "num_virtual_tokens")
                if k in c and c[k] is not None]
        parts.append(c["method"] + "(" + ", ".join(f"{k}={c[k]:g}" if isinstance(c[k], float) else f"{k}={c[k]}"
                                                   for k in keys) + ")")
    lr = recipe.get("training", {}).get("learning_rate")
    gate = " gated" if recipe.get("gating") else ""
    return (" + ".join(parts) or "head only") + gate + (f" lr={lr:.2g}" if lr else "")
