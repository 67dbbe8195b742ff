"""Resuming a search that was killed (``kill -9`` of the driver, a crash, a machine restart).

``autopeft search ... --name N --resume`` (or ``autopeft resume N``) continues search ``N`` from its
folder ``autopeft_runs/N/``:

* **Finished trials are not re-run**: they keep their ids, rows and scores, and their MLflow runs.
  Rejected and duplicate samples are kept too; the searcher still knows which trial holds each
  recipe, so a configuration trained before the kill is not trained again after it, and a duplicate
  that waited for the trial that was running is told that trial's result when its re-run completes.
* **The trial that was running is re-run from the start, under the same id** (a partial trial has no
  checkpoint worth keeping: trials are minutes long and a rung is evaluated on the whole validation
  split). Its MLflow run from the killed driver is tagged ``status=interrupted``, ended ``KILLED``
  and deleted (MLflow's soft delete, so ``mlflow gc`` can purge it); the re-run gets a fresh run, so
  the parent ends with exactly one active nested run per trial and none left ``RUNNING``.
* **Sampler and scheduler continue where they were**: the Optuna study *with its sampler* (the
  random state included), MO-ASHA's recorded rung results and the trial counter are restored, so
  with one trial at a time the resumed search proposes, trains, stops and scores exactly what the
  uninterrupted search would have (``tests/test_resume.py`` checks this against an uninterrupted run).

How. The driver writes ``checkpoint.pkl`` in the search folder *before* ``trials.json``, atomically
(write, fsync, rename), every time a Ray trial has ended (finished, stopped or failed) and, when only
rejected or duplicate samples were added, at most every :data:`REJECT_CHECKPOINT_INTERVAL_S` seconds
(the study grows with every sample). So ``trials.json`` never lists a finished trial the checkpoint lacks. It
holds the trial records, :meth:`SpaceSearcher.get_state` (the pickled study and sampler,
which Optuna trial each live Ray trial is, which trial holds each recipe, the duplicates waiting
for a running trial), :meth:`MultiObjectiveASHA.get_state`, the
:class:`NumberedSearchGenerator`'s counters and the seconds spent. A resume loads it into fresh
objects and starts a fresh Ray Tune run in the same folder. Whatever the killed driver did after the
last checkpoint (rejected and duplicate samples, the start of the next trial) is replayed by the restored sampler,
which proposes the same points again, and its leftovers in MLflow are deleted.

Why not ``Tuner.restore``: Ray saves its experiment state on a timer (not at every event), so after
``kill -9`` it can lag ``trials.json`` and MLflow; it restores the search algorithm, scheduler and
callbacks by unpickling the objects as they were when the Tuner was *created* (stale callbacks
bound to the dead driver's MLflow writer and records), and it does not save the scheduler's state
at all. Trial ids: Ray's are random (``uuid4``), so two runs of one search could never share them;
:class:`NumberedSearchGenerator` numbers trials ``trial_0001, trial_0002, ...`` in creation order,
so a resumed search and an uninterrupted one with the same seed have the same ids.

The time budget (``--time-budget``) caps the search's own running time: a resume gets what was
left at the last checkpoint. The checkpoint is a pickle: like Ray's own ``tuner.pkl``, resume only
searches whose folder you trust.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

from autopeft.errors import AutopeftError, one_line
# The run folder's file names (the driver's resume state; the arguments and MLflow parent run).
from autopeft.searching.runs import CHECKPOINT_FILE, REQUEST_FILE, RESULT_FILE, SEARCH_FILE, write_json

#: Settings (``search.json`` keys) that may differ on resume: where and how wide trials run.
MAY_CHANGE_ON_RESUME = ("cpus_per_trial", "gpus_per_trial", "ray_address")
#: Record statuses of trials that did not end: ``running`` (the driver was killed) and ``interrupted``
#: (Ctrl-C / SIGTERM stopped the search, :class:`autopeft.searching.tune.SearchInterrupted`). A resume
#: re-runs them from the start under their ids; every other status is final and kept.
UNFINISHED = ("running", "interrupted")
_VERSION = 1


class ResumeError(AutopeftError, ValueError):
    """A search folder that exists without ``--resume``, a missing or finished one with it, or a
    resume whose settings differ from the search's own."""


def _ray_search_generator():
    from ray.tune.search import SearchGenerator

    return SearchGenerator


