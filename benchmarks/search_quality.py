"""Search quality: autopeft's default searcher against random search and hand-picked PEFT baselines.

For each task and seed, at equal compute per searcher (same search space, trials, ASHA scheduler and
top fidelity, no time cap), runs

* ``autopeft.search(..., searcher=name)`` for every searcher (default ``tpe``, then ``random``);
* hand-picked baselines, each trained once at the top fidelity with ``autopeft.trainer.run_trial``:
  LoRA r=8 (alpha 16) on query/value, a parallel FFN adapter (Pfeiffer, reduction factor 32),
  prefix tuning and UniPELT at their defaults, and full fine-tuning (reported, never a
  within-budget baseline);

and reports, per task, the best within-budget score at the top fidelity (mean +- std over seeds and
per seed), the hypervolume of each run's within-budget top-fidelity points against ONE fixed reference
per task, and an anytime curve (hypervolume of what was found so far against training examples spent).

Hypervolume reference (the same for every searcher, baseline and seed of a task): points are
``(-score, trainable_params / param_limit, peak_memory / MEM_REF)``, all minimised, against
``(-chance, 1, 1)``: ``chance`` is 1/classes for accuracy tasks (0.5 on SST-2, RTE) and 0 for F1, MCC
and Pearson (MRPC, CoLA, STS-B); ``MEM_REF`` is 1.1x the largest peak training memory measured in any
run of that task (searches, every rung, and baselines), computed after all runs. One point's
hypervolume is ``(score - chance) * (1 - params/limit) * (1 - memory/MEM_REF)``.

Outputs (``--out``, default ``experiments/``): ``search_quality.json`` (every raw number, the settings,
the seeds, the wall times, the examples spent), ``search_quality.md`` (tables and the computed
conclusions) and ``search_quality_<task>.png`` (anytime curves). Each search's own folder is under
``<out>/runs/bench-<task>-<searcher>-s<seed>`` and its MLflow runs in ``<out>/mlflow.db``.

Resumable: a run whose result is already in the JSON with the same settings is skipped, so an
interrupted benchmark continues where it stopped (``--fresh`` ignores earlier results;
``--report-only`` re-renders the Markdown and plots from the JSON).

    python benchmarks/search_quality.py                       # the defaults: ~35-40 min on 2 CPU cores
    python benchmarks/search_quality.py --tasks rte --seeds 0 --trials 2 \\
        --max-train-examples 96 --baseline-examples 96 --out /tmp/sq  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from autopeft.hpo.pareto import hypervolume  # noqa: E402

DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "glue"
DEFAULT_OUT = PROJECT_ROOT / "experiments"
BACKBONE = "minilm-l6"
JSON_NAME = "search_quality.json"
MD_NAME = "search_quality.md"

DEFAULT_TASKS = ("sst2", "rte", "mrpc")
DEFAULT_SEEDS = (0, 1)
DEFAULT_SEARCHERS = ("tpe", "random")
#: Trials per search (every one trained: rejected samples take no slot): the default space's 3 start
#: points, which every searcher tries first, plus 5 sampled configurations.
DEFAULT_TRIALS = 8
#: Top fidelity (training examples) per task, sized so that the default run (3 tasks x 2 seeds x
#: (2 searches + 5 baselines) = 42 runs) takes ~35-40 min on 2 CPU cores. Cost model (2 cores, no other
#: load): a training example costs ~0.009 s on SST-2 (a step at batch 32 ~0.3 s), ~0.015 s on MRPC and
#: ~0.017 s on RTE (mean tokens per example 13 / 53 / 67; 41 / 80 / 128 when batches are padded
#: without length grouping); a validation pass ~3-4 s; ~5 s per trial to start a Ray worker and load the
#: model; Ray start ~15 s once. A search of 8 trials spends ~2.9x the top fidelity in examples
#: (everything at the first rung, about a third at the second, ~2 trials at the top) and evaluates ~13
#: times; the baselines spend 5.5x (full fine-tuning steps cost ~1.5x). Per task and seed that is
#: ~120-150 s per search plus ~115-150 s of baselines: SST-2 ~450 s, RTE and MRPC ~350 s each, so
#: ~39 min for two seeds, more than half of it fixed costs (trial start-up, evaluation).
DEFAULT_MAX_TRAIN_EXAMPLES = {"sst2": 2000, "cola": 2000, "stsb": 1200, "mrpc": 960, "rte": 800}
FALLBACK_MAX_TRAIN_EXAMPLES = 1000
DEFAULT_BUDGET = "0.5%"
DEFAULT_SPACE = "default"

#: The hand-picked baselines: name -> components.
BASELINES: dict[str, list[dict[str, Any]]] = {
    "lora": [{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}],
    "adapter": [{"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": 32,
                 "sublayers": ["ffn"]}],
    "prefix_tuning": [{"method": "prefix_tuning"}],
    "unipelt": [{"method": "unipelt"}],
    "full_finetuning": [{"method": "full_finetuning"}],
}
BASELINE_LR: dict[str, float] = {"lora": 3e-3, "adapter": 3e-3, "prefix_tuning": 3e-3, "unipelt": 3e-3,
                                 "full_finetuning": 5e-5}
#: Reported, but never "the best hand-picked baseline" (full fine-tuning is not a PEFT method).
REPORT_ONLY_BASELINES = frozenset({"full_finetuning"})
BASELINE_LABELS = {"lora": "LoRA r=8, alpha 16, query/value", "adapter": "parallel FFN adapter (Pfeiffer, rf 32)",
                   "prefix_tuning": "prefix tuning (defaults)", "unipelt": "UniPELT (defaults)",
                   "full_finetuning": "full fine-tuning"}

#: Trial statuses that trained nothing (``spent_examples`` = 0).
NO_SPEND_STATUSES = frozenset({"over_budget", "empty", "invalid"})


# --------------------------------------------------------------------------------------------------
# Pure functions (unit-tested in tests/test_search_quality_bench.py)
# --------------------------------------------------------------------------------------------------

def score_reference(metric: str, num_labels: int) -> float:
    """The score end of the fixed hypervolume reference: chance level, the floor of a useful score.

    Accuracy with ``k`` classes: ``1/k`` (0.5 for SST-2 and RTE). F1, MCC, Pearson (MRPC, CoLA, STS-B): 0.
    """
    if metric == "accuracy" and num_labels >= 2:
        return 1.0 / num_labels
    return 0.0


def task_score_reference(task: str) -> float:
    """:func:`score_reference` of a GLUE task by name."""
    from autopeft.tasks import get_task

    t = get_task(task)
    return score_reference(t.metric, t.num_labels)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def top_fidelity_rows(trials: Iterable[dict], fidelity: int, param_limit: int) -> list[dict]:
    """The within-budget rows at the top fidelity, as ``autopeft.search`` builds its front: one per trial
    with status ``finished``, a row at exactly ``fidelity`` examples, ``trainable_params <= param_limit``
    and a finite score. Each row gets the trial's ``trial_id``."""
    out = []
    for t in trials:
        if t.get("status") != "finished":
            continue
        for r in t.get("rows") or []:
            if (r.get("examples_seen") == fidelity and _finite(r.get("score"))
                    and _finite(r.get("trainable_params")) and r["trainable_params"] <= param_limit
                    and _finite(r.get("peak_memory_bytes"))):
                out.append({**r, "trial_id": t.get("trial_id")})
                break
    return out


