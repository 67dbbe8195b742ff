"""Live progress of a search: what a running trial has trained so far, seen from the driver.

Design: a trial writes one small JSON file, ``<search>/progress/<trial id>.json``, at most once a
second (:class:`TrialProgressWriter`, called after every optimiser step); the driver polls the folder
(:class:`LiveProgress`) and ``autopeft status`` reads it (:func:`read_progress`). Nothing of this goes
through Ray Tune's reports, so MO-ASHA and the searcher see exactly the per-rung reports they saw
before, and the rung decisions cannot change. The driver deletes a trial's file when the trial ends.
On a multi-node cluster the files reach the driver only when the search folder is on storage every
node reaches; elsewhere the live bars stay empty and the per-rung lines still print.

A progress file (all fields JSON numbers or strings)::

    {"trial_id": "a1b2c3", "examples_seen": 1536, "top": 3000, "rungs": [352, 1024, 3000],
     "rung": 2, "loss": 0.4213, "train_time_s": 38.2, "started": 1790000000.0, "updated": 1790000042.5}

``rung`` is the 0-based index of the rung being trained towards (the first rung not yet passed);
``train_time_s``: seconds of training steps so far (evaluation and setup excluded; absent when the
caller gave none); ``started`` / ``updated`` are Unix times in seconds. The driver reads the file of a
trial cut by the search's time budget before deleting it: that trial's training past its last rung is
recorded (``TrialRecord.cut``) and counted as training in ``result.json``'s ``time_s``.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from autopeft.searching.runs import write_json

#: Sub-folder of a search folder holding the running trials' progress files.
PROGRESS_DIR = "progress"


def progress_file(search_dir: str | Path, trial_id: str) -> Path:
    """Where trial ``trial_id`` of the search in ``search_dir`` writes its progress."""
    return Path(search_dir) / PROGRESS_DIR / f"{trial_id}.json"


def current_rung(examples_seen: int, rungs: list[int]) -> int:
    """0-based index of the rung a trial that has seen ``examples_seen`` examples trains towards
    (the first rung ``>= examples_seen``; the last rung once it is reached)."""
    for i, r in enumerate(rungs):
        if examples_seen <= r:
            return i
    return len(rungs) - 1


class TrialProgressWriter:
    """Writes a trial's progress file; call it after every optimiser step (runs in the trial worker).

    Writes are atomic (a temporary file renamed over the old one, so a reader never sees half a
    file) and at most every ``interval_s`` seconds, plus the first step and every rung boundary.
    An ``OSError`` (folder gone, disk full) disables the writer: progress never fails a trial.

    Args:
        path: the progress file (:func:`progress_file`).
        trial_id: the Ray Tune trial id.
        rungs: ascending examples-seen milestones; the last one is the trial's top fidelity.
        interval_s: least seconds between two writes.
    """

    def __init__(self, path: str | Path, trial_id: str, rungs: list[int], interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.trial_id = trial_id
        self.rungs = [int(r) for r in rungs]
        self.interval_s = interval_s
        self.started = time.time()
        self._last = 0.0
        self._last_rung = -1
        self.enabled = True

    def __call__(self, examples_seen: int, loss: float, train_time_s: float | None = None) -> None:
        """Record ``examples_seen`` training examples, the last step's training ``loss`` and the
        seconds of training steps so far (``train_time_s``, optional)."""
        if not self.enabled:
            return
        now = time.time()
        rung = current_rung(examples_seen, self.rungs)
        boundary = rung != self._last_rung or examples_seen in self.rungs
        if now - self._last < self.interval_s and not boundary:
            return
        self._last, self._last_rung = now, rung
        state = {"trial_id": self.trial_id, "examples_seen": int(examples_seen), "top": self.rungs[-1],
                 "rungs": self.rungs, "rung": rung, "loss": float(loss), "started": self.started,
                 "updated": now}
        if train_time_s is not None:
            state["train_time_s"] = float(train_time_s)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, state, indent=None)
        except OSError:
            self.enabled = False


def read_progress(search_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The progress files of a search, by trial id (unreadable or half-written files are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    folder = Path(search_dir) / PROGRESS_DIR
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and "examples_seen" in state:
            out[str(state.get("trial_id", f.stem))] = state
    return out


class LiveProgress:
    """Prints the search's one-line messages and, while trials train, a live bar per running trial:
    examples seen / top fidelity, current rung, last training loss, elapsed and ETA (rich).

    Pass it as ``progress`` to :func:`autopeft.search`: it is called with each line, and
    :func:`autopeft.searching.tune.run_tune` runs Ray Tune inside :meth:`watch`.

    Args:
        console: the rich console to print on (the bars redraw below the lines).
        poll_s: seconds between two reads of the progress folder.
    """

    def __init__(self, console=None, poll_s: float = 0.5) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.poll_s = poll_s

    def __call__(self, line: str) -> None:
        self.console.print(line, markup=False, soft_wrap=True)

    # Ray Tune pickles the search state (the searcher's callbacks reach this object): the console,
    # which holds locks, stays behind and an unpickled copy prints on a new default console.
    def __getstate__(self) -> dict[str, Any]:
        return {"poll_s": self.poll_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, state["poll_s"])

    @contextmanager
    def watch(self, search_dir: str | Path) -> Iterator[None]:
        """Show the bars of the trials writing progress under ``search_dir`` until the block ends."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rung]}"), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=self.console, transient=True,
                        # the bars change at most every poll: drawing them 10 times a second (rich's
                        # default) takes CPU from the trials on a small machine
                        refresh_per_second=max(1.0, 1.0 / self.poll_s))
        tasks: dict[str, Any] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.poll_s):
                self.refresh(bars, tasks, search_dir)

        thread = threading.Thread(target=poll, name="autopeft-progress", daemon=True)
        with bars:
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()

    @staticmethod
    def refresh(bars, tasks: dict[str, Any], search_dir: str | Path) -> None:
        """One poll: add a bar per new progress file, update the others, drop those whose file is gone."""
        states = read_progress(search_dir)
        for trial_id in [t for t in tasks if t not in states]:
            bars.remove_task(tasks.pop(trial_id))
        for trial_id, s in states.items():
            rungs = s.get("rungs") or [s.get("top", 1)]
            fields = {"rung": f"rung {int(s.get('rung', 0)) + 1}/{len(rungs)} ({rungs[int(s.get('rung', 0))]:,})",
                      "loss": f"{s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else "-"}
            if trial_id not in tasks:
                tasks[trial_id] = bars.add_task(f"trial {trial_id}", total=int(s.get("top", rungs[-1])), **fields)
            bars.update(tasks[trial_id], completed=int(s["examples_seen"]), **fields)
