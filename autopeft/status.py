"""``autopeft status``: the state of a running or finished search, read from its folder only.

A search folder (``autopeft_runs/<name>/``) holds ``search.json`` (settings, written first),
``trials.json`` (every trial, rewritten as trials end), ``result.json`` (written last),
``driver.json`` (the driver's pid, host and heartbeat, :mod:`autopeft.searching.liveness`) and, while
trials train, ``progress/<trial id>.json`` (:mod:`autopeft.searching.progress`). Nothing here needs Ray,
MLflow or the driver process, so it works from another shell while a search runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopeft.searching.liveness import driver_alive, read_driver
from autopeft.searching.progress import PROGRESS_DIR, read_progress
from autopeft.searching.runs import (  # noqa: F401  (SearchFolderError: re-exported, its old home)
    RESULT_FILE, RUNS_DIR, SEARCH_FILE, TRIALS_FILE, SearchFolderError, find_search, read_json,
)
from autopeft._util import is_finite

#: A search without ``result.json`` nor ``driver.json`` (an older autopeft) whose files changed less
#: than this many seconds ago is "running".
STALE_AFTER_S = 600.0


@dataclass
class SearchStatus:
    """What a search folder says about its search.

    Attributes:
        path: the folder.
        state: ``finished`` (``result.json`` exists); else, from ``driver.json``, ``running`` (the
            driver is alive, :func:`autopeft.searching.liveness.driver_alive`) or ``interrupted`` (it is gone:
            killed, or it raised; ``autopeft resume`` continues it). A folder without
            ``driver.json`` (an older autopeft): ``running`` when a file changed within
            :data:`STALE_AFTER_S`, else ``stopped``.
        elapsed_s: seconds the search has run, earlier sessions (resumes) included: the recorded
            total (``result.json``'s ``wall_time_s``) when finished; else, with ``driver.json``, until
            now (running) or until the driver's last heartbeat (interrupted); without it, since
            ``search.json`` was written.
        counts: trials by status (``running`` included), rejected samples among them.
        best: the best trial at the top fidelity within budget (``trial_id``, ``score``,
            ``trainable_params``), else ``None``.
        best_any_rung: the best score at any rung (``trial_id``, ``score``, ``examples_seen``), else ``None``.
        running: the running trials: ``trial_id``, ``examples_seen``, ``top``, ``rung`` (1-based),
            ``rungs``, ``loss``, ``age_s`` (seconds since the trial last wrote progress; ``None``
            without a progress file).
        settings: ``search.json``.
    """

    path: Path
    state: str
    elapsed_s: float
    counts: dict[str, int]
    best: dict[str, Any] | None
    best_any_rung: dict[str, Any] | None
    running: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "state": self.state, "elapsed_s": self.elapsed_s, "counts": self.counts,
                "best": self.best, "best_any_rung": self.best_any_rung, "running": self.running}


def find_search_folder(search: str | Path, output_dir: str | Path = RUNS_DIR) -> Path:
    """A search folder from a path, a name under ``output_dir``, or ``latest`` (newest ``search.json``),
    finished or not (:func:`autopeft.searching.runs.find_search`).

    Raises:
        SearchFolderError: nothing matches.
    """
    return find_search(search, output_dir, finished=False)


def search_status(folder: str | Path, now: float | None = None) -> SearchStatus:
    """Read the state of the search in ``folder`` (see :class:`SearchStatus`).

    Raises:
        SearchFolderError: no ``search.json``, or a file that is not JSON or not of its shape (an object,
            a list of records).
    """
    folder = Path(folder)
    now = time.time() if now is None else now
    if not (folder / SEARCH_FILE).is_file():
        raise SearchFolderError(f"{folder} is not a search folder (no search.json)")
    settings = read_json(folder / SEARCH_FILE, {}, shape="object")
    trials = read_json(folder / TRIALS_FILE, [], shape="records")
    result = read_json(folder / RESULT_FILE, None, shape="object")
    progress = read_progress(folder)
    counts: dict[str, int] = {}
    for t in trials:
        status = str(t.get("status") or "without a status")  # a hand-edited record: not counted as running
        counts[status] = counts.get(status, 0) + 1
    rungs = list(settings.get("rungs") or [])
    top = rungs[-1] if rungs else (settings.get("training") or {}).get("max_train_examples")
    limit = settings.get("param_limit")
    best = best_any = None
    for t in trials:
        for row in t.get("rows") or []:
            if not is_finite(row.get("score")):
                continue
            if best_any is None or row["score"] > best_any["score"]:
                best_any = {"trial_id": t["trial_id"], "score": row["score"], "examples_seen": row.get("examples_seen")}
            at_top = top is not None and row.get("examples_seen") == top
            fits = limit is None or (row.get("trainable_params") or 0) <= limit
            if t.get("status") == "finished" and at_top and fits and (best is None or row["score"] > best["score"]):
                best = {"trial_id": t["trial_id"], "score": row["score"], "trainable_params": row.get("trainable_params")}
    running = []
    running_ids = [t["trial_id"] for t in trials if t.get("status") == "running"]
    for tid in running_ids + [p for p in progress if p not in running_ids and result is None]:
        p = progress.get(tid)
        running.append({"trial_id": tid, "examples_seen": p.get("examples_seen") if p else 0,
                        "top": p.get("top", top) if p else top, "rung": int(p.get("rung", 0)) + 1 if p else None,
                        "rungs": len(p.get("rungs") or rungs) if p else len(rungs), "loss": p.get("loss") if p else None,
                        "age_s": now - p["updated"] if p and is_finite(p.get("updated")) else None})
    started = (folder / SEARCH_FILE).stat().st_mtime
    driver = read_driver(folder)
    if result is not None:
        state, elapsed = "finished", float(result.get("wall_time_s", 0.0))
        running = []
    elif driver is not None:
        state = "running" if driver_alive(driver, now) else "interrupted"
        until = now if state == "running" else (driver.get("ended") or driver.get("heartbeat") or now)
        elapsed = float(driver.get("elapsed_before_s") or 0.0) + max(0.0, until - float(driver.get("started", until)))
    else:
        files = [folder / TRIALS_FILE, folder / SEARCH_FILE, *(folder / PROGRESS_DIR).glob("*.json")]
        last = max((f.stat().st_mtime for f in files if f.is_file()), default=started)
        state = "running" if now - last < STALE_AFTER_S else "stopped"
        elapsed = (now if state == "running" else last) - started
    return SearchStatus(folder, state, elapsed, counts, best, best_any, running, settings)


def format_status(st: SearchStatus) -> list[str]:
    """The lines ``autopeft status`` prints."""
    from autopeft.data.tasks import metric_name  # lazily: `status` stays quick to import

    s = st.settings
    metric = metric_name(s.get("task"))
    state = (f"interrupted (the driver is gone; continue with `autopeft resume {st.path.name}`)"
             if st.state == "interrupted" else st.state)
    lines = [f"search {st.path.name}: {state}, {st.elapsed_s / 60:.1f} min; task {s.get('task')}, budget "
             f"{s.get('budget')} = {s.get('param_limit', 0):,} parameters, searcher {s.get('searcher')}, "
             f"{s.get('trials')} trials"]
    total = sum(st.counts.values())
    lines.append(f"trials: {total} ({', '.join(f'{v} {k}' for k, v in sorted(st.counts.items())) or ('none yet' if st.state == 'running' else 'none')})")
    if st.best:
        lines.append(f"best at the top fidelity: trial {st.best['trial_id']} {metric}={st.best['score']:.4f} "
                     f"({st.best['trainable_params']:,} trainable parameters)")
    elif st.best_any_rung:
        b = st.best_any_rung
        lines.append(f"best so far (no trial at the top fidelity yet): trial {b['trial_id']} {metric}={b['score']:.4f} "
                     f"at {b['examples_seen']:,} examples")
    else:
        lines.append("best so far: none (no rung reached yet)")
    for r in st.running:
        if r["rung"] is None:
            lines.append(f"running: trial {r['trial_id']} (no progress reported)")
            continue
        loss = f", loss {r['loss']:.4f}" if is_finite(r["loss"]) else ""
        age = f", updated {r['age_s']:.0f}s ago" if r["age_s"] is not None else ""
        lines.append(f"running: trial {r['trial_id']} {r['examples_seen']:,}/{r['top']:,} examples, "
                     f"rung {r['rung']}/{r['rungs']}{loss}{age}")
    return lines