def spent_examples(trial: dict) -> int:
    """Training examples a trial consumed: its last row's ``examples_seen`` (an ASHA-stopped trial
    trained up to its last rung); 0 for over-budget, empty and invalid trials and for trials without rows."""
    if trial.get("status") in NO_SPEND_STATUSES:
        return 0
    rows = trial.get("rows") or []
    return int(rows[-1].get("examples_seen") or 0) if rows else 0


def normalised_points(rows: Sequence[dict], param_limit: int, mem_ref: float) -> np.ndarray:
    """``(n, 3)`` minimisation points ``(-score, params / param_limit, memory / mem_ref)``."""
    return np.array([[-float(r["score"]), r["trainable_params"] / param_limit, r["peak_memory_bytes"] / mem_ref]
                     for r in rows], dtype=float).reshape(-1, 3)


def fixed_hypervolume(rows: Sequence[dict], param_limit: int, mem_ref: float, score_ref: float) -> float:
    """Hypervolume of ``rows`` against the fixed reference ``(-score_ref, 1, 1)`` in the normalised space
    of :func:`normalised_points`. Rows at or beyond the reference in any objective add nothing."""
    if not rows:
        return 0.0
    return float(hypervolume(normalised_points(rows, param_limit, mem_ref), [-score_ref, 1.0, 1.0]))


def anytime_curve(trials: Sequence[dict], fidelity: int, param_limit: int, mem_ref: float,
                  score_ref: float) -> list[tuple[int, float]]:
    """``[(examples spent so far, hypervolume of the within-budget top-fidelity rows found so far), ...]``:
    ``(0, 0.0)`` then one point per trial, in the order given (start order)."""
    curve = [(0, 0.0)]
    spent, found = 0, []
    for t in trials:
        spent += spent_examples(t)
        found += top_fidelity_rows([t], fidelity, param_limit)
        curve.append((spent, fixed_hypervolume(found, param_limit, mem_ref, score_ref)))
    return curve


def step_value(curve: Sequence[Sequence[float]], x: float) -> float:
    """Value of a step function (``curve`` sorted by x) at ``x``: the last y with its x <= ``x``
    (0 before the first point). After a curve's last point its last value holds."""
    y = 0.0
    for cx, cy in curve:
        if cx <= x:
            y = cy
        else:
            break
    return float(y)


