"""The Python API behind the CLI: ``search``, ``export``, ``train``, ``count``.

Example::

    import autopeft
    result = autopeft.search(task="sst2", budget="0.5%", data_dir="../shared/data/glue")
    recipe = autopeft.export(result.path, pick="best", output="best.yaml")
    trained = autopeft.train(recipe, data_dir="../shared/data/glue", output_dir="outputs/best")
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import numbers
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from autopeft.searching.budget import Budget, parse_budget
from autopeft.composition.recipe import Recipe, count_recipe, load_recipe, recipe_from_dict
from autopeft.errors import AutopeftError
from autopeft._util import is_finite
# The run folder's owner; re-exported here, their old home.
from autopeft.searching.runs import (  # noqa: F401
    BEST_RECIPE_FILE, PARETO_CSV, PARETO_FILE, PARETO_PLOT, PICKS, REFERENCE_FILE, RESULT_FILE, RUNS_DIR, SEARCH_FILE,
    ONE_SHOT_FILE, TRIALS_FILE, SearchNotFoundError, find_search, pick_point, read_json, write_json,
)



class SearchSettingsError(AutopeftError, ValueError):
    """Search settings that cannot work, caught before anything starts: a ``--name`` that is not a
    plain folder name, resources no trial can get, a budget below the space's smallest configuration,
    a preset (counting-only) backbone, a Ray Client (``ray://``) address."""


#: Dev examples a search's trials score at a rung below the top fidelity (a seeded sample, the same for
#: every trial; the top rung reads all of dev): ``training.rung_eval_examples`` of the trials' recipes,
#: unless ``training`` sets it (``None``: all of dev at every rung). Scoring all 2,000 SST-2 dev examples
#: at every rung was the largest part of a default run outside training; why 500 and what it costs the
#: scheduler's decisions: ``experiments/search_overhead.md``.
RUNG_EVAL_EXAMPLES = 500

#: A search name is one folder below ``output_dir``.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_numbers(trials: Any, seed: Any, cpus_per_trial: Any, gpus_per_trial: Any, max_train_examples: Any,
                   confirm_seeds: Any) -> None:
    """Raise :class:`SearchSettingsError` (one line, naming the argument) for a count or resource of
    :func:`search` that is not a number it can use. Was (the Python API; the CLI checked its own):
    ``trials=0`` or ``-2`` wrote a finished search of no trials, ``trials=1.5`` and
    ``cpus_per_trial=-1`` went on into Ray Tune, ``gpus_per_trial=-1`` counted as GPUs (32 trials, no
    time cap)."""
    def whole(v: Any) -> bool:  # numpy integers too
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    for arg, value, ok, want in (
            ("trials", trials, trials is None or (whole(trials) and trials >= 1), "a whole number >= 1"),
            ("seed", seed, whole(seed), "a whole number"),
            ("cpus_per_trial", cpus_per_trial, cpus_per_trial is None or (real(cpus_per_trial) and cpus_per_trial > 0),
             "a positive number of CPUs"),
            ("gpus_per_trial", gpus_per_trial, gpus_per_trial is None or (real(gpus_per_trial) and gpus_per_trial >= 0),
             "a number of GPUs >= 0"),
            ("max_train_examples", max_train_examples,
             max_train_examples is None or (whole(max_train_examples) and max_train_examples >= 1),
             "a whole number of examples >= 1"),
            ("confirm_seeds", confirm_seeds, whole(confirm_seeds) and confirm_seeds >= 0, "a whole number >= 0")):
        if not ok:
            raise SearchSettingsError(f"{arg} must be {want}, got {value!r}")


def _check_search_settings(name: str | None, backbone: Any, cpus: float, gpus: float, ray_address: str | None) -> None:
    """Raise :class:`SearchSettingsError` (one line) for settings that cannot work (see there)."""
    if name is not None and (not _NAME.fullmatch(name) or ".." in name):
        raise SearchSettingsError(f"--name {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
                                  "no '/' or '..'): the search folder is <output-dir>/<name>")
    if isinstance(backbone, dict) and "preset" in backbone:
        raise SearchSettingsError(f"backbone preset {backbone['preset']!r} describes sizes for counting only (random "
                                  "weights): search with a Hugging Face id, a local folder or minilm-l6")
    if ray_address and ray_address.strip().lower().startswith("ray://"):
        raise SearchSettingsError(f"--ray-address {ray_address} goes through Ray Client, which runs Ray Tune on the "
                                  "head node, so the search's trial records would stay there: run autopeft on a "
                                  "machine of the cluster with --ray-address <head-ip>:6379 (or auto)")
    if ray_address:  # a cluster's resources are checked once connected (autopeft.searching.tune.run_tune)
        return
    have_cpus, have_gpus = os.cpu_count() or 1, _cuda_devices()
    if cpus > have_cpus:
        raise SearchSettingsError(f"--cpus-per-trial {cpus:g} exceeds this machine's {have_cpus} CPUs: no trial "
                                  "could start")
    if gpus > have_gpus:
        raise SearchSettingsError(f"--gpus-per-trial {gpus:g} exceeds this machine's {have_gpus} GPUs: no trial "
                                  "could start")