class NumberedSearchGenerator(_ray_search_generator()):
    """Ray Tune's ``SearchGenerator`` with deterministic trial ids ``trial_0001, trial_0002, ...``.

    Ray names trials with ``uuid4`` (``Trial.generate_id``); here the n-th trial created is
    ``trial_{n:04d}``, so a search and its resumed twin (or two runs with one seed) share ids.
    After a resume, trials that were running when the checkpoint was taken (``reissue``) are created
    first, under their old ids; the searcher hands back their old configuration
    (:meth:`SpaceSearcher.suggest` of a live id).

    :meth:`create_trial_if_possible` follows Ray 2.60's ``SearchGenerator.create_trial_if_possible``
    except for the id.

    Attributes:
        next_number: the number of the next new trial.
        reissue: ids to create again before any new trial.
        frozen: set when the search is interrupted (:mod:`autopeft.searching.interrupt`): no new trial is
            created, and the searcher is not told of trials that end without a result (their worker
            got the signal too, or they never started), so they stay live in it and a resume
            creates them again with the same points.
    """

    def __init__(self, searcher) -> None:
        super().__init__(searcher)
        self.next_number = 1
        self.reissue: list[str] = []
        self.frozen = False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self.frozen:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Frozen: a trial whose worker the Ctrl-C killed (error) or that never started (no result) is
        # not told; it is re-run by a resume. One that reached its end or a stop decision is.
        if not self.frozen or (result is not None and not error):
            super().on_trial_complete(trial_id, result=result, error=error)

    def create_trial_if_possible(self, experiment_spec: dict):
        if self.frozen:
            return None
        from ray.tune.experiment.config_parser import _create_trial_from_spec
        from ray.tune.search import Searcher
        from ray.tune.search.variant_generator import _resolve_nested_dict, format_vars
        from ray.tune.utils.util import flatten_dict, merge_dicts

        trial_id = self.reissue[0] if self.reissue else f"trial_{self.next_number:04d}"
        suggested_config = self.searcher.suggest(trial_id)
        if suggested_config == Searcher.FINISHED:
            self._finished = True
            return None
        if suggested_config is None:
            return None
        if self.reissue:
            self.reissue.pop(0)
        else:
            self.next_number += 1
        spec = copy.deepcopy(experiment_spec)
        spec["config"] = merge_dicts(spec["config"], copy.deepcopy(suggested_config))
        flattened_config = _resolve_nested_dict(spec["config"])
        self._counter += 1
        tag = "{0}_{1}".format(str(self._counter), format_vars(flattened_config))
        return _create_trial_from_spec(spec, self._parser, evaluated_params=flatten_dict(suggested_config),
                                       experiment_tag=tag, trial_id=trial_id)

    def resume_state(self) -> dict[str, Any]:
        """What a resume needs: trials created, next number, ids still to re-create, finished flag."""
        return {"counter": self._counter, "next_number": self.next_number, "reissue": list(self.reissue),
                "finished": self._finished}

    def set_resume_state(self, state: dict[str, Any], running: list[str]) -> None:
        """Restore :meth:`resume_state`; ``running``: ids that were live then, to create again (their
        first creation is not counted, so ``num_samples`` still bounds the distinct trials)."""
        self.next_number = int(state["next_number"])
        self.reissue = list(state.get("reissue", [])) + [t for t in running if t not in state.get("reissue", [])]
        self._counter = int(state["counter"]) - (len(self.reissue) - len(state.get("reissue", [])))
        self._finished = bool(state["finished"]) and not self.reissue


#: After a rejected or duplicate sample alone, the checkpoint is rewritten at most this often (seconds):
#: the pickled study grows with every sample, and a resume replays such samples identically anyway.
REJECT_CHECKPOINT_INTERVAL_S = 5.0
#: Id prefixes of the records of samples that never became Ray trials (rejected, duplicate).
SAMPLE_PREFIXES = ("rejected_", "duplicate_")
_last_saved: dict[str, tuple[float, frozenset]] = {}  # folder -> (time, ids of the trials done then)