def curve_band(curves: Sequence[Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Mean, min and max over ``curves`` (step functions) on the union of their x values."""
    if not curves:
        return {"x": [], "mean": [], "min": [], "max": []}
    grid = sorted({float(x) for c in curves for x, _ in c})
    values = np.array([[step_value(c, x) for x in grid] for c in curves])
    return {"x": grid, "mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``{"n", "mean", "std"}`` of the non-missing values; sample standard deviation (ddof 1), 0 for one value."""
    v = [float(x) for x in values if x is not None and _finite(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def trained_trials(trials: Iterable[dict]) -> list[dict]:
    """The trials that became training runs (not over budget, empty or invalid), in start order."""
    return [t for t in trials if t.get("status") not in NO_SPEND_STATUSES]


def shared_prefix(trials_a: Sequence[dict], trials_b: Sequence[dict]) -> int:
    """How many leading trained trials two searches share (same recipe, position by position): both
    searchers start with the space's start points, so they differ only after these."""
    n = 0
    for a, b in zip(trained_trials(trials_a), trained_trials(trials_b)):
        if a.get("recipe") is None or a.get("recipe") != b.get("recipe"):
            break
        n += 1
    return n


def memory_reference(runs: Iterable[dict]) -> float | None:
    """``MEM_REF`` of a task: 1.1x the largest finite peak memory in any row of any trial of the
    searches and in any baseline of ``runs`` (records with ``status == "ok"``); ``None`` without any."""
    peaks = []
    for run in runs:
        if run.get("status") != "ok":
            continue
        if run.get("kind") == "search":
            for t in run.get("trials") or []:
                peaks += [r["peak_memory_bytes"] for r in t.get("rows") or [] if _finite(r.get("peak_memory_bytes"))]
        elif _finite(run.get("peak_memory_bytes")):
            peaks.append(run["peak_memory_bytes"])
    return 1.1 * max(peaks) if peaks else None


def summarize_search(run: dict, mem_ref: float, score_ref: float) -> dict[str, Any]:
    """Per-seed numbers of one search record (as stored in the JSON)."""
    trials, fid, limit = run["trials"], run["fidelity"], run["param_limit"]
    rows = top_fidelity_rows(trials, fid, limit)
    best = max(rows, key=lambda r: (r["score"], -r["trainable_params"])) if rows else None
    return {
        "best_score": best["score"] if best else None,
        "best_trial": ({"trial_id": best["trial_id"], "trainable_params": best["trainable_params"],
                        "peak_memory_bytes": best["peak_memory_bytes"]} if best else None),
        "hypervolume": fixed_hypervolume(rows, limit, mem_ref, score_ref),
        "examples_spent": sum(spent_examples(t) for t in trials),
        "wall_time_s": run.get("wall_time_s"),
        "train_time_s": sum(float(t["rows"][-1].get("train_time_s") or 0.0) for t in trials if t.get("rows")),
        "top_rows": len(rows),
        "statuses": {s: sum(1 for t in trials if t.get("status") == s)
                     for s in sorted({t.get("status") for t in trials})},
        "anytime": [list(p) for p in anytime_curve(trials, fid, limit, mem_ref, score_ref)],
        "included_ray_start": bool(run.get("included_ray_start")),
    }


def summarize_baseline(run: dict, mem_ref: float, score_ref: float) -> dict[str, Any]:
    """Per-seed numbers of one baseline record: the score counts only within budget."""
    within = run["trainable_params"] <= run["param_limit"]
    row = {k: run[k] for k in ("score", "trainable_params", "peak_memory_bytes")}
    ok = within and _finite(run["score"])
    return {
        "best_score": run["score"] if ok else None,
        "score": run["score"],
        "within_budget": within,
        "trainable_params": run["trainable_params"],
        "param_limit": run["param_limit"],
        "hypervolume": fixed_hypervolume([row], run["param_limit"], mem_ref, score_ref) if ok else 0.0,
        "examples_spent": run.get("examples_seen"),
        "wall_time_s": run.get("wall_time_s"),
        "train_time_s": run.get("train_time_s"),
        "peak_memory_bytes": run["peak_memory_bytes"],
    }


def _aggregate(per_seed: dict[Any, dict]) -> dict[str, Any]:
    keys = ("best_score", "hypervolume", "examples_spent", "wall_time_s", "train_time_s")
    return {k: mean_std(v.get(k) for v in per_seed.values()) for k in keys}


def summarize_task(task: str, runs: Sequence[dict], searchers: Sequence[str], baselines: Sequence[str],
                   seeds: Sequence[int], score_ref: float, default_searcher: str | None = None,
                   comparator: str | None = "random") -> dict[str, Any]:
    """Everything the report shows for one task, from its run records.

    Returns a dict with ``mem_ref``, ``score_ref``, ``methods`` (``search:<name>`` / ``baseline:<name>``
    -> per seed, aggregates and errors), ``anytime`` (per searcher: per-seed curves and their band) and
    ``checks`` (the computed conclusions, see :func:`task_checks`).
    """
    runs = [r for r in runs if r.get("task") == task]
    mem_ref = memory_reference(runs)
    out: dict[str, Any] = {"task": task, "score_ref": score_ref, "mem_ref": mem_ref, "methods": {}, "anytime": {}}
    by_key = {(r["kind"], r["name"], r["seed"]): r for r in runs}
    for kind, names in (("search", searchers), ("baseline", baselines)):
        for name in names:
            per_seed, errors = {}, {}
            for s in seeds:
                run = by_key.get((kind, name, s))
                if run is None:
                    continue
                if run.get("status") != "ok":
                    errors[str(s)] = run.get("error") or run.get("status")
                    continue
                if mem_ref is None:
                    continue
                summ = summarize_search if kind == "search" else summarize_baseline
                per_seed[str(s)] = summ(run, mem_ref, score_ref)
            entry = {"kind": kind, "name": name, "per_seed": per_seed, "errors": errors, **_aggregate(per_seed)}
            if kind == "baseline":
                entry["report_only"] = name in REPORT_ONLY_BASELINES
                entry["within_budget"] = {s: v["within_budget"] for s, v in per_seed.items()}
                entry["score"] = mean_std(v["score"] for v in per_seed.values())
            out["methods"][f"{kind}:{name}"] = entry
            if kind == "search":
                curves = {s: v["anytime"] for s, v in per_seed.items()}
                out["anytime"][name] = {"per_seed": curves, **curve_band(list(curves.values()))}
    default_searcher = default_searcher or (searchers[0] if searchers else None)
    comparator = comparator if comparator != default_searcher else None
    out["shared_prefix"] = {}
    if default_searcher and comparator:
        for s in seeds:
            a, b = by_key.get(("search", default_searcher, s)), by_key.get(("search", comparator, s))
            if a and b and a.get("status") == "ok" and b.get("status") == "ok":
                out["shared_prefix"][str(s)] = {"shared": shared_prefix(a["trials"], b["trials"]),
                                                "trained": [len(trained_trials(a["trials"])),
                                                            len(trained_trials(b["trials"]))]}
    out["checks"] = task_checks(out, default_searcher, comparator)
    return out


def task_checks(summary: dict, default: str | None, comparator: str | None) -> dict[str, Any]:
    """The two conclusions of a task, computed from :func:`summarize_task`'s numbers.

    ``vs_baseline``: the default searcher's mean best within-budget score >= the best (by mean) within-budget
    hand-picked baseline's (full fine-tuning excluded); also counted per seed.
    ``vs_random``: the default searcher's mean hypervolume > the comparator's (strictly; equal is a tie).
    Each has ``holds`` (True / False / None when it cannot be computed) and ``text``.
    """
    methods = summary["methods"]
    task = summary["task"]
    checks: dict[str, Any] = {}
    d = methods.get(f"search:{default}") if default else None
    # default vs the best within-budget baseline
    cands = [(m["best_score"]["mean"], m["name"], m) for k, m in methods.items()
             if m["kind"] == "baseline" and not m["report_only"] and m["best_score"]["mean"] is not None]
    if d is None or d["best_score"]["mean"] is None:
        why = "no result" if d is None else ("no within-budget top-fidelity point" if d["per_seed"]
                                              else "the search did not run: " + "; ".join(d["errors"].values())[:300])
        checks["vs_baseline"] = {"holds": None, "text": f"{task}: cannot compare {default} with the baselines ({why})."}
    elif not cands:
        checks["vs_baseline"] = {"holds": None, "text": f"{task}: no hand-picked baseline finished within budget; "
                                                        f"{default}'s best is {_fmt(d['best_score'])}."}
    else:
        bmean, bname, b = max(cands, key=lambda c: c[0])
        holds = d["best_score"]["mean"] >= bmean
        seeds = [s for s in d["per_seed"] if d["per_seed"][s]["best_score"] is not None]
        wins, n = 0, 0
        for s in seeds:
            base_s = [m["per_seed"][s]["best_score"] for _, _, m in cands
                      if s in m["per_seed"] and m["per_seed"][s]["best_score"] is not None]
            if base_s:
                n += 1
                wins += d["per_seed"][s]["best_score"] >= max(base_s)
        rel = ">=" if holds else "<"
        checks["vs_baseline"] = {
            "holds": holds, "default_mean": d["best_score"]["mean"], "baseline": bname, "baseline_mean": bmean,
            "seeds_won": wins, "seeds_compared": n,
            "text": (f"{task}: {default}'s best within-budget score {_fmt(d['best_score'])} {rel} the best hand-picked "
                     f"within-budget baseline ({bname}, {_fmt(b['best_score'])}): "
                     f"{'holds' if holds else 'does NOT hold'} (per seed, {default} >= every within-budget "
                     f"baseline of that seed in {wins} of {n})."),
        }
    # default vs the comparator on hypervolume
    c = methods.get(f"search:{comparator}") if comparator else None
    if comparator is None:
        checks["vs_random"] = {"holds": None, "text": f"{task}: no comparator searcher for the hypervolume check."}
    elif d is None or c is None or d["hypervolume"]["mean"] is None or c["hypervolume"]["mean"] is None:
        missing = [n for n, m in ((default, d), (comparator, c)) if m is None or m["hypervolume"]["mean"] is None]
        errs = "; ".join(e for m in (d, c) if m for e in m["errors"].values())[:300]
        checks["vs_random"] = {"holds": None, "text": f"{task}: cannot compare hypervolumes: no result for "
                                                      f"{', '.join(missing)}" + (f" ({errs})" if errs else "") + "."}
    else:
        dh, ch = d["hypervolume"]["mean"], c["hypervolume"]["mean"]
        holds = dh > ch
        verdict = ("holds" if holds else ("does NOT hold (a tie)" if math.isclose(dh, ch, rel_tol=0, abs_tol=1e-12)
                                          else "does NOT hold"))
        seeds = sorted(set(d["per_seed"]) & set(c["per_seed"]), key=str)
        wins = sum(d["per_seed"][s]["hypervolume"] > c["per_seed"][s]["hypervolume"] for s in seeds)
        checks["vs_random"] = {
            "holds": holds, "default_mean": dh, "comparator_mean": ch, "seeds_won": wins, "seeds_compared": len(seeds),
            "text": (f"{task}: {default}'s mean hypervolume {_fmt(d['hypervolume'])} vs {comparator}'s "
                     f"{_fmt(c['hypervolume'])}: \"{default} beats {comparator}\" {verdict} "
                     f"(per seed, strictly higher in {wins} of {len(seeds)})."),
        }
    return checks


def _fmt(stats: dict, digits: int = 4) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    if stats["n"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def _fmt_int(stats: dict) -> str:
    return "—" if not stats or stats.get("mean") is None else f"{stats['mean']:,.0f}"


def _per_seed(per_seed: dict, key: str, digits: int = 4) -> str:
    vals = [f"s{s}: " + ("—" if v.get(key) is None else f"{v[key]:.{digits}f}") for s, v in per_seed.items()]
    return ", ".join(vals)


def render_markdown(report: dict) -> str:
    """The Markdown report: command, sizes, one table per task, the computed conclusions, notes."""
    st, summ = report["settings"], report["summary"]
    lines = ["# Search quality: default searcher vs random search vs hand-picked baselines", ""]
    lines += ["Command (from the project root):", "", "```", st["command"], "```", ""]
    mte = st["max_train_examples"]
    lines += [
        f"- Backbone {st['backbone']}; budget {st['budget']} of the backbone's parameters (head excluded); "
        f"search space `{st['space']}`; {st['trials']} trials per search (rejected samples take no slot), "
        f"the search's own multi-fidelity scheduler, no time cap; searchers {', '.join(st['searchers'])} (same space, scheduler, trials and fidelity).",
        f"- Tasks and top fidelity (training examples): "
        + ", ".join(f"{t} {mte[t]:,}" for t in st["tasks"])
        + f"; baselines trained once at " + ", ".join(f"{t} {st['baseline_examples'][t]:,}" for t in st["tasks"])
        + " examples.",
        f"- Seeds: {', '.join(str(s) for s in st['seeds'])} (each seeds the sampler and every trial; the baselines' "
        f"training seed).",
        f"- Baselines: " + "; ".join(f"{BASELINE_LABELS.get(b, b)} (lr {st['baseline_lr'][b]:g})" for b in st["baselines"])
        + f". Pooling of the baselines: {st['baseline_pooling_note']}.",
        f"- Machine: {st['machine']}. Total wall time of the runs recorded here: "
        f"{st.get('total_run_time_s', 0) / 60:.1f} min.",
        "- Hypervolume: points (-score, trainable params / param limit, peak memory / MEM_REF), reference "
        "(-chance, 1, 1), one reference per task for every searcher, baseline and seed; chance = 0.5 for "
        "2-class accuracy, 0 for F1/MCC/Pearson; MEM_REF = 1.1x the largest peak memory of any run of the task. "
        "A baseline's hypervolume is that of its single point (0 when over budget).",
        "- Best score: the highest score among within-budget points at the top fidelity (searches: trials that "
        "finished; baselines: their one run, counted only within budget). ± is the sample standard deviation over seeds.",
        "",
    ]
    for task in st["tasks"]:
        t = summ.get(task)
        if t is None:
            continue
        mem = t["mem_ref"]
        limit = t.get("param_limit")
        ref = f"Hypervolume reference: score {t['score_ref']:g}"
        ref += f", parameter limit {limit:,}" if isinstance(limit, int) else ""
        ref += f", MEM_REF {mem / 2**20:.0f} MiB ({mem:,.0f} bytes)." if mem else ", MEM_REF — (no run finished)."
        if t.get("rungs"):
            ref += f" Search rungs (training examples): {', '.join(f'{r:,}' for r in t['rungs'])}"
            ref += f"; scheduler {t['scheduler']}." if t.get("scheduler") else "."
        lines += [f"## {task} ({t.get('metric', 'score')})", "", ref]
        lines += ["", "| method | best within-budget score, mean ± std (per seed) | hypervolume mean ± std | "
                      "examples spent (mean per run) | wall time (mean per run) |", "|---|---|---|---:|---:|"]
        for key, m in t["methods"].items():
            if m["kind"] == "search":
                label = f"search: {m['name']}" + (" (default)" if m["name"] == st["searchers"][0] else "")
                ray = any(v.get("included_ray_start") for v in m["per_seed"].values())
                extra = ""
                statuses: dict[str, int] = {}
                for v in m["per_seed"].values():
                    for k, n in v["statuses"].items():
                        statuses[k] = statuses.get(k, 0) + n
                if statuses:
                    extra = "; trials: " + ", ".join(f"{n} {k}" for k, n in sorted(statuses.items()))
                score = f"{_fmt(m['best_score'])} ({_per_seed(m['per_seed'], 'best_score')}){extra}"
                wall = (f"{m['wall_time_s']['mean']:.0f} s" + (" †" if ray else "")
                        if m["wall_time_s"]["mean"] is not None else "—")
            else:
                label = f"baseline: {BASELINE_LABELS.get(m['name'], m['name'])}"
                over = [s for s, w in m["within_budget"].items() if not w]
                if m["per_seed"] and len(over) == len(m["per_seed"]):
                    v0 = next(iter(m["per_seed"].values()))
                    score = (f"— over budget ({v0['trainable_params']:,} params > {v0['param_limit']:,}); score "
                             f"{_fmt(m['score'])} ({_per_seed(m['per_seed'], 'score')})")
                else:
                    score = f"{_fmt(m['best_score'])} ({_per_seed(m['per_seed'], 'best_score')})"
                    if m["per_seed"]:
                        v0 = next(iter(m["per_seed"].values()))
                        score += f"; {v0['trainable_params']:,} params"
                if m["report_only"]:
                    label += " (reported only)"
                wall = f"{m['wall_time_s']['mean']:.0f} s" if m["wall_time_s"]["mean"] is not None else "—"
            if m["errors"]:
                score += " — errors: " + "; ".join(f"s{s}: {e}" for s, e in m["errors"].items())[:400]
            hv = _fmt(m["hypervolume"])
            lines.append(f"| {label} | {score} | {hv} | {_fmt_int(m['examples_spent'])} | {wall} |")
        sp = t.get("shared_prefix") or {}
        if sp and len(st["searchers"]) > 1:
            d, c = st["searchers"][0], "random" if "random" in st["searchers"][1:] else None
            lines += ["", f"{d} and {c} trained the same first configurations (the space's start points, tried first "
                          f"by every searcher): " + ", ".join(f"s{s}: {v['shared']} of {v['trained'][0]} / "
                                                               f"{v['trained'][1]} trained trials" for s, v in sp.items())
                      + "; they differ only after these."]
        maj = (st.get("majority_score") or {}).get(task)
        if maj is not None:
            lines += ["", f"Majority-class score on the validation split (predicting the training split's most frequent "
                          f"label): {maj:.4f}; scores near it mean the runs learned little at this fidelity."]
        lines += ["", f"Anytime curve: `search_quality_{task}.png`.", ""]
    lines += ["## Conclusions (computed from the numbers above)", ""]
    for task in st["tasks"]:
        t = summ.get(task)
        if t is None:
            continue
        for name in ("vs_baseline", "vs_random"):
            lines.append(f"- {t['checks'][name]['text']}")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["- † the first search of a process includes Ray's start-up in its wall time.",
              "- Examples spent by a search: the sum over its trials of the examples each trained (the last rung "
              "it reached); over-budget, empty and invalid trials spend none. A baseline spends its fidelity.",
              ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------

def plot_anytime(path: Path, task_summary: dict, searchers: Sequence[str]) -> Path:
    """Anytime hypervolume per searcher (mean over seeds; band min-max), within-budget baselines as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(searchers):
        band = task_summary["anytime"].get(name)
        if not band or not band["x"]:
            continue
        n = len(band["per_seed"])
        c = colors[i % len(colors)]
        ax.step(band["x"], band["mean"], where="post", color=c, label=f"{name} (mean of {n} seed{'s' * (n > 1)})")
        ax.fill_between(band["x"], band["min"], band["max"], step="post", color=c, alpha=0.2)
    for j, (key, m) in enumerate(task_summary["methods"].items()):
        if m["kind"] != "baseline" or m["hypervolume"]["mean"] is None or not any(m["within_budget"].values()):
            continue
        x = m["examples_spent"]["mean"] or 0
        ax.scatter([x], [m["hypervolume"]["mean"]], marker="x", color=colors[(len(searchers) + j) % len(colors)],
                   label=f"baseline {m['name']} (one run)", zorder=3)
    ax.set_xlabel("training examples spent (cumulative, trials in start order)")
    ax.set_ylabel("hypervolume (fixed reference)")
    mem = task_summary["mem_ref"]
    ax.set_title(f"{task_summary['task']}: anytime hypervolume (ref: score {task_summary['score_ref']:g}, "
                 f"params 1.0 x limit, MEM_REF {mem / 2**20:.0f} MiB)" if mem else task_summary["task"], fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------

def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def save_results(path: Path, data: dict) -> None:
    """Atomic write: an interrupt never leaves a half-written JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)


class QuietLog:
    """The searches' ``progress``: appends each line to a log file (echoes it with ``echo``). Plain
    attributes only, no open file: Ray pickles the search algorithm, which holds the callback."""

    def __init__(self, path: str | Path, echo: bool = False) -> None:
        self.path, self.echo = str(path), echo
        Path(self.path).write_text("")

    def __call__(self, msg: str) -> None:
        with open(self.path, "a") as f:
            f.write(msg + "\n")
        if self.echo:
            print("    " + msg, flush=True)


def run_key(kind: str, task: str, name: str, seed: int) -> str:
    return f"{kind}/{task}/{name}/s{seed}"


def majority_score(task: str, data_dir: str) -> float | None:
    """The task's metric on the validation split when always predicting the training split's most
    frequent label (``None`` for regression or unreadable data): what "learned nothing" scores."""
    from autopeft.tasks import get_task, load_split

    t = get_task(task)
    if t.num_labels == 1:
        return None
    try:
        train, val = load_split(t, "train", data_dir), load_split(t, "validation", data_dir)
        label = int(np.bincount(np.asarray(train.labels, dtype=int)).argmax())
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(t.score(np.full(len(val), label), val.labels)[t.metric])
    except Exception:  # informative only
        return None


def pooling_supported() -> bool:
    """Whether recipes accept the ``pooling`` field (it is new)."""
    from autopeft.recipe import RecipeError, recipe_from_dict

    try:
        recipe_from_dict({"backbone": BACKBONE, "task": "sst2", "components": [], "pooling": "mean"})
        return True
    except RecipeError as exc:
        msg = str(exc).lower()
        if "pooling" in msg or "extra" in msg:
            return False
        raise


def baseline_recipe_dict(task: str, name: str, lr: float, examples: int, seed: int, pooling: str | None) -> dict:
    d: dict[str, Any] = {"backbone": BACKBONE, "task": task, "components": BASELINES[name],
                         "training": {"learning_rate": lr, "max_train_examples": examples, "seed": seed}}
    if pooling:
        d["pooling"] = pooling
    return d


def run_baseline(task: str, name: str, seed: int, lr: float, examples: int, budget: str, pooling: str | None,
                 data_dir: str) -> dict:
    """Train one hand-picked baseline; its record (within budget or not)."""
    import torch

    from autopeft.budget import parse_budget
    from autopeft.recipe import count_recipe, recipe_from_dict
    from autopeft.trainer import run_trial

    rdict = baseline_recipe_dict(task, name, lr, examples, seed, pooling)
    recipe = recipe_from_dict(rdict)
    counts = count_recipe(recipe)
    limit = parse_budget(budget).limit(counts.backbone_params)
    t0 = time.time()
    res, model = run_trial(recipe, data_dir)
    wall = time.time() - t0
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"score": res.score, "metrics": res.metrics, "trainable_params": res.trainable_params,
            "backbone_params": res.backbone_params, "param_limit": limit, "peak_memory_bytes": res.peak_memory_bytes,
            "examples_seen": res.examples_seen, "steps": res.steps, "train_time_s": res.train_time_s,
            "wall_time_s": wall, "recipe": recipe.model_dump(mode="json")}


def run_search(task: str, searcher: str, seed: int, trials: int, examples: int, budget: str, space: str,
               data_dir: str, out: Path, log: Callable[[str], None]) -> dict:
    """One ``autopeft.search`` with the given searcher; its record."""
    import autopeft

    try:
        import ray

        ray_up = ray.is_initialized()
    except ImportError:  # pragma: no cover
        ray_up = False
    name = f"bench-{task}-{searcher}-s{seed}"
    runs = out / "runs"
    stale = runs / name
    if stale.exists():  # an interrupted or failed earlier attempt: keep it aside, start clean
        k = 1
        while (runs / f"{name}.earlier-{k}").exists():
            k += 1
        stale.rename(runs / f"{name}.earlier-{k}")
    t0 = time.time()
    result = autopeft.search(task=task, budget=budget, space=space, trials=trials, time_budget_s=None,
                             data_dir=data_dir, seed=seed, searcher=searcher, max_train_examples=examples,
                             progress=log, name=name, output_dir=runs,
                             tracking_uri=f"sqlite:///{out}/mlflow.db", experiment="search-quality")
    wall = time.time() - t0
    return {"trials": result.trials, "pareto": result.pareto, "param_limit": result.param_limit,
            "fidelity": result.fidelity, "wall_time_s": result.wall_time_s, "call_time_s": wall,
            "included_ray_start": not ray_up, "path": str(result.path),
            "mlflow_run_id": getattr(result, "mlflow_run_id", None),
            "search_settings": getattr(result, "settings", {}) or {}}


def _parse_per_task(text: str | None, tasks: Sequence[str], defaults: dict[str, int], fallback: int,
                    what: str) -> dict[str, int]:
    """``"2000"``, ``"sst2=3000,rte=2000"`` or ``"1500,sst2=3000"`` -> {task: value} for every task of ``tasks``
    (a bare number sets every task; ``task=value`` wins over it; the rest keep ``defaults`` / ``fallback``)."""
    out = {t: defaults.get(t, fallback) for t in tasks}
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    for part in [p for p in parts if "=" not in p]:
        out = {t: _positive_int(part, what) for t in tasks}
    for part in [p for p in parts if "=" in p]:
        k, v = (x.strip() for x in part.split("=", 1))
        if k.lower() not in out:
            raise SystemExit(f"error: {what}: task {k!r} is not in --tasks ({', '.join(tasks)})")
        out[k.lower()] = _positive_int(v, what)
    return out


def _positive_int(v: str, what: str) -> int:
    try:
        n = int(float(v))
    except ValueError:
        raise SystemExit(f"error: {what}: {v!r} is not a number") from None
    if n < 1:
        raise SystemExit(f"error: {what}: {v!r} must be positive")
    return n


def _parse_lrs(text: str | None) -> dict[str, float]:
    lrs = dict(BASELINE_LR)
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if "=" not in part:
            raise SystemExit(f"error: --baseline-lr: {part!r} is not name=value")
        k, v = part.split("=", 1)
        if k.strip() not in BASELINES:
            raise SystemExit(f"error: --baseline-lr: unknown baseline {k!r}; valid: {', '.join(BASELINES)}")
        lrs[k.strip()] = float(v)
    return lrs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated GLUE tasks")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="trials per search (every searcher)")
    p.add_argument("--max-train-examples", default=None,
                   help="top fidelity: one number for every task and/or task=value overrides, e.g. "
                        "'sst2=3000,rte=2000'; defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULT_MAX_TRAIN_EXAMPLES.items()))
    p.add_argument("--baseline-examples", default=None,
                   help="training examples of each baseline, same syntax (default: the task's top fidelity)")
    p.add_argument("--budget", default=DEFAULT_BUDGET, help="trainable-parameter budget (0.5%%, 0.005, 120k)")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space name or YAML path")
    p.add_argument("--searchers", default=",".join(DEFAULT_SEARCHERS),
                   help="comma-separated; the first is the default searcher the conclusions are about")
    p.add_argument("--baselines", default="all", help="'all', 'none' or a comma-separated subset of " + ", ".join(BASELINES))
    p.add_argument("--baseline-lr", default=None, help="overrides as name=value, e.g. 'prefix_tuning=1e-2'; defaults: "
                   + ", ".join(f"{k}={v:g}" for k, v in BASELINE_LR.items()))
    p.add_argument("--baseline-pooling", default="mean", choices=["pooler", "cls", "mean"],
                   help="pooling of the baselines' recipes (dropped, with a note, if recipes do not accept it)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="local GLUE folder (../shared/data/glue)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (JSON, Markdown, plots, runs/, mlflow.db)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON (rerun everything)")
    p.add_argument("--report-only", action="store_true", help="only re-render the Markdown and plots from the JSON")
    p.add_argument("--verbose", action="store_true", help="echo every search progress line (always in runs/<name>.log)")
    return p


def _machine() -> str:
    try:
        import torch

        dev = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            dev += f", CUDA {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        dev = "no torch"
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, {dev}"


def build_report(data: dict) -> dict:
    """Summaries, notes and the rendered Markdown from the stored settings and runs."""
    from autopeft.tasks import get_task

    st = data["settings"]
    names = {"search": set(st["searchers"]), "baseline": set(st["baselines"])}
    planned = {k: r for k, r in data.get("runs", {}).items()  # runs of this plan only (the JSON may hold more)
               if r.get("task") in st["tasks"] and r.get("seed") in st["seeds"] and r.get("name") in names.get(r.get("kind"), ())}
    runs = list(planned.values())
    summary = {}
    for task in st["tasks"]:
        ts = summarize_task(task, runs, st["searchers"], st["baselines"], st["seeds"], task_score_reference(task),
                            default_searcher=st["searchers"][0] if st["searchers"] else None)
        ts["metric"] = get_task(task).metric
        limits = {r["param_limit"] for r in runs if r.get("task") == task and r.get("status") == "ok"}
        ts["param_limit"] = next(iter(limits)) if len(limits) == 1 else (sorted(limits) if limits else None)
        ss = [r.get("search_settings") or {} for r in runs if r.get("task") == task and r.get("kind") == "search"
              and r.get("status") == "ok"]
        ts["rungs"] = next((x["rungs"] for x in ss if x.get("rungs")), None)
        ts["scheduler"] = next((x["scheduler"] for x in ss if x.get("scheduler")), None)
        summary[task] = ts
    notes = list(st.get("notes", []))
    poolings = {}
    for r in runs:
        if r.get("kind") == "search" and r.get("status") == "ok":
            for t in r["trials"]:
                if t.get("recipe"):
                    poolings.setdefault(r["task"], set()).add(t["recipe"].get("pooling", "(no pooling field)"))
    if poolings:
        notes.append("Pooling used by the search trials (from their recipes): "
                     + "; ".join(f"{t}: {', '.join(sorted(p))}" for t, p in poolings.items()) + ".")
    for task in st["tasks"]:
        limits = summary[task]["param_limit"]
        if isinstance(limits, list):
            notes.append(f"{task}: runs disagree on the parameter limit: {limits}.")
    if any(st["baseline_examples"][t] != st["max_train_examples"][t] for t in st["tasks"]):
        notes.append("The baselines were trained at a different number of examples than the searches' top fidelity "
                     "(--baseline-examples): their scores are not at equal fidelity.")
    errors = [f"{k}: {r.get('error')}" for k, r in planned.items() if r.get("status") != "ok"]
    if errors:
        notes.append(f"{len(errors)} run(s) failed: " + " | ".join(e[:200] for e in errors[:6]))
    report = {"settings": st, "summary": summary, "notes": notes}
    report["markdown"] = render_markdown(report)
    return report


def write_outputs(out: Path, data: dict) -> dict:
    report = build_report(data)
    data["summary"] = report["summary"]
    data["notes"] = report["notes"]
    save_results(out / JSON_NAME, data)
    (out / MD_NAME).write_text(report["markdown"])
    for task, ts in report["summary"].items():
        if ts["mem_ref"] is not None and any(b["x"] for b in ts["anytime"].values()):
            plot_anytime(out / f"search_quality_{task}.png", ts, data["settings"]["searchers"])
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    data = {} if a.fresh else load_results(path)
    if a.report_only:
        if not data:
            print(f"error: no results in {path}", file=sys.stderr)
            return 2
        write_outputs(out, data)
        print(f"wrote {out / MD_NAME}")
        return 0

    from autopeft.tasks import get_task

    tasks = [get_task(t).name for t in a.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    searchers = [s.strip() for s in a.searchers.split(",") if s.strip()]
    baselines = (list(BASELINES) if a.baselines == "all" else [] if a.baselines == "none"
                 else [b.strip() for b in a.baselines.split(",") if b.strip()])
    for b in baselines:
        if b not in BASELINES:
            print(f"error: unknown baseline {b!r}; valid: {', '.join(BASELINES)}", file=sys.stderr)
            return 2
    m = _parse_per_task(a.max_train_examples, tasks, DEFAULT_MAX_TRAIN_EXAMPLES, FALLBACK_MAX_TRAIN_EXAMPLES,
                        "--max-train-examples")
    bm = _parse_per_task(a.baseline_examples, tasks, m, FALLBACK_MAX_TRAIN_EXAMPLES, "--baseline-examples")
    lrs = _parse_lrs(a.baseline_lr)
    data_dir = str(Path(a.data_dir).resolve())
    notes: list[str] = []
    pooling: str | None = a.baseline_pooling
    if not pooling_supported():
        notes.append(f"Recipes do not accept `pooling` yet: --baseline-pooling {a.baseline_pooling} was dropped; "
                     f"the baselines use the model's default pooling.")
        pooling_note = f"requested {a.baseline_pooling}, NOT applied (recipes have no pooling field yet)"
        pooling = None
    else:
        pooling_note = f"{pooling} (--baseline-pooling)"
    settings = {
        "command": "python benchmarks/search_quality.py" + (" " + shlex.join(argv) if argv else ""),
        "backbone": BACKBONE, "tasks": tasks, "seeds": seeds, "trials": a.trials, "max_train_examples": m,
        "baseline_examples": bm, "budget": a.budget, "space": a.space, "searchers": searchers, "baselines": baselines,
        "baseline_lr": {b: lrs[b] for b in baselines}, "baseline_components": {b: BASELINES[b] for b in baselines},
        "baseline_pooling": pooling, "baseline_pooling_requested": a.baseline_pooling,
        "baseline_pooling_note": pooling_note, "data_dir": data_dir, "out": str(out), "machine": _machine(),
        "notes": notes, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "majority_score": {t: majority_score(t, data_dir) for t in tasks},
    }
    runs: dict[str, dict] = data.get("runs", {})
    data = {"settings": settings, "runs": runs}
    save_results(path, data)
    (out / "runs").mkdir(exist_ok=True)

    t_start = time.time()

    def say(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    plan = []
    for seed in seeds:  # seed-major: an interrupted run still covers every task at the first seed
        for task in tasks:
            plan += [("search", task, s, seed) for s in searchers]
            plan += [("baseline", task, b, seed) for b in baselines]
    say(f"{len(plan)} runs: tasks {', '.join(f'{t} (top fidelity {m[t]:,})' for t in tasks)}; seeds {seeds}; "
        f"{a.trials} trials per search; searchers {', '.join(searchers)}; baselines {', '.join(baselines) or 'none'}; "
        f"results in {path}")
    hint_shown = False
    for i, (kind, task, name, seed) in enumerate(plan, 1):
        key = run_key(kind, task, name, seed)
        if kind == "search":
            config = {"trials": a.trials, "max_train_examples": m[task], "budget": a.budget, "space": a.space}
        else:
            config = {"max_train_examples": bm[task], "budget": a.budget, "learning_rate": lrs[name],
                      "pooling": pooling, "components": BASELINES[name]}
        prev = runs.get(key)
        if prev and prev.get("status") == "ok" and prev.get("config") == config:
            say(f"({i}/{len(plan)}) {key}: already in {JSON_NAME}, skipped")
            continue
        rec: dict[str, Any] = {"kind": kind, "task": task, "name": name, "seed": seed, "config": config}
        t0 = time.time()
        say(f"({i}/{len(plan)}) {key}: " + (f"search, {a.trials} trials, top fidelity {m[task]:,}" if kind == "search"
                                            else f"{bm[task]:,} examples, lr {lrs[name]:g}") + " ...")
        try:
            if kind == "search":
                log = QuietLog(out / "runs" / f"bench-{task}-{name}-s{seed}.log", echo=a.verbose)
                rec |= run_search(task, name, seed, a.trials, m[task], a.budget, a.space, data_dir, out, log)
            else:
                rec |= run_baseline(task, name, seed, lrs[name], bm[task], a.budget, pooling, data_dir)
            rec["status"] = "ok"
        except KeyboardInterrupt:
            say("interrupted: results so far are saved; run the same command again to continue")
            save_results(path, data)
            raise
        except Exception as exc:  # record, go on with the other runs
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            rec["traceback"] = traceback.format_exc()[-3000:]
            if (kind == "search" and isinstance(exc, TypeError) and "searcher" in str(exc) and not hint_shown):
                say("  autopeft.search does not accept searcher= yet: the searches cannot run with this version")
                hint_shown = True
        rec["run_time_s"] = time.time() - t0
        runs[key] = rec
        save_results(path, data)
        if rec["status"] == "ok":
            if kind == "search":
                rows = top_fidelity_rows(rec["trials"], rec["fidelity"], rec["param_limit"])
                best = max((r["score"] for r in rows), default=None)
                spent = sum(spent_examples(t) for t in rec["trials"])
                say(f"  done in {rec['run_time_s']:.0f} s: {len(rec['trials'])} trials, {len(rows)} within budget at "
                    f"the top fidelity, best {best if best is None else f'{best:.4f}'}, {spent:,} examples spent")
            else:
                within = rec["trainable_params"] <= rec["param_limit"]
                say(f"  done in {rec['run_time_s']:.0f} s: score {rec['score']:.4f}, {rec['trainable_params']:,} params "
                    f"({'within' if within else 'OVER'} the limit {rec['param_limit']:,}), "
                    f"{rec['peak_memory_bytes'] / 2**20:.0f} MiB")
        else:
            say(f"  FAILED: {rec['error']}")
    planned = {run_key(kind, task, name, seed) for kind, task, name, seed in plan}
    settings["total_run_time_s"] = sum(r.get("run_time_s", 0.0) for k, r in runs.items() if k in planned)
    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report = write_outputs(out, data)
    for task in tasks:
        for name in ("vs_baseline", "vs_random"):
            print(report["summary"][task]["checks"][name]["text"])
    say(f"wrote {path}, {out / MD_NAME} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