@dataclass
class SearchResult:
    """What a search produced.

    Attributes:
        path: the search folder (``trials.json``, ``pareto.json/csv/png``, ``best_recipe.yaml``).
        trials: every trial's record (dicts, see ``TrialRecord.as_dict``).
        pareto: the Pareto-front rows (within budget, top fidelity), best score first.
        fidelity: training examples at which the front was compared.
        param_limit: the budget in parameters.
        hypervolume: of the normalised front (see ``front_hypervolume``).
        mlflow_run_id: the parent run.
        wall_time_s: seconds the search ran, all its sessions together: after a resume, this
            session's time plus the earlier sessions' running time by the resume checkpoint's clock
            (:func:`autopeft.searching.resume.elapsed_before`; a killed session's time after its last
            checkpoint is not counted). Also ``result.json``'s ``wall_time_s``.
    """

    path: Path
    trials: list[dict]
    pareto: list[dict]
    fidelity: int
    param_limit: int
    hypervolume: float
    mlflow_run_id: str | None
    wall_time_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    #: The ``--reference`` run (:func:`autopeft.searching.final.train_reference`), else ``None``.
    reference: dict[str, Any] | None = None
    #: Where this session's wall time went, seconds (:func:`time_breakdown`); also ``result.json``'s ``time_s``.
    time_s: dict[str, float] = field(default_factory=dict)


def time_breakdown(trials: list[dict], timings: dict[str, float], wall_s: float) -> dict[str, float]:
    """Where a search's ``wall_s`` seconds went (after a resume: every session's, as ``wall_time_s``).

    ``prepare_s`` (settings, splits, MLflow parent run, start points), ``ray_start_s``, ``tune_s``
    (Ray Tune's loop) and ``finish_s`` (front scored on test, files written) come from ``timings``
    (the last session's);
    ``training_s``, ``trial_setup_s`` and ``trial_eval_s`` sum every trial's last rung row
    (``train_time_s``, ``setup_time_s``, ``eval_time_s``: training steps, data and model build before
    the first step, scoring the rungs); a trial cut by the time budget between rungs counts its
    training up to the cut (``cut.train_time_s``), which no row holds; ``outside_training_share`` is ``1 - training_s / wall_s``
    (issue 16's target: at most 0.10). Trials that ran at once overlap, so on a GPU packing several
    trials the sums can exceed ``tune_s``.
    """
    last = [t["rows"][-1] for t in trials if t.get("rows")]
    out = {k: float(v) for k, v in timings.items()}
    out["wall_s"] = float(wall_s)
    for key, row_key in (("trial_setup_s", "setup_time_s"), ("trial_eval_s", "eval_time_s")):
        out[key] = float(sum(r.get(row_key) or 0.0 for r in last))
    out["training_s"] = float(sum(max((t["rows"][-1].get("train_time_s") or 0.0) if t.get("rows") else 0.0,
                                      (t.get("cut") or {}).get("train_time_s") or 0.0)
                                  for t in trials))
    out["outside_training_share"] = 1.0 - out["training_s"] / wall_s if wall_s > 0 else float("nan")
    return out