def save_checkpoint(folder: str | Path, records: dict, searcher, scheduler, generator, elapsed_s: float,
                    force: bool = False) -> bool:
    """Write the resume state atomically (``checkpoint.pkl``: temp file, fsync, then rename).

    Written whenever a Ray trial has ended since the last write, when the folder has no checkpoint
    (a new search under the name of a removed one), and with ``force`` (an interrupted search);
    when only rejected or duplicate samples were added, at most every :data:`REJECT_CHECKPOINT_INTERVAL_S` seconds.

    Args:
        folder: the search folder.
        records: ``{trial_id: TrialRecord}`` (trials, rejected and duplicate samples, in order).
        searcher: the :class:`SpaceSearcher`; scheduler: the :class:`MultiObjectiveASHA`;
        generator: the :class:`NumberedSearchGenerator`.
        elapsed_s: seconds the search has run (all sessions together).

    Returns:
        whether it was written.
    """
    key = str(Path(folder).resolve())
    done = frozenset(tid for tid, r in records.items() if r.status not in UNFINISHED and not tid.startswith(SAMPLE_PREFIXES))
    last = _last_saved.get(key)
    path = Path(folder) / CHECKPOINT_FILE
    if (not force and last is not None and last[1] == done and path.exists()
            and time.monotonic() - last[0] < REJECT_CHECKPOINT_INTERVAL_S):
        return False
    state = {"version": _VERSION, "records": records, "searcher": searcher.get_state(),
             "scheduler": scheduler.get_state(), "generator": generator.resume_state(), "elapsed_s": float(elapsed_s)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _last_saved[key] = (time.monotonic(), done)
    return True


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The state :func:`save_checkpoint` wrote, or ``None`` when the search was killed before its
    first checkpoint (then it starts over, in the same folder and MLflow parent run).

    Raises:
        ResumeError: the file is unreadable or of another version.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line
        raise ResumeError(f"cannot read the resume state {path}: {one_line(exc)}") from None
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise ResumeError(f"{path} was written by another autopeft version; it cannot be resumed")
    return state


def elapsed_before(folder: str | Path) -> float:
    """Seconds the search in ``folder`` had run when its last checkpoint was written, all earlier
    sessions together (the time budget's clock, :func:`save_checkpoint`'s ``elapsed_s``); 0 without
    a checkpoint. What a killed session did after its last checkpoint is not counted (it is
    replayed). :func:`autopeft.api.search` adds it to a resumed session's own time for the
    search's ``wall_time_s``.

    Raises:
        ResumeError: the checkpoint is unreadable.
    """
    state = load_checkpoint(folder)
    return float(state["elapsed_s"]) if state else 0.0


def restore(state: dict[str, Any] | None, records: dict, searcher, scheduler, generator) -> float:
    """Load a checkpoint into fresh objects; returns the seconds the search had run (0 without one).

    Records of trials that were running or interrupted (:data:`UNFINISHED`) lose their rows (they
    are re-run from the start); their Optuna trials stay live in the searcher and the generator
    creates them again first.
    """
    if state is None:
        return 0.0
    records.clear()
    records.update(state["records"])
    running = [tid for tid, r in records.items() if r.status in UNFINISHED]
    for tid in running:  # as when it was accepted: what it measured (rows, node, ...) is measured again
        rec = records[tid]
        records[tid] = type(rec)(rec.trial_id, rec.config, rec.recipe, "running", None, rec.trainable_params)
    searcher.set_state(state["searcher"])
    scheduler.set_state(state["scheduler"])
    generator.set_resume_state(state["generator"], running)
    return float(state["elapsed_s"])


def resume_search(folder: str | Path, records: dict, searcher, scheduler, generator, tracker=None,
                  say=None) -> float:
    """The resume step of :func:`autopeft.searching.tune.run_tune`: :func:`load_checkpoint`, :func:`restore`
    into the fresh objects, :func:`reconcile_mlflow` (when ``tracker`` is given); returns the seconds
    the search had run. ``say`` receives one line on what is kept and what runs again.

    Raises:
        ResumeError: an unreadable checkpoint.
    """
    state = load_checkpoint(folder)
    elapsed = restore(state, records, searcher, scheduler, generator)
    mlflow_counts = reconcile_mlflow(tracker, records) if tracker is not None else None
    if say:
        done = sum(1 for r in records.values() if r.status in ("finished", "stopped_early", "failed"))
        rejected = sum(1 for r in records.values() if r.trial_id.startswith("rejected_"))
        duplicates = sum(1 for r in records.values() if r.trial_id.startswith("duplicate_"))
        again = (f"re-run from the start: {', '.join(generator.reissue)}" if generator.reissue else
                 "a trial that was running starts again from the beginning")
        say(f"resumed after {elapsed:.0f}s: {done} trials done, {rejected} rejected and {duplicates} duplicate "
            f"samples kept; {again}"
            + ("" if state else " (no checkpoint yet: starting over)")
            + (f"; MLflow: {mlflow_counts['deleted']} unfinished run(s) deleted" if mlflow_counts else ""))
    return elapsed


def reconcile_mlflow(tracker, records: dict) -> dict[str, int]:
    """Make MLflow agree with the restored records before the search goes on.

    Nested runs of the parent whose trial is in ``records`` with a final status are kept (the first
    one if there are several); every other one (the trial that was running, samples rejected after
    the last checkpoint, duplicates) is tagged ``status=interrupted``, ended ``KILLED`` and deleted.
    A final record without a run (never expected) gets one, rebuilt from the record.

    Returns:
        ``{"kept": n, "deleted": n, "rebuilt": n}``.
    """
    from mlflow.entities import ViewType

    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_id}'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=50000,
                                      order_by=["attributes.start_time ASC"])
    tracker.trial_runs.clear()
    kept = deleted = rebuilt = 0
    for run in runs:
        tid = run.data.tags.get("trial_id")
        rec = records.get(tid)
        if rec is not None and rec.status not in UNFINISHED and tid not in tracker.trial_runs:
            tracker.trial_runs[tid] = run.info.run_id
            if run.info.status == "RUNNING":  # killed between its last metric and its end: end it now
                tracker.end_trial(tid, rec.status, rec.error)
            kept += 1
            continue
        tracker.client.set_tag(run.info.run_id, "status", "interrupted")
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, "KILLED")
        tracker.client.delete_run(run.info.run_id)
        deleted += 1
    for tid, rec in records.items():
        if rec.status not in UNFINISHED and tid not in tracker.trial_runs:
            tracker.start_trial(tid, rec.config, rec.recipe)
            if getattr(rec, "duplicate_of", None):
                tracker.tag_trial(tid, {"duplicate_of": rec.duplicate_of})
            for row in rec.rows:
                tracker.log_rung(tid, row, int(row.get("examples_seen", 0)))
            if not rec.rows and rec.trainable_params:
                tracker.log_rung(tid, {"trainable_params": rec.trainable_params}, 0)
            tracker.end_trial(tid, rec.status, rec.error)
            rebuilt += 1
    return {"kept": kept, "deleted": deleted, "rebuilt": rebuilt}


