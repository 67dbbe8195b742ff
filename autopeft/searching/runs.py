"""The search-run folder, ``autopeft_runs/<search>/``: its file names, finding a search, picking a point.

This module is the one owner of the folder's layout; every other module takes its file names from
here. What each file holds:

==========================  =====================================================================
``search.json``             the settings a search started with (:data:`SEARCH_FILE`; marks a search)
``trials.json``             every trial and rejected sample, kept current while the search runs
``pareto.json`` / ``.csv``  the front at the top fidelity (:data:`PARETO_FILE`; marks a finished one)
``result.json``             summary: fidelity, parameter limit, hypervolume (:data:`RESULT_FILE`)
``reference.json``          the ``--reference`` run, when asked for
``one_shot.json``           the ``--one-shot`` proposals (:data:`ONE_SHOT_FILE`)
``best_recipe.yaml``        the front's best point as a recipe; ``pareto.png`` its plot
``resume.json``             arguments and MLflow parent run for ``autopeft resume``
``checkpoint.pkl``          the searcher's and scheduler's state (:mod:`autopeft.searching.resume`)
``trained/<trial id>/``     the kept weights of each top-fidelity trial (:func:`kept_dir`)
``progress/``, ``driver.json``  live progress and the driver's heartbeat (``autopeft status``)
==========================  =====================================================================

A search is named by its folder, by a name under ``output_dir`` (``autopeft_runs``), or by
``latest`` (:func:`find_search`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from autopeft._util import is_finite
from autopeft.errors import AutopeftError

#: Default parent folder of the search folders.
RUNS_DIR = "autopeft_runs"
SEARCH_FILE = "search.json"
TRIALS_FILE = "trials.json"
PARETO_FILE = "pareto.json"
PARETO_CSV = "pareto.csv"
PARETO_PLOT = "pareto.png"
RESULT_FILE = "result.json"
REFERENCE_FILE = "reference.json"
#: The ``--one-shot`` proposals and gate importances, made before the first trial.
ONE_SHOT_FILE = "one_shot.json"
BEST_RECIPE_FILE = "best_recipe.yaml"
REQUEST_FILE = "resume.json"
CHECKPOINT_FILE = "checkpoint.pkl"
#: Folder of a search that keeps its trials' trained weights (one sub-folder per trial id).
TRAINED_SUBDIR = "trained"
#: In a kept-weights folder: content hashes of the data files and backbone folder the weights were
#: trained on (:func:`autopeft.exporting.hf_export.training_inputs`), so an export reuses them only for those.
TRAINED_ON_FILE = "trained_on.json"
#: What a finished search logs to MLflow as artifacts, in this order.
ARTIFACT_FILES = (PARETO_FILE, PARETO_CSV, PARETO_PLOT, BEST_RECIPE_FILE, TRIALS_FILE, REFERENCE_FILE)

#: Named picks of a Pareto point (:func:`pick_point`); an index or a trial id also picks one.
PICKS = ("best", "smallest", "leanest", "smallest-within-noise")


class SearchNotFoundError(AutopeftError, ValueError):
    """``export`` was given a search that does not exist or has no results."""


class SearchFolderError(AutopeftError, ValueError):
    """The folder is not a search folder (no ``search.json``), or its files cannot be read."""


def find_search(search: str | Path, output_dir: str | Path = RUNS_DIR, finished: bool = True) -> Path:
    """A search folder from a path, a search name under ``output_dir``, or ``latest`` (the newest).

    Args:
        finished: look for a finished search (its ``pareto.json``); else any search (its ``search.json``),
            running or not.

    Raises:
        SearchNotFoundError: ``finished`` and no such finished search.
        SearchFolderError: not ``finished`` and no such search.
    """
    marker = PARETO_FILE if finished else SEARCH_FILE
    error = SearchNotFoundError if finished else SearchFolderError
    kind = "finished search" if finished else "search"
    p = Path(search)
    if str(search) == "latest":
        runs = sorted(Path(output_dir).glob(f"*/{marker}"), key=lambda f: f.stat().st_mtime)
        if not runs:
            raise error(f"no {kind} under {output_dir}")
        return runs[-1].parent
    for cand in (p, Path(output_dir) / p):
        if (cand / marker).is_file():
            return cand
    looked = list(dict.fromkeys(str(c / marker) for c in (p, Path(output_dir) / p)))  # an absolute path once
    raise error(f"no {kind} {str(search)!r} (looked for {' and '.join(looked)})")


def kept_dir(search_dir: str | Path, trial_id: str) -> Path:
    """Where trial ``trial_id`` of the search in ``search_dir`` keeps its trained weights."""
    return Path(search_dir) / TRAINED_SUBDIR / trial_id


_SHAPES = {"object": ("a JSON object", lambda v: isinstance(v, dict)),
           "records": ("a list of records (JSON objects)",
                       lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v))}


def read_json(path: Path, default: Any = None, shape: str | None = None) -> Any:
    """The JSON in ``path``, or ``default`` when there is no such file.

    Args:
        shape: ``"object"`` (``search.json``, ``result.json``) or ``"records"`` (``trials.json``,
            ``pareto.json``): the file must hold that, or it is not the search's file.

    Raises:
        SearchFolderError: the file exists but cannot be read, is not JSON, or is not of ``shape``.
    """
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SearchFolderError(f"cannot read {path}: {exc}") from None
    if shape is not None and not _SHAPES[shape][1](value):
        raise SearchFolderError(f"cannot read {path}: not {_SHAPES[shape][0]}")
    return value


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: into a temporary file beside it, then renamed over it.

    ``autopeft status``, ``export`` and ``resume`` read a search folder's files while the search writes
    them; a reader sees the old file or the new one, never half of one. Values JSON cannot hold are
    written as their ``str``.

    Raises:
        OSError: the folder cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=indent, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def settings_of(folder: Path) -> dict[str, Any]:
    """The settings a search started with (its ``search.json``), for messages and model cards: ``{}``
    when there is none or it cannot be read."""
    try:
        return read_json(Path(folder) / SEARCH_FILE, {}, shape="object")
    except SearchFolderError:
        return {}


def pick_point(search: str | Path, pick: str = "best", output_dir: str | Path = RUNS_DIR) -> tuple[Path, dict]:
    """``(search folder, Pareto row)`` of one point of a finished search.

    The row is as in ``pareto.json``: ``trial_id``, ``score``, ``trainable_params``, ``recipe``, ...

    Args:
        pick: ``best`` (highest dev score), ``smallest`` (fewest trainable parameters), ``leanest``
            (least memory), ``smallest-within-noise`` (fewest trainable parameters among the points whose
            dev score is at least the lower end of the best point's 95% interval,
            :func:`autopeft.data.uncertainty.within_noise`), a 0-based index into the front (best score
            first), or a trial id. Every pick reads dev scores only, never test.

    Raises:
        SearchNotFoundError: no such search or an empty front; ValueError: unknown ``pick``;
        SearchFolderError: its ``pareto.json`` cannot be read or is not a list of points (records).
    """
    folder = find_search(search, output_dir)
    rows = read_json(folder / PARETO_FILE, [], shape="records")
    front = [r for r in rows if is_finite(r.get("score"))]
    if not front:
        raise SearchNotFoundError(f"search {folder} has an empty Pareto front (no trial finished within budget)")
    if pick == "best":
        row = max(front, key=lambda r: (r["score"], -r["trainable_params"]))
    elif pick == "smallest":
        row = min(front, key=lambda r: (r["trainable_params"], -r["score"]))
    elif pick == "leanest":  # a row without a memory figure (an older search) is never the leanest
        row = min(front, key=lambda r: (r.get("peak_memory_bytes") if is_finite(r.get("peak_memory_bytes"))
                                        else math.inf, -r["score"]))
    elif pick == "smallest-within-noise":
        from autopeft.data.uncertainty import within_noise

        row = min(within_noise(front), key=lambda r: (r["trainable_params"], -r["score"]))
    elif pick.isascii() and pick.isdigit():  # str.isdigit() is true for '²', which int() refuses
        if int(pick) >= len(front):
            raise ValueError(f"pick {pick} is out of range: the front has {len(front)} point{'s' if len(front) != 1 else ''} (0-{len(front) - 1})")
        row = front[int(pick)]
    else:
        matches = [r for r in front if r["trial_id"] == pick]
        if not matches:
            ids = ", ".join(r["trial_id"] for r in front)
            raise ValueError(f"unknown pick {pick!r}; use {', '.join(PICKS)}, an index, or a trial id ({ids})")
        row = matches[0]
    return folder, row