def default_resources(trial_bytes: int | None = None) -> tuple[float, float]:
    """``(cpus_per_trial, gpus_per_trial)``: on GPUs as many trials per GPU as fit in its memory
    (:func:`autopeft.backbones.memory.trials_per_gpu` of ``trial_bytes``, at most 8; one per GPU without an
    estimate), the cores shared among them; without GPUs one trial using every core."""
    import torch

    cpus = os.cpu_count() or 1
    gpus = _cuda_devices()
    if gpus:
        from autopeft.backbones.memory import trials_per_gpu

        per_gpu = trials_per_gpu(torch.cuda.get_device_properties(0).total_memory, trial_bytes) if trial_bytes else 1
        return max(1, cpus // (gpus * per_gpu)), 1 / per_gpu
    return cpus, 0


def _cuda_devices() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trial_bytes_estimate(bare, param_limit: int) -> int:
    """Planning estimate of a trial's peak memory (bytes) for a search: the backbone of the ``bare``
    recipe (no components) stored as its precision trains it, the largest within-budget trial
    (``param_limit`` trainable parameters plus the head) and its activations at the recipe's batch
    size and ``max_seq_length`` (:func:`autopeft.backbones.memory.estimate_trial_bytes`)."""
    from autopeft.backbones import load_config
    from autopeft.backbones.memory import estimate_trial_bytes
    from autopeft.data.tasks import get_task

    from autopeft.composition.recipe import backbone_weight_bytes

    counts = count_recipe(bare)
    tr = bare.training
    half = tr.precision in ("bf16", "fp16")
    cfg = load_config(bare.backbone, get_task(bare.task).num_labels)
    return estimate_trial_bytes(backbone_weight_bytes(bare)["bf16" if half else "fp32"], param_limit + counts.head_params,
                                cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, tr.batch_size,
                                tr.max_seq_length, activation_bytes=2 if half else 4)


def search(task: str = "sst2", budget: str | Budget = "0.5%", backbone: str | dict = "minilm-l6",
           space: str = "default", trials: int | None = None, time_budget_s: float | None = None,
           data_dir: str | None = None, tracking_uri: str | None = None, experiment: str = "autopeft",
           name: str | None = None, output_dir: str | Path = RUNS_DIR, ray_address: str | None = None,
           cpus_per_trial: float | None = None, gpus_per_trial: float | None = None, seed: int = 0,
           training: dict[str, Any] | None = None, max_train_examples: int | None = None,
           searcher: str = "tpe", one_shot: bool = False,
           text_columns: str | list[str] | None = None, label_column: str | None = None, metric: str | None = None,
           progress: Callable[[str], None] | None = print, resume: bool = False, confirm_seeds: int = 0,
           reference: str | None = None) -> SearchResult:
    """Search PEFT configurations for ``task`` under ``budget``; returns the Pareto front.

    (Its body stays one sequence, longer than most: the checks in the order they fail, then the
    folder, MLflow run and heartbeat that two ``try`` blocks must end whatever happens; the steps that
    stand alone are the ``_search_space`` ... ``_finish_front`` helpers below it; the front itself is
    :func:`autopeft.searching.pareto.search_front`.)

    Args:
        task: a built-in task name (GLUE, ``mnli``/``mnli-mm``, ``qqp``, ``superglue-boolq``/``-cb``/``-rte``),
            a CSV / TSV / JSON Lines / Parquet file or folder, ``hf:<dataset id>[:<config>]``, or a
            task spec mapping (see :mod:`autopeft.data.userdata`).
        budget: ``"0.5%"``, ``"0.005"``, ``"120k"`` or a :class:`Budget` (trainable parameters without head).
        backbone: ``minilm-l6``, a Hugging Face id/path, or a bare config mapping.
        space: a shipped search space name or a YAML path.
        trials: trials to train (default: 30 on CPU, 32 on GPU); rejected samples do not count.
        time_budget_s: wall-clock cap in seconds (default: 26 minutes on CPU, none on GPU; ``math.inf``: none).
        data_dir: local GLUE folder (else ``$AUTOPEFT_DATA_DIR``, else the hub).
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlflow.db``).
        experiment: MLflow experiment name.
        name: search name (default: ``<task>-<timestamp>``); results go to ``output_dir/name``.
        ray_address: an existing Ray cluster (``host:port`` of its head or ``auto``; ``ray://`` is refused);
            default a local one.
        cpus_per_trial / gpus_per_trial: Ray resources per trial (default: see :func:`default_resources`).
        seed: seeds the sampler and every trial.
        training: overrides of the trials' training settings (e.g. ``{"batch_size": 16}``;
            ``{"rung_eval_examples": None}`` scores all of dev at every rung, see :data:`RUNG_EVAL_EXAMPLES`).
        max_train_examples: top fidelity (training examples) instead of the space's; the first rung
            scales with it (``max / reduction_factor^2``). Small values make quick, rough searches.
        searcher: ``tpe`` (default), ``random``, ``nsga2`` or ``qnehvi`` (see :mod:`autopeft.searching.searchers`).
        one_shot: before the trials, train one gated model holding every component of the space and
            add its best within-budget subsets as start points (:mod:`autopeft.searching.oneshot`).
        progress: receives one-line progress messages (``None``: silent).
        confirm_seeds: after the search, retrain each Pareto point with this many more training seeds
            and report the mean and standard deviation of its test scores
            (:func:`autopeft.searching.final.confirm_seeds`).
        reference: ``"full"``: after the search, train full fine-tuning at the top fidelity on the same
            splits and report its dev and test scores beside the front (:func:`autopeft.searching.final.train_reference`).

        resume: continue the interrupted search ``name`` in ``output_dir`` (the same options, except
            resources; or use :func:`resume`): finished trials are kept with their ids and scores, the
            trial that was running is re-run from the start under its id, the sampler and scheduler
            go on from their saved state, and MLflow keeps the same parent run
            (:mod:`autopeft.searching.resume`). Without it, an existing ``name`` is an error, never overwritten.
        text_columns / label_column: the text column(s) (``"a,b"`` or a list) and the label column
            of user data (defaults ``text`` or ``sentence``, and ``label``).
        metric: the metric to maximise (default: the task's first; user data: ``accuracy`` for
            classes, ``pearson`` for regression; also ``f1_macro``, ``mcc``, ``spearman``).

    Splits: trials train on train less a seeded, stratified **dev** split
    (:func:`autopeft.data.tasks.default_dev_examples` rows) and are scored on dev; every search decision
    reads dev only. The task's validation split is the **test** split (user data without one: its
    seeded held-out part), read once after the search, for the front's kept models
    (:mod:`autopeft.searching.final`). The sizes are in ``search.json`` (``splits``) and on the MLflow parent run.

    Raises:
        BudgetError, TaskError, BackboneError, SearchSpaceError, SearcherError: bad input, before
            anything starts.
        ResumeError: ``name`` exists without ``resume``; with it, no such search, a finished one, or
            other settings than it was started with (:mod:`autopeft.searching.resume`).
        RuntimeError: Ray could not start.
        SearchInterrupted: Ctrl-C (SIGINT) or SIGTERM (a ``KeyboardInterrupt``): the running trials
            are recorded ``interrupted``, no MLflow run is left ``RUNNING`` (the parent is tagged
            ``status=interrupted``), no ``result.json`` is written, and :func:`resume` finishes the
            search (:mod:`autopeft.searching.interrupt`).
    """
    from autopeft.backbones import load_config
    from autopeft.searching.pareto import front_hypervolume, search_front
    from autopeft.searching.tune import TuneSettings, run_tune
    from autopeft.data.tasks import get_task, resolve_data_dir
    from autopeft.data.userdata import resolve_task
    from autopeft.searching.tracking import SearchTracker, default_tracking_uri

    from autopeft.searching.interrupt import raise_on_stop_signals
    from autopeft.searching.resume import ResumeError, check_same_settings, elapsed_before, open_search_folder, write_request
    from autopeft.searching.liveness import DRIVER_FILE, DriverBeacon

    request = _search_request(locals())  # the arguments as given, for `autopeft resume`
    t0 = time.time()
    _check_numbers(trials, seed, cpus_per_trial, gpus_per_trial, max_train_examples, confirm_seeds)
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    task_value = resolve_task(task, text_columns, label_column, metric, seed)  # bad data fails here, first
    task_obj = get_task(task_value)
    config = load_config(backbone, task_obj.num_labels)  # fails fast on an unknown backbone
    sp, space_notes = _search_space(space, config, searcher, seed, max_train_examples)
    sp, fixed_notes = sp.with_training(training or {})  # --batch-size etc. win over the space's own values
    space_notes = [*space_notes, *fixed_notes]
    root = resolve_data_dir(data_dir)
    _check_reference(reference)
    base = {"backbone": backbone, "task": task_value,
            "training": {"max_train_examples": sp.fidelity.max_train_examples,
                         "schedule_examples": sp.fidelity.max_train_examples, "seed": seed,
                         "rung_eval_examples": RUNG_EVAL_EXAMPLES, **(training or {})}}
    backbone_params = _checked_backbone_params(base, backbone)
    limit = budget.limit(backbone_params)
    packing = None
    if gpus_per_trial is None and _cuda_devices() and not (isinstance(backbone, dict) and "preset" in backbone):
        packing = trial_bytes_estimate(recipe_from_dict({**base, "components": []}), limit)
    cpus, gpus = default_resources(packing)
    cpus, gpus = cpus_per_trial or cpus, gpus if gpus_per_trial is None else gpus_per_trial
    _check_search_settings(name, backbone, cpus, gpus, ray_address)
    _check_budget_fits(sp, base, budget, limit)
    if trials is None:  # on CPU the 26-minute cap, not the count, usually ends the search
        trials = 32 if gpus else 30
    if time_budget_s is None and not gpus:
        time_budget_s = 26 * 60
    elif time_budget_s is not None and math.isinf(time_budget_s):
        time_budget_s = None  # math.inf: no cap, on CPU too
    if time_budget_s is not None and not time_budget_s > 0:
        raise SearchSettingsError(f"time_budget_s must be positive seconds or math.inf (no cap), got {time_budget_s}")
    if resume and not name:
        raise ResumeError("--resume needs the --name of the search to continue")
    name = name or f"{task_obj.name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(output_dir).resolve() / name
    stored = open_search_folder(out, resume)  # an existing search is never overwritten
    if stored:
        _as_started(base["training"], out, training or {})
    splits, base["dev"] = _splits(task_obj, root, seed)  # fails fast on a folder without the task
    before_s = elapsed_before(out) if stored else 0.0  # seconds the earlier sessions ran (a resume)
    settings = {"task": task_value, "budget": str(budget), "param_limit": limit, "backbone": backbone,
                "backbone_params": backbone_params, "space": sp.name,
                "space_source": str(Path(sp.source).resolve()) if sp.source else sp.source,
                "space_fingerprint": sp.fingerprint, "trials": trials,
                "time_budget_s": time_budget_s,
                "rungs": sp.fidelity.search_rungs(int(base["training"].get("batch_size", 32))), "seed": seed,
                "searcher": searcher, "scheduler": f"MO-ASHA (reduction factor {sp.fidelity.reduction_factor})",
                "one_shot": one_shot, "splits": splits, "confirm_seeds": confirm_seeds, "reference": reference,
                "cpus_per_trial": cpus, "gpus_per_trial": gpus, "ray_address": ray_address,
                "data_dir": str(root) if root else None, "training": base["training"]}
    if stored:
        check_same_settings(out, settings)
    uri = tracking_uri or (stored["mlflow"]["tracking_uri"] if stored else None) or default_tracking_uri()
    # MLflow first: a tracking store that cannot be opened leaves no half-made search folder behind
    tracker = SearchTracker(uri, experiment, name, settings,
                            parent_run_id=stored["mlflow"]["parent_run_id"] if stored else None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SEARCH_FILE, settings)
    (out / DRIVER_FILE).unlink(missing_ok=True)  # a killed session's; this one's is written below
    if not stored:
        write_request(out, request, uri, experiment, tracker.parent_id)
    if progress:
        _announce(progress, settings, name, task_obj, budget, uri, tracker.parent_id, space_notes)
        if packing:
            import torch

            gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            progress(f"GPU packing: {round(1 / gpus)} trial(s) per GPU (gpus_per_trial {gpus:g}): a trial's estimated "
                     f"peak {packing / 2**30:.1f} GiB of the GPU's {gpu_gib:.0f} GiB; --gpus-per-trial overrides it")
    beacon = DriverBeacon(out, before_s, started=t0).start()  # driver.json: pid + heartbeat, for `autopeft status`
    restore_signals = raise_on_stop_signals()  # SIGTERM, as Ctrl-C, ends the search resumable: not killed
    try:
        start_points = _start_points(sp, one_shot, bool(stored), out, base, limit, root, progress)
        tune_settings = TuneSettings(num_samples=trials, time_budget_s=time_budget_s, cpus_per_trial=cpus,
                                     gpus_per_trial=gpus, ray_address=ray_address, seed=seed,
                                     storage_path=str(out), device=None, searcher=searcher,
                                     start_points=start_points, resume=bool(stored))
        timings = {"prepare_s": time.time() - t0}
        records = run_tune(sp, base, limit, tune_settings, str(root) if root else None, tracker, progress, timings)
        t_finish = time.time()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: resumable, the parent run marked interrupted
        restore_signals()
        raise _interrupted(exc, out, tracker, beacon) from None
    except BaseException as exc:
        restore_signals()
        beacon.stop()
        tracker.fail(f"{type(exc).__name__}: {exc}")
        raise
    try:  # the results: a failure here still ends the parent run and the heartbeat
        trials_out = [r.as_dict() for r in records.values()]
        top = sp.fidelity.max_train_examples
        front = search_front(records, top, limit)
        hv = front_hypervolume(front, limit)  # of the dev scores: what the search optimised
        _finish_front(front, out, base, str(root) if root else None, confirm_seeds, reference, tracker, progress)
        _write_results(out, trials_out, front, task_obj.metric, limit, settings["rungs"])
        pareto_ids = {row["trial_id"] for row in front}
        from autopeft.searching.tracking import STATUSES

        counts = {s: sum(1 for r in records.values() if r.status == s) for s in STATUSES}
        t_end = time.time()  # one clock reading: result.json's wall_time_s equals its time_s.wall_s
        wall = before_s + t_end - t0  # the whole search's running time, earlier sessions included
        tracker.finish(pareto_ids, out, {"hypervolume": hv, "pareto_size": len(front), "wall_time_s": wall,
                                         **{f"trials_{k}": v for k, v in counts.items()},
                                         **({"best_score": front[0]["score"]} if front else {}),
                                         **({"best_test_score": front[0]["test_score"]}
                                            if front and is_finite(front[0].get("test_score")) else {})})
        ref = json.loads((out / REFERENCE_FILE).read_text()) if reference and (out / REFERENCE_FILE).is_file() else None
        spent = time_breakdown(trials_out, timings | {"finish_s": t_end - t_finish}, wall)
        result = SearchResult(out, trials_out, front, top, limit, hv, tracker.parent_id, wall, settings, ref, spent)
        write_json(out / RESULT_FILE, {"fidelity": top, "param_limit": limit, "hypervolume": hv,
                                        "mlflow_run_id": tracker.parent_id, "tracking_uri": uri, "wall_time_s": wall,
                                        "counts": counts, "time_s": spent})
    except KeyboardInterrupt as exc:  # while the results were written: no result.json, resumable
        restore_signals()
        raise _interrupted(exc, out, tracker, beacon) from None
    except BaseException as exc:
        tracker.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        restore_signals()
        beacon.stop()
    return result


def _search_space(space: str, config, searcher: str, seed: int, max_train_examples: int | None):
    """``(space, notes)``: the search space for this backbone (without the methods it cannot run; the
    notes say which), its top fidelity ``max_train_examples`` when given; checks the searcher.

    Raises:
        SearchSpaceError, SearcherError: one line.
    """
    from autopeft.searching.searchers import SEARCHERS, SearcherError, make_sampler
    from autopeft.searching.space import SearchSpace

    sp, space_notes = SearchSpace.load(space).for_backbone(config)  # drops methods the backbone cannot run
    if searcher not in SEARCHERS:
        raise SearcherError(f"unknown searcher {searcher!r}; valid: {', '.join(SEARCHERS)}")
    if searcher == "qnehvi":
        make_sampler(searcher, seed)  # fails fast when BoTorch is missing
    if max_train_examples is not None:
        from dataclasses import replace

        rf = sp.fidelity.reduction_factor  # max_train_examples >= 1: _check_numbers
        sp.fidelity = replace(sp.fidelity, max_train_examples=max_train_examples,
                              min_train_examples=max(1, round(max_train_examples / rf**2)))
    if sp.num_layers and sp.num_layers != config.num_hidden_layers:
        from autopeft.searching.space import SearchSpaceError

        raise SearchSpaceError(f"search space {sp.name!r} has per_layer num_layers={sp.num_layers}, but the backbone "
                               f"has {config.num_hidden_layers} layers")
    return sp, space_notes


def _check_reference(reference: str | None) -> None:
    """Raise :class:`SearchSettingsError` for an unknown ``--reference``."""
    from autopeft.searching.final import REFERENCES

    if reference is not None and reference not in REFERENCES:
        raise SearchSettingsError(f"unknown --reference {reference!r}; valid: {', '.join(REFERENCES)}")


def _checked_backbone_params(base: dict[str, Any], backbone: Any) -> int:
    """The backbone's parameters (counted on the meta device), after checking that a trial could train
    it (a preset is refused by :func:`_check_search_settings`, with its own line)."""
    bare = recipe_from_dict({**base, "components": []})
    backbone_params = count_recipe(bare).backbone_params
    if not (isinstance(backbone, dict) and "preset" in backbone):  # presets: refused below, with their own line
        from autopeft.composition.recipe import check_recipe

        check_recipe(bare, for_training=True)  # what no trial could train (a bare config's vocabulary): one line
    return backbone_params


def _check_budget_fits(sp, base: dict[str, Any], budget: Budget, limit: int) -> None:
    """Raise :class:`SearchSettingsError` when the space's smallest configuration exceeds the budget."""
    point, smallest = sp.smallest_point(base)
    if smallest > limit:
        raise SearchSettingsError(f"budget {budget} = {limit:,} trainable parameters is below the smallest configuration "
                                  f"of space {sp.name!r} on this backbone ({sp.describe_point(point)}: {smallest:,}): "
                                  f"raise --budget to at least {smallest:,}")


def _as_started(base_training: dict[str, Any], out: Path, training: dict[str, Any]) -> None:
    """A resumed search keeps the rung sample it started with (its ``search.json`` training).

    Without the user's ``rung_eval_examples``: the started value (a search from before
    :data:`RUNG_EVAL_EXAMPLES` has none: all of dev at every rung), so a changed default never refuses
    a resume. With it: the user's value; ``None`` on a search from before is the same as how it started;
    another value is a changed setting, which the settings check names."""
    started = read_json(out / SEARCH_FILE, {}, shape="object").get("training") or {}
    key = "rung_eval_examples"
    if key in training and not (training[key] is None and key not in started):
        return
    if key in started:
        base_training[key] = started[key]
    else:
        base_training.pop(key, None)


def _announce(progress: Callable[[str], None], settings: dict[str, Any], name: str, task_obj, budget: Budget,
              uri: str, parent_id: str | None, space_notes: list[str]) -> None:
    """The search's first lines: its budget, MLflow run, splits and the space's notes."""
    splits, seed = settings["splits"], settings["seed"]
    progress(f"search {name}: {task_obj.name}, budget {budget} = {settings['param_limit']:,} trainable parameters "
             f"of {settings['backbone_params']:,}; MLflow {uri} run {parent_id}")
    progress(f"splits: train {splits['train']:,} / dev {splits['dev']:,} (carved from train, seed {seed}, "
             f"{'stratified' if task_obj.num_labels > 1 else 'random'}; every search decision reads it) / "
             f"test {splits['test']:,} ({splits['test_source']}; read once, after the search)")
    rung_n = settings["training"].get("rung_eval_examples")
    scored = min(splits["dev"], settings["training"].get("max_eval_examples") or splits["dev"])  # at the top rung
    if rung_n is not None and rung_n < scored and len(settings["rungs"]) > 1:
        top = f"all {scored:,}" if scored == splits["dev"] else f"the first {scored:,} (max_eval_examples)"
        progress(f"rungs: {', '.join(f'{r:,}' for r in settings['rungs'])} training examples; the lower ones score a "
                 f"seeded {rung_n:,} of the dev examples (the same for every trial), the top one {top}")
    for note in space_notes:
        progress(f"note: {note}")


#: Training examples of the ``--one-shot`` supernet (:func:`autopeft.searching.oneshot.propose`), at most.
ONE_SHOT_EXAMPLES = 2000


def _start_points(sp, one_shot: bool, resumed: bool, out: Path, base: dict[str, Any], limit: int,
                  root: Path | None, progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """The space's start points, plus with ``one_shot`` the one-shot proposals (made now, written to
    ``one_shot.json``; a resumed search reads the ones it made before). The supernet trains
    :data:`ONE_SHOT_EXAMPLES` examples, or the search's top fidelity where that is smaller."""
    start_points = list(sp.start_points)
    if one_shot and resumed and (out / ONE_SHOT_FILE).is_file():  # resumed: the proposals made before
        start_points += read_json(out / ONE_SHOT_FILE, {}, shape="object").get("proposals") or []
    elif one_shot:
        from autopeft.searching.oneshot import propose

        top = int(base["training"].get("max_train_examples") or ONE_SHOT_EXAMPLES)
        # never more than one top-fidelity trial: a quick search (--max-train-examples 64) trained 2,000
        shot = propose(sp, base, limit, str(root) if root else None, examples=min(ONE_SHOT_EXAMPLES, top), log=progress)
        write_json(out / ONE_SHOT_FILE, {"importance": shot.importance, "proposals": shot.proposals,
                                         "examples": shot.examples, "wall_time_s": shot.wall_time_s})
        start_points += shot.proposals
    return start_points


def _interrupted(exc: KeyboardInterrupt, out: Path, tracker, beacon):
    """The :class:`SearchInterrupted` that :func:`search` raises for a Ctrl-C / SIGTERM ``exc``: the
    parent run marked interrupted (unless :func:`autopeft.searching.tune.run_tune` did, with the trials),
    ``driver.json`` ended, ``result.json`` not written, so ``autopeft resume`` continues the search."""
    import signal

    from autopeft.searching.interrupt import SearchInterrupted, signal_name

    stop = exc if isinstance(exc, SearchInterrupted) else SearchInterrupted(signal.SIGINT)
    stop.folder = out
    if not stop.recorded:
        tracker.interrupt(f"{signal_name(stop.signum)}: the search stopped; `autopeft resume` continues")
        stop.recorded = True
    beacon.stop()
    return stop


def resume(name: str | Path, output_dir: str | Path = RUNS_DIR, tracking_uri: str | None = None,
           progress: Callable[[str], None] | None = print) -> SearchResult:
    """Continue an interrupted search with the arguments it was started with (its ``resume.json``).

    Args:
        name: the search's name under ``output_dir``, its folder, or ``latest`` (the newest search there).
        output_dir: where search folders are.
        tracking_uri: MLflow store (default: the one the search was started with).
        progress: as in :func:`search`.

    Returns:
        the finished search, as :func:`search` returns it.

    Raises:
        ResumeError: no such search, one that cannot be resumed, or one that already finished.
    """
    from autopeft.searching.resume import REQUEST_FILE, ResumeError, open_search_folder

    from autopeft.searching.runs import SearchFolderError

    try:  # a folder, a name under output_dir, or ``latest``, as ``autopeft status`` and ``export`` take them
        folder = find_search(name, output_dir, finished=False)
    except SearchFolderError:
        folder = Path(output_dir) / str(name)  # open_search_folder says what is missing
    stored = open_search_folder(folder, resume=True)
    request = {k: v for k, v in stored["request"].items() if k not in ("name", "output_dir", "progress", "resume")}
    if tracking_uri:
        request["tracking_uri"] = tracking_uri
    if not isinstance(request.get("budget"), str):
        raise ResumeError(f"{folder / REQUEST_FILE} has no budget")
    return search(**request, name=folder.name, output_dir=folder.parent, progress=progress, resume=True)


def _search_request(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a :func:`search` call (from its ``locals()``), JSON-able, for ``resume.json``."""
    import inspect

    keep = [p for p in inspect.signature(search).parameters if p not in ("progress", "resume")]
    out = {k: args[k] for k in keep if k in args}
    out["budget"] = str(out["budget"])
    out["output_dir"] = str(out["output_dir"])
    # paths absolute, so a resume works from any folder (names such as "default" or "sst2" stay names)
    if isinstance(out.get("data_dir"), str):
        out["data_dir"] = str(Path(out["data_dir"]).expanduser().resolve())
    if isinstance(out.get("space"), str) and out["space"].endswith((".yaml", ".yml")) and Path(out["space"]).is_file():
        out["space"] = str(Path(out["space"]).resolve())
    return json.loads(json.dumps(out, default=str))


def _splits(task_obj, root: Path | None, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sizes, dev)``: the split sizes a search prints and records (``train``, ``dev``, ``test``,
    ``test_source``, ``dev_seed``) and the recipe's ``dev`` mapping (:class:`autopeft.data.tasks.DevSplit`).
    Reads train and the test split's length only (never its labels' values)."""
    from autopeft.data.tasks import DevSplit, default_dev_examples, load_split

    n_train = len(load_split(task_obj, "train", root))
    n_test = len(load_split(task_obj, "validation", root))
    dev = DevSplit(examples=default_dev_examples(n_train), seed=seed)
    spec = task_obj.spec
    if spec is not None and spec.source is not None:
        source = (f"a seeded {spec.held_out.fraction:.0%} held out of your train data" if spec.held_out is not None
                  else "your validation split")
    else:
        source = f"{task_obj.name}'s validation split"
    sizes = {"train": n_train - dev.examples, "dev": dev.examples, "test": n_test, "dev_seed": seed,
             "test_source": source}
    return sizes, dev.model_dump()


def _finish_front(front: list[dict], out: Path, base: dict[str, Any], data_dir: str | None, confirm: int,
                  reference: str | None, tracker, progress: Callable[[str], None] | None) -> None:
    """After the search: the front's kept models scored once on test, ``--confirm-seeds`` and
    ``--reference`` (:mod:`autopeft.searching.final`); MLflow gets the test scores on the trials' runs and
    the reference on the parent; ``reference.json`` in the search folder."""
    from autopeft.searching.final import confirm_seeds, score_front_on_test, train_reference

    score_front_on_test(front, out, data_dir, log=progress)
    confirm_seeds(front, confirm, data_dir, log=progress)
    if tracker:
        for row in front:
            tracker.log_test(row["trial_id"], row)
    if reference:
        ref = train_reference(reference, base, data_dir, log=progress)
        write_json(out / REFERENCE_FILE, ref)
        if tracker:
            tracker.log_reference(ref)


def _write_results(out: Path, trials: list[dict], front: list[dict], metric: str, param_limit: int | None = None,
                   rungs: list[int] | None = None) -> None:
    write_json(out / TRIALS_FILE, trials)
    write_json(out / PARETO_FILE, front)
    cols = ["trial_id", "score", "score_low", "score_high", "test_score", "test_low", "test_high",
            "trainable_params", "trainable_percent", "peak_memory_bytes", "examples_seen", "train_time_s", "methods"]
    with open(out / PARETO_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in front:
            methods = "+".join(c["method"] for c in (row.get("recipe") or {}).get("components", [])) or "head-only"
            w.writerow([row.get(c) if c != "methods" else methods for c in cols])
    if front:
        Recipe.model_validate(front[0]["recipe"]).save(out / BEST_RECIPE_FILE)
        ref = json.loads((out / REFERENCE_FILE).read_text()) if (out / REFERENCE_FILE).is_file() else None
        _plot(out / PARETO_PLOT, trials, front, metric, param_limit, rungs, ref)


def _plot(path: Path, trials: list[dict], front: list[dict], metric: str, param_limit: int | None = None,
          rungs: list[int] | None = None, reference: dict | None = None) -> None:
    from autopeft.searching.plots import pareto_plot

    pareto_plot(path, trials, front, metric, param_limit, rungs, reference)


def export(search: str | Path, pick: str = "best", output: str | Path | None = None,
           output_dir: str | Path = RUNS_DIR, fmt: str = "recipe", **options: Any):
    """Export one point of a search, or a trained output, in format ``fmt``: the one export entry.

    Args:
        search: search folder, name under ``output_dir``, or ``latest``; for ``peft`` / ``merged`` (and
            ``recipe``) also a folder written by :func:`train`.
        pick: ``best`` (highest dev score), ``smallest`` (fewest trainable parameters), ``leanest``
            (least memory), ``smallest-within-noise`` (fewest trainable parameters among the points whose
            dev score is at least the lower end of the best point's 95% interval,
            :func:`autopeft.data.uncertainty.within_noise`), a 0-based index into the front (best score
            first), or a trial id. Every pick reads dev scores only, never test.
        output: ``recipe``: write the recipe YAML there too; ``peft`` / ``merged``: the folder to write.
        fmt: a name of :data:`autopeft.exporting.exporters.EXPORT_FORMATS`: ``recipe`` (autopeft's training recipe),
            ``peft`` (a Hugging Face peft adapter folder) or ``merged`` (a plain transformers model).
        options: the format's own (``peft`` / ``merged``: ``data_dir``, ``train``, ``overwrite``, ``log``;
            :func:`autopeft.exporting.hf_export.export_model`).

    Returns:
        ``recipe``: the :class:`Recipe`; ``peft`` / ``merged``: :class:`autopeft.exporting.hf_export.ExportResult`.

    Raises:
        SearchNotFoundError: no such search or an empty front; ValueError: unknown ``pick``;
        ExportError: an unknown ``fmt`` (one line), or a model the format cannot hold.
    """
    from autopeft.exporting.exporters import get_format

    form = get_format(fmt)
    if form.trains:  # a search point without kept weights is trained first, as autopeft train does
        options.setdefault("train_with", lambda *args, **kw: train(*args, **kw))
    return form.write(search, pick=pick, output=output, output_dir=output_dir, **options)


def train(recipe: Recipe | str | Path, data_dir: str | None = None, output_dir: str | Path | None = None,
          device: str | None = None, log: Callable[[str], None] | None = print, cpus: int | None = None):
    """Train a recipe at its fidelity, evaluate it, and save the trained PEFT weights.

    A recipe with ``dev`` (every recipe a search exports) trains on train less that dev split, is
    scored on dev (the search's score for it, reproduced), then once on the untouched test split
    (``result.test_score``). A recipe without ``dev`` trains on all of train and is scored on the
    validation split.

    ``cpus``: compute on this many CPU threads (PyTorch intra-op and inter-op, OpenMP/MKL;
    :func:`autopeft.backbones.threads.limit_threads`), 1 to ``os.cpu_count()``; default: every CPU
    this process may use.

    Returns:
        :class:`autopeft.training.trainer.TrialResult`.

    Raises:
        RecipeError, TaskError, BackboneError, CompositionError: bad input.
        ValueError: ``cpus`` outside 1 to this machine's CPUs.
    """
    from autopeft.training.trainer import train_and_save

    have = os.cpu_count() or 1
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, numbers.Integral) or not 1 <= cpus <= have):
        raise ValueError(f"cpus must be a whole number from 1 to this machine's {have} CPUs, got {cpus!r}")
    return train_and_save(recipe, data_dir, output_dir, device=device, log=log, cpus=cpus)


def count(recipe: Recipe | str | Path | dict):
    """Trainable parameters of a recipe without training or weights: :class:`ParameterCount`."""
    if isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, check=False)  # count_recipe assembles it: once, not twice
    from autopeft.composition.recipe import backbone_weight_bytes

    return dataclasses.replace(count_recipe(recipe), weight_bytes=backbone_weight_bytes(recipe))


def predict(trained: str | Path, texts, device: str | None = None, batch_size: int = 128) -> list:
    """Predict with a trained output (a folder written by :func:`train` / ``autopeft train``).

    Args:
        trained: the folder (``recipe.yaml`` + ``adapter_model.safetensors``).
        texts: a string, a list of strings (single-text tasks), or a list of ``(text_a, text_b)``
            pairs (pair tasks, e.g. ``--text-columns premise,hypothesis``).
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        batch_size: examples per forward pass.

    Returns:
        One prediction per text, in order: the original label of user classification data (the
        strings, or numbers, of the label column; the mapping is the recipe's ``task.labels``), the
        class id of a built-in task (its data's label), or a float for regression.

    Raises:
        FileNotFoundError: the folder lacks the recipe or the weights.
        ValueError: a text of the wrong arity (a pair for a single-text task, or the reverse).
    """
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import Split, get_task
    from autopeft.training.batches import Batches
    from autopeft.training.setup import pick_device
    from autopeft.training.saved import load_trained
    from autopeft.training.scoring import predict_ids

    folder = Path(trained)
    if not (folder / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a trained output (no recipe.yaml; see autopeft train -o)")
    recipe = load_recipe(folder / "recipe.yaml")
    task = get_task(recipe.task)
    arity = len(task.text_columns)
    rows = [texts] if isinstance(texts, str) else list(texts)
    items = []
    for i, t in enumerate(rows):
        item = (t,) if isinstance(t, str) else tuple(t)
        if len(item) != arity or not all(isinstance(x, str) for x in item):
            raise ValueError(f"text {i} has {len(item)} part(s); {task.name} reads {arity} "
                             f"({', '.join(task.text_columns)}), each a string")
        items.append(item)
    if not items:
        return []
    dev = pick_device(device)
    model = load_trained(folder, device=str(dev))
    tokenizer = load_tokenizer(recipe.backbone)
    import numpy as np

    batches = Batches(Split(items, np.zeros(len(items), dtype=np.int64)), tokenizer,
                      recipe.training.max_seq_length, dev)
    pred = predict_ids(model, task, batches, batch_size)
    if task.num_labels == 1:
        return [float(p) for p in pred]
    if task.label_names is not None:
        return [task.label_names[int(p)] for p in pred]
    return [int(p) for p in pred]