def open_search_folder(out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the search folder before anything is written; returns the stored ``resume.json`` on resume.

    Raises:
        ResumeError: without ``resume``, the folder already holds a search (never overwritten);
            with it, there is no such search, it was started by an autopeft without resume, or it
            already finished.
        OutputPathError: a new search's folder cannot be written (a file in its way, no permission).
    """
    from autopeft._util import check_can_write
    from autopeft.errors import OutputPathError

    out = Path(out)
    if not resume:
        check_can_write(out, "search folder", OutputPathError)  # before MLflow's parent run is made
        if out.exists() and any(out.iterdir()):
            raise ResumeError(f"search {out.name!r} already exists in {out.parent}: add --resume to continue it, "
                              "or pick another --name")
        return None
    if not (out / SEARCH_FILE).is_file():
        raise ResumeError(f"no search {out.name!r} to resume in {out.parent}")
    if (out / RESULT_FILE).is_file():
        raise ResumeError(f"search {out.name!r} already finished (see {out / RESULT_FILE}); nothing to resume")
    if not (out / REQUEST_FILE).is_file():
        raise ResumeError(f"search {out.name!r} has no {REQUEST_FILE} (started by an autopeft without resume); "
                          "it cannot be resumed")
    try:
        doc = json.loads((out / REQUEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read {out / REQUEST_FILE}: {exc}") from None
    mlflow = doc.get("mlflow") if isinstance(doc, dict) else None
    if not (isinstance(mlflow, dict) and isinstance(doc.get("request"), dict)
            and all(isinstance(mlflow.get(k), str) for k in ("tracking_uri", "parent_run_id"))):
        raise ResumeError(f"cannot read {out / REQUEST_FILE}: not a search's request (an object with 'request' "
                          "and 'mlflow': tracking_uri, parent_run_id)")
    return doc


def write_request(out: Path, request: dict[str, Any], tracking_uri: str, experiment: str, parent_run_id: str) -> None:
    """Store the search's arguments and MLflow parent run (``resume.json``) for ``autopeft resume``."""
    doc = {"request": request, "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment,
                                          "parent_run_id": parent_run_id}}
    write_json(Path(out) / REQUEST_FILE, doc)


def check_same_settings(out: Path, settings: dict[str, Any]) -> None:
    """On ``--resume``, the search must be continued with the settings it was started with
    (``search.json``), except :data:`MAY_CHANGE_ON_RESUME`.

    Raises:
        ResumeError: the first setting that differs, with both values.
    """
    stored = json.loads((Path(out) / SEARCH_FILE).read_text())
    now = json.loads(json.dumps(settings, default=str))
    if "space_fingerprint" not in stored:  # a search folder from before spaces were fingerprinted
        now.pop("space_fingerprint", None)
    for key in sorted(set(stored) | set(now)):
        if key in MAY_CHANGE_ON_RESUME or stored.get(key) == now.get(key):
            continue
        if key == "space_fingerprint":
            raise ResumeError(f"search {Path(out).name!r}: its search space {now.get('space_source') or now.get('space')} "
                              "changed since the search started (its dimensions, values or start points); "
                              "restore it to resume, or start a new search")
        raise ResumeError(f"search {Path(out).name!r} was started with {key}={stored.get(key)!r}, not "
                          f"{now.get(key)!r}: repeat its options, or run `autopeft resume {Path(out).name}`")
