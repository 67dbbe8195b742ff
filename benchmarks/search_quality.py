"""Search quality at equal total compute, on the untouched test split: autopeft's searchers against
hand-picked PEFT baselines and full fine-tuning.

What a user compares: "I have this much compute; do I run autopeft, or train LoRA / an adapter / ...?"
For every task and seed:

1. ``autopeft.search`` once per searcher (``tpe``, autopeft's default, then ``random`` and ``nsga2``): the
   same space, the same MO-ASHA scheduler, the same number of trials and top fidelity, no time cap. Every
   search selects on its **dev** split (carved from train, seeded by the seed; ``autopeft.data.tasks.DevSplit``)
   and scores its Pareto front once on the **test** split (the task's validation split, never read by a
   decision). The search's number is the test score of its ``best`` pick: the within-budget point with
   the highest dev score at the top fidelity.
2. **Total compute** ``C`` = the training examples the default searcher's search spent: the sum over its
   trials of the examples each trained, every rung (:func:`spent_examples`; an ASHA-stopped trial spent
   up to the rung where it stopped, a rejected sample nothing). Dev and test evaluation are not counted.
3. Each hand-picked baseline (LoRA r=8 alpha 16 on query/value; a parallel FFN adapter, Pfeiffer,
   reduction factor 32; prefix tuning and UniPELT at their defaults; all at lr 3e-3, mean pooling) and
   full fine-tuning (lr 5e-5, ``autopeft.searching.final``) get the **same ``C`` examples as a small learning-rate
   sweep**: ``--lr-multipliers`` (default 0.5x, 1x, 2x the default lr), each run ``C / 3`` examples
   (:func:`split_examples`) with its own linear schedule, on train less the **same dev split** as the
   searches; the run with the best dev score is picked (never on test) and only it is scored on test.
   (``--lr-multipliers 1`` makes it one longer run of ``C`` examples at the default lr.) The project has
   no per-method default lr: 3e-3 is the lr of the default space's start points (LoRA r=8 on SST-2 at
   8,064 examples: 1e-3 82.5%, 3e-3 85.3%, 6e-3 82.1%), used for every PEFT baseline.

Reported per task: test scores (mean +- sample std over seeds, per seed, and the mean of the per-seed
95% bootstrap intervals); paired differences default-searcher minus each other method, per seed, with
a 95% bootstrap interval over seeds (:func:`bootstrap_mean_ci`; with 3 seeds it is crude: only 10
distinct resamples) and a 95% paired bootstrap interval over test examples (:func:`paired_bootstrap_examples`:
the same resampled examples for both methods, seeds fixed: the evaluation noise of the difference);
hypervolume on test of each front against ONE fixed reference per task; and the expected best dev score
against compute (Dodge et al. 2019, "Show Your Work", arXiv:1909.03004, eq. 1; :func:`expected_max`).

Hypervolume reference (the same for every searcher, baseline and seed of a task): points
``(-test score, trainable_params / param_limit, peak_memory / MEM_REF)``, all minimised, against
``(-chance, 1, 1)``: chance is 1/classes for accuracy (0.5 on SST-2), 0 for F1, MCC and Pearson (MRPC,
CoLA, STS-B); ``MEM_REF`` is 1.1x the largest peak training memory of any run of the task (full
fine-tuning's, in practice). One point's hypervolume is ``(score - chance) (1 - params/limit) (1 - memory/MEM_REF)``.
A baseline's is that of its one picked point (0 when over the budget).

Expected best score versus compute: from one search, the dev scores ``v_1 <= ... <= v_N`` of its ``N``
within-budget trials that reached the top fidelity; ``E[max of n draws] = sum_i v_i ((i/N)^n - ((i-1)/N)^n)``
for ``n = 1..N``; draw ``n`` costs ``n C / N`` examples (the search's spend shared out over the trials it
finished, so the curve ends at ``C``). A baseline's draws are its sweep's runs, ``C / 3`` examples each.
The estimator assumes independent draws; TPE's and NSGA-II's trials are not (each depends on the
earlier ones), so for them the curve is that of the trials the search happened to train.

Sizes (defaults) and cost arithmetic (2 free CPU cores, torch 2 threads, batch 32). Training cost per
example, LoRA-like methods: SST-2 2.2 ms (a step ~0.07 s), the others scaled by mean tokens per
example (13 / 12 / 28 / 53 for SST-2 / CoLA / STS-B / MRPC): CoLA 2.2 ms, STS-B 4.5 ms, MRPC 9.5 ms;
full fine-tuning ~2.4x that (a step ~0.17 s on SST-2). Timing 10 LoRA steps of each on a loaded
machine gave CoLA / STS-B / MRPC 1.3x / 2.1x / 5.2x SST-2's cost (noisy; at those ratios the total
below grows by ~20 minutes). Tasks: SST-2 at 2,000 examples (it learns there: 0.80-0.81 test accuracy
in the earlier benchmark, majority class 0.51), STS-B at one epoch of train less dev (5,174 examples), CoLA
and MRPC at three (23,088 and 9,903: at one, CoLA learns nothing and MRPC's LoRA F1 is under the majority
class's, see ``experiments/fidelity_probes.md``). RTE is left out: at chance with LoRA over 5 epochs and 0.62 with
full fine-tuning (fidelity_probes.md), and the dearest epoch after MRPC (2,241 examples x ~11 ms, a tail
of 128-token pairs); ``--tasks sst2,stsb,cola,mrpc,rte`` adds it. MRPC barely leaves the majority class
(F1 0.82 against 0.81 after 3 epochs): read its rows against the majority-class score the report prints. 6 trials per search: the space's 3 start
points, then 3 sampled. MO-ASHA stops few trials (it keeps the extremes of every rung's front; 8-trial
searches spent 4-6x their top fidelity in the earlier benchmark): a search spends ``C ~ 0.6 x 6 = 3.6``
times its top fidelity. Per task and seed the training is ``C`` x (3 searches + 4 PEFT baselines x
~1.1 + full FT x 2.4) = 9.8 ``C``:

* SST-2 ``C`` ~ 7,200 -> 9.8 x 7,200 x 2.2 ms ~ 155 s; CoLA ``C`` ~ 27,700 -> ~600 s;
  STS-B ``C`` ~ 18,600 -> ~820 s; MRPC ``C`` ~ 35,700 -> ~3,300 s; so ~4,900 s per seed, ~4 h for 3 seeds;
* fixed costs: per trial ~8 s (Ray worker, model and data loading, 1-3 dev evaluations: SST-2's dev split
  has 2,000 examples), per search ~15 s (the front scored on test, the pick's predictions), per baseline
  run ~4 s: 36 searches x (6 x 8 + 15) s ~ 38 min, 180 baseline runs ~ 15 min;

~3 hours in all on 2 free cores (3-3.5 h at the timed ratios; more under load). Measured since (2026-12,
a 2-core AMD EPYC whose LoRA step on SST-2 takes ~0.18 s, 2.5x the machine these numbers were planned
on): SST-2 took ~1 h per seed; STS-B's seed 1 took 53 min on a quiet machine (its three searches 5.5-7.5
min each, its five baselines ~7 min each; seed 0, beside other jobs, ~2 h), so the whole benchmark, with
CoLA and MRPC at three epochs, is ~18-22 hours here, run over several sessions (it resumes). An hour is not reachable with the specification's
floor (4 tasks, 3 of them at one epoch, 3 seeds, 3 searchers, 5 baselines at equal compute): one seed
takes ~1 hour. Runs go task by task (SST-2, STS-B, CoLA, MRPC), so an interrupted benchmark has whole
tasks; the same command continues it.

Outputs (``--out``, default ``experiments/``): ``search_quality.json`` (every raw number: settings, each
trial's rungs, each front with test scores, each sweep, the test predictions of every picked model, wall
times), ``search_quality.md`` (tables and the conclusions computed from them) and
``search_quality_<task>.png`` (expected best dev score against compute). Each search's folder is
``<out>/runs/bench-<task>-<searcher>-s<seed>``, its MLflow runs in ``<out>/mlflow.db``.

Resumable: a run whose record is in the JSON with the same settings is skipped (a baseline also needs
the same ``C``: rerunning the default search reruns its baselines), and a search the benchmark was
killed in continues from its last finished trial (``autopeft.search(resume=True)``); ``--fresh`` ignores
earlier results; ``--report-only`` re-renders the Markdown and plots from the JSON.

    python benchmarks/search_quality.py                         # the defaults: ~18-22 h on 2 cores (resumable)
    python benchmarks/search_quality.py --quick --out /tmp/sq   # smoke test of every step: ~2-3 min
    python benchmarks/search_quality.py --report-only           # re-render experiments/search_quality.md
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

from autopeft.searching.final import FULL_FT_LEARNING_RATE  # noqa: E402
from autopeft.searching.pareto import hypervolume  # noqa: E402
from autopeft._util import is_finite  # noqa: E402
from autopeft.errors import first_line  # noqa: E402

DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "glue"
DEFAULT_OUT = PROJECT_ROOT / "experiments"
BACKBONE = "minilm-l6"
JSON_NAME = "search_quality.json"
MD_NAME = "search_quality.md"
#: Version of the JSON layout; ``--report-only`` refuses other versions (the earlier benchmark had none).
FORMAT = 2

#: In the order they run; experiments/fidelity_probes.md says at which fidelity each learns.
DEFAULT_TASKS = ("sst2", "stsb", "cola", "mrpc")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_SEARCHERS = ("tpe", "random", "nsga2")
#: Trials per search (rejected samples take no slot): the default space's 3 start points + 3 sampled.
DEFAULT_TRIALS = 6
#: Top fidelity (training examples) of tasks not listed: one epoch of train less dev (:func:`epoch_examples`).
#: CoLA: 3 epochs (3 x 7,696): at one epoch LoRA at the default space's start-point lr predicts the
#: majority class (dev MCC 0) and full fine-tuning reaches 0.17; at 2-3 epochs LoRA at lr 1e-3 reaches
#: 0.19-0.21 and full fine-tuning 0.26-0.29 (experiments/fidelity_probes.md). MRPC: 3 epochs (3 x 3,301):
#: at one, LoRA's F1 (0.787) is under the majority class's (0.807); at three, LoRA 0.819 and full
#: fine-tuning 0.823 leave it (fidelity_probes.md), which is the least a benchmark task must do.
DEFAULT_MAX_TRAIN_EXAMPLES = {"sst2": 2000, "cola": 23088, "mrpc": 9903}
DEFAULT_BUDGET = "0.5%"
DEFAULT_SPACE = "default"
#: The baselines' sweep: these multiples of each baseline's default lr, ``C / len`` examples each.
DEFAULT_LR_MULTIPLIERS = (0.5, 1.0, 2.0)
BASELINE_POOLING = "mean"
#: ``--quick``: every step once, in ~2-3 minutes on 2 free cores: WNLI (635 training rows, a dev split
#: of 100, a test split of 71: evaluation and tokenisation cost next to nothing; nothing is learned at 64
#: examples, the smoke test checks the machinery, not the scores).
QUICK = {"tasks": "wnli", "seeds": "0", "searchers": "tpe,random", "trials": 2, "max_train_examples": "64",
         "baselines": "lora,full_finetuning"}

#: The hand-picked baselines: name -> components.
BASELINES: dict[str, list[dict[str, Any]]] = {
    "lora": [{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}],
    "adapter": [{"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": 32,
                 "sublayers": ["ffn"]}],
    "prefix_tuning": [{"method": "prefix_tuning"}],
    "unipelt": [{"method": "unipelt"}],
    "full_finetuning": [{"method": "full_finetuning"}],
}
#: Default lr of each baseline (the centre of its sweep). Full fine-tuning: ``autopeft.searching.final``'s.
BASELINE_LR: dict[str, float] = {"lora": 3e-3, "adapter": 3e-3, "prefix_tuning": 3e-3, "unipelt": 3e-3,
                                 "full_finetuning": FULL_FT_LEARNING_RATE}
#: Reported, never "the best hand-picked baseline" (full fine-tuning is not a PEFT method).
REPORT_ONLY_BASELINES = frozenset({"full_finetuning"})
BASELINE_LABELS = {"lora": "LoRA r=8, alpha 16, query/value", "adapter": "parallel FFN adapter (Pfeiffer, rf 32)",
                   "prefix_tuning": "prefix tuning (defaults)", "unipelt": "UniPELT (defaults)",
                   "full_finetuning": "full fine-tuning"}

#: Trial statuses that trained nothing (``spent_examples`` = 0).
NO_SPEND_STATUSES = frozenset({"over_budget", "empty", "invalid"})
#: Bootstrap resamples: over seeds (cheap) and over test examples (one metric per resample, seed and method).
SEED_RESAMPLES = 10_000
EXAMPLE_RESAMPLES = 2_000
LEVEL = 0.95


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
    from autopeft.data.tasks import get_task

    t = get_task(task)
    return score_reference(t.metric, t.num_labels)

def top_fidelity_rows(trials: Iterable[dict], fidelity: int, param_limit: int) -> list[dict]:
    """The within-budget rows at the top fidelity, as ``autopeft.search`` builds its front: one per trial
    with status ``finished``, a row at exactly ``fidelity`` examples, ``trainable_params <= param_limit``
    and a finite (dev) score, in the trials' order. Each row gets the trial's ``trial_id``."""
    out = []
    for t in trials:
        if t.get("status") != "finished":
            continue
        for r in t.get("rows") or []:
            if (r.get("examples_seen") == fidelity and is_finite(r.get("score"))
                    and is_finite(r.get("trainable_params")) and r["trainable_params"] <= param_limit
                    and is_finite(r.get("peak_memory_bytes"))):
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


def search_compute(trials: Iterable[dict]) -> int:
    """Total compute of a search in training examples: :func:`spent_examples` summed over its trials."""
    return sum(spent_examples(t) for t in trials)


def split_examples(total: int, parts: int) -> list[int]:
    """``total`` training examples shared out over ``parts`` runs as evenly as whole examples allow
    (the first ``total % parts`` runs get one more); the parts sum to ``total`` exactly.

    Raises:
        ValueError: ``parts`` < 1 or ``total`` < ``parts`` (a run of no examples).
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < parts:
        raise ValueError(f"{total} examples cannot give each of {parts} runs one")
    q, r = divmod(int(total), parts)
    return [q + 1] * r + [q] * (parts - r)


def expected_max(scores: Sequence[float], n_max: int | None = None) -> list[dict[str, float]]:
    """Expected maximum of ``n`` draws (with replacement) from ``scores``, for ``n = 1 .. n_max``
    (default ``len(scores)``): Dodge et al. 2019, "Show Your Work", arXiv:1909.03004, eq. 1. With the
    ``N`` scores sorted ``v_1 <= ... <= v_N``, ``P(max = v_i) = (i/N)^n - ((i-1)/N)^n``, so
    ``E = sum_i v_i P_i`` and ``std = sqrt(sum_i v_i^2 P_i - E^2)``.

    Returns:
        ``[{"n", "mean", "std"}, ...]``; empty for no finite score.
    """
    v = np.sort(np.array([float(s) for s in scores if is_finite(s)]))
    N = len(v)
    if N == 0:
        return []
    i = np.arange(1, N + 1)
    out = []
    for n in range(1, (n_max or N) + 1):
        p = (i / N) ** n - ((i - 1) / N) ** n
        mean = float(np.sum(v * p))
        var = max(0.0, float(np.sum(v * v * p)) - mean * mean)
        out.append({"n": n, "mean": mean, "std": math.sqrt(var)})
    return out


def expected_max_curve(scores: Sequence[float], compute: float) -> list[list[float]]:
    """``[[examples, E[max of n]], ...]`` for ``n = 1 .. N``: draw ``n`` costs ``n * compute / N`` examples
    (``compute`` shared out over the ``N`` finite scores), so the curve ends at ``compute``."""
    em = expected_max(scores)
    N = len(em)
    return [[compute * e["n"] / N, e["mean"]] for e in em]


def normalised_points(rows: Sequence[dict], param_limit: int, mem_ref: float, score_key: str = "score") -> np.ndarray:
    """``(n, 3)`` minimisation points ``(-score, params / param_limit, memory / mem_ref)``."""
    return np.array([[-float(r[score_key]), r["trainable_params"] / param_limit, r["peak_memory_bytes"] / mem_ref]
                     for r in rows], dtype=float).reshape(-1, 3)


def fixed_hypervolume(rows: Sequence[dict], param_limit: int, mem_ref: float, score_ref: float,
                      score_key: str = "score") -> float:
    """Hypervolume of ``rows`` against the fixed reference ``(-score_ref, 1, 1)`` in the normalised space
    of :func:`normalised_points` (``score_key``: which score, e.g. ``test_score``). Rows without a finite
    score, or at or beyond the reference in any objective, add nothing."""
    rows = [r for r in rows if is_finite(r.get(score_key))]
    if not rows:
        return 0.0
    return float(hypervolume(normalised_points(rows, param_limit, mem_ref, score_key), [-score_ref, 1.0, 1.0]))


def step_value(curve: Sequence[Sequence[float]], x: float, before: float | None = 0.0) -> float | None:
    """Value of a step function (``curve`` sorted by x) at ``x``: the last y with its x <= ``x``
    (``before`` ahead of the first point). After a curve's last point its last value holds."""
    y = before
    for cx, cy in curve:
        if cx <= x:
            y = cy
        else:
            break
    return None if y is None else float(y)


def curve_band(curves: Sequence[Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Mean, min and max over ``curves`` (step functions) on the union of their x values, from the
    first x where every curve has a value (a curve has none ahead of its first point)."""
    curves = [c for c in curves if c]
    if not curves:
        return {"x": [], "mean": [], "min": [], "max": []}
    start = max(c[0][0] for c in curves)
    grid = sorted({float(x) for c in curves for x, _ in c if x >= start})
    values = np.array([[step_value(c, x, before=None) for x in grid] for c in curves], dtype=float)
    return {"x": grid, "mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``{"n", "mean", "std"}`` of the finite values; sample standard deviation (ddof 1), 0 for one value."""
    v = [float(x) for x in values if is_finite(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def bootstrap_mean_ci(values: Sequence[float], n_resamples: int = SEED_RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict[str, float | int | None]:
    """Mean of ``values`` (e.g. per-seed paired differences) and its percentile bootstrap interval: the
    values resampled with replacement ``n_resamples`` times (seeded). ``low``/``high`` are ``None`` for
    fewer than two values. With ``k`` values there are only ``C(2k-1, k)`` distinct resamples (10 for 3):
    the interval is crude, bounded by the smallest and largest value."""
    v = np.array([float(x) for x in values if is_finite(x)])
    if len(v) == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    if len(v) < 2:
        return {"n": 1, "mean": float(v[0]), "low": None, "high": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(1)
    a = (1 - level) / 2
    return {"n": len(v), "mean": float(v.mean()), "low": float(np.quantile(means, a)),
            "high": float(np.quantile(means, 1 - a))}


def batched_metric(metric: str, pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """``metric`` on each row of ``(B, n)`` arrays: the closed forms of
    :func:`autopeft.data.uncertainty.vectorised_metric` (accuracy; binary F1 and MCC, 0 where undefined, as
    scikit-learn returns; Pearson, ``nan`` where a row is constant) where they apply, any other metric of
    :data:`autopeft.data.tasks.METRICS` row by row."""
    from autopeft.data.tasks import METRICS
    from autopeft.data.uncertainty import vectorised_metric

    pred, gold = np.atleast_2d(pred), np.atleast_2d(gold)
    fn_ = METRICS[metric]
    stat = vectorised_metric(fn_.__name__, pred, gold)
    if stat is not None:
        return np.asarray(stat(pred, gold, axis=-1), dtype=float)
    return np.array([fn_(p_, g_) for p_, g_ in zip(pred, gold)], dtype=float)


def paired_bootstrap_examples(metric: str, preds_a: Sequence[Sequence[float]], preds_b: Sequence[Sequence[float]],
                              gold: Sequence[float], n_resamples: int = EXAMPLE_RESAMPLES, seed: int = 0,
                              level: float = LEVEL) -> dict[str, float | None]:
    """Paired bootstrap over test examples of ``mean over seeds (metric(a_s) - metric(b_s))``.

    ``preds_a[s]`` and ``preds_b[s]`` are two methods' predictions of seed ``s`` on the same test
    examples (``gold``). Each resample draws ``n`` example indices with replacement (seeded) and applies
    them to every seed and both methods, so the interval covers the evaluation noise of the difference
    (which examples happen to be in the test split); seeds are held fixed.

    Returns:
        ``{"mean", "low", "high"}`` (``None`` without a pair).
    """
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(preds_a, preds_b) if a is not None and b is not None]
    if not pairs:
        return {"mean": None, "low": None, "high": None}
    g = np.asarray(gold)
    n = len(g)
    point = float(np.mean([batched_metric(metric, a[None], g[None])[0] - batched_metric(metric, b[None], g[None])[0]
                           for a, b in pairs]))
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    gi = g[idx]
    diffs = np.mean([batched_metric(metric, a[idx], gi) - batched_metric(metric, b[idx], gi) for a, b in pairs], axis=0)
    a_ = (1 - level) / 2
    with np.errstate(all="ignore"):
        lo, hi = np.nanquantile(diffs, a_), np.nanquantile(diffs, 1 - a_)
    return {"mean": point, "low": float(lo), "high": float(hi)}


def memory_reference(runs: Iterable[dict]) -> float | None:
    """``MEM_REF`` of a task: 1.1x the largest finite peak memory (bytes) in any row of any trial of the
    searches and in any run of any baseline's sweep (records with ``status == "ok"``); ``None`` without any."""
    peaks = []
    for run in runs:
        if run.get("status") != "ok":
            continue
        if run.get("kind") == "search":
            for t in run.get("trials") or []:
                peaks += [r["peak_memory_bytes"] for r in t.get("rows") or [] if is_finite(r.get("peak_memory_bytes"))]
        else:
            peaks += [s["peak_memory_bytes"] for s in run.get("sweep") or [] if is_finite(s.get("peak_memory_bytes"))]
    return 1.1 * max(peaks) if peaks else None


def pick_best(rows: Sequence[dict]) -> dict | None:
    """The search's ``best`` pick (as ``autopeft export --pick best``): the highest dev ``score``,
    fewer trainable parameters on a tie; ``None`` for no row with a finite score."""
    rows = [r for r in rows if is_finite(r.get("score"))]
    return max(rows, key=lambda r: (r["score"], -r["trainable_params"])) if rows else None


def pick_on_dev(sweep: Sequence[dict]) -> int | None:
    """Index of the sweep run with the highest dev ``score`` (the first on a tie); ``None`` if none is finite."""
    finite = [i for i, s in enumerate(sweep) if is_finite(s.get("score"))]
    return max(finite, key=lambda i: (sweep[i]["score"], -i)) if finite else None


def summarize_search(run: dict, mem_ref: float, score_ref: float) -> dict[str, Any]:
    """Per-seed numbers of one search record (as stored in the JSON)."""
    trials, fid, limit = run["trials"], run["fidelity"], run["param_limit"]
    best = run.get("best")
    compute = search_compute(trials)
    dev_scores = [r["score"] for r in top_fidelity_rows(trials, fid, limit)]
    return {
        "test_score": best.get("test_score") if best else None,
        "test_low": best.get("test_low") if best else None,
        "test_high": best.get("test_high") if best else None,
        "dev_score": best.get("score") if best else None,
        "trainable_params": best.get("trainable_params") if best else None,
        "examples_per_model": best.get("examples_seen") if best else None,
        "within_budget": True,
        "predictions": (run.get("best_predictions") or None),
        "test_hypervolume": fixed_hypervolume(run.get("pareto") or [], limit, mem_ref, score_ref, "test_score"),
        "front_size": len(run.get("pareto") or []),
        "examples_spent": compute,
        "expected_max": expected_max_curve(dev_scores, compute),
        "top_trials": len(dev_scores),
        "wall_time_s": run.get("wall_time_s"),
        "statuses": {s: sum(1 for t in trials if t.get("status") == s) for s in sorted({t.get("status") for t in trials})},
        "included_ray_start": bool(run.get("included_ray_start")),
    }


def summarize_baseline(run: dict, mem_ref: float, score_ref: float) -> dict[str, Any]:
    """Per-seed numbers of one baseline record: its sweep, the run picked on dev, that run's test score
    (counted as a within-budget baseline only within the parameter budget)."""
    sweep, i = run["sweep"], run.get("picked")
    within = run["trainable_params"] <= run["param_limit"]
    picked = sweep[i] if i is not None else {}
    test = run.get("test") or {}
    point = {"test_score": test.get("score"), "trainable_params": run["trainable_params"],
             "peak_memory_bytes": picked.get("peak_memory_bytes", float("inf"))}
    compute = sum(int(s.get("examples_seen") or 0) for s in sweep)
    return {
        "test_score": test.get("score"),
        "test_low": test.get("low"),
        "test_high": test.get("high"),
        "dev_score": picked.get("score"),
        "picked_lr": picked.get("learning_rate"),
        "trainable_params": run["trainable_params"],
        "param_limit": run["param_limit"],
        "examples_per_model": picked.get("examples_seen"),
        "within_budget": within,
        "predictions": test.get("predictions"),
        "test_hypervolume": fixed_hypervolume([point], run["param_limit"], mem_ref, score_ref, "test_score") if within else 0.0,
        "examples_spent": compute,
        "expected_max": expected_max_curve([s.get("score") for s in sweep], compute),
        "wall_time_s": run.get("wall_time_s"),
        "sweep": [{"learning_rate": s.get("learning_rate"), "score": s.get("score"), "examples_seen": s.get("examples_seen")}
                  for s in sweep],
    }


def _aggregate(per_seed: dict[str, dict]) -> dict[str, Any]:
    keys = ("test_score", "test_low", "test_high", "dev_score", "test_hypervolume", "examples_spent", "wall_time_s",
            "examples_per_model")
    return {k: mean_std(v.get(k) for v in per_seed.values()) for k in keys}


def compare(a: dict, b: dict, metric: str, gold: Sequence[float] | None, key: str = "test_score",
            seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two methods' per-seed numbers (``a`` minus ``b``) on the seeds both have:
    ``diffs`` per seed, ``seeds`` (:func:`bootstrap_mean_ci` over seeds), ``examples`` (only for
    ``key == "test_score"``, with predictions and ``gold``: :func:`paired_bootstrap_examples`), and
    ``wins`` (seeds where ``a >= b``) of ``n``."""
    seeds = sorted(s for s in set(a["per_seed"]) & set(b["per_seed"])
                   if is_finite(a["per_seed"][s].get(key)) and is_finite(b["per_seed"][s].get(key)))
    diffs = {s: a["per_seed"][s][key] - b["per_seed"][s][key] for s in seeds}
    out: dict[str, Any] = {"diffs": diffs, "seeds": bootstrap_mean_ci(list(diffs.values()), seed=seed),
                           "wins": sum(d >= 0 for d in diffs.values()), "n": len(diffs), "examples": None}
    if key == "test_score" and gold is not None:
        pa = [a["per_seed"][s].get("predictions") for s in seeds]
        pb = [b["per_seed"][s].get("predictions") for s in seeds]
        if seeds and all(p is not None for p in pa + pb):
            out["examples"] = paired_bootstrap_examples(metric, pa, pb, gold, seed=seed)
    return out


def summarize_task(task: str, runs: Sequence[dict], searchers: Sequence[str], baselines: Sequence[str],
                   seeds: Sequence[int], score_ref: float, metric: str, gold: Sequence[float] | None = None,
                   majority: float | None = None) -> dict[str, Any]:
    """Everything the report shows for one task, from its run records.

    Returns a dict with ``mem_ref``, ``score_ref``, ``methods`` (``search:<name>`` / ``baseline:<name>``
    -> per seed, aggregates over seeds, errors), ``expected_max`` (per method: the per-seed curves and
    their band), ``comparisons`` (the default searcher, ``searchers[0]``, minus every other method:
    :func:`compare` of test scores, and of test hypervolumes for the other searchers) and ``checks``
    (the conclusions, :func:`task_checks`).
    """
    runs = [r for r in runs if r.get("task") == task]
    mem_ref = memory_reference(runs)
    out: dict[str, Any] = {"task": task, "metric": metric, "score_ref": score_ref, "mem_ref": mem_ref,
                           "majority": majority, "methods": {}, "expected_max": {}, "comparisons": {}}
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
            key = f"{kind}:{name}"
            entry = {"kind": kind, "name": name, "per_seed": per_seed, "errors": errors, **_aggregate(per_seed)}
            entry["report_only"] = name in REPORT_ONLY_BASELINES
            entry["within_budget"] = bool(per_seed) and all(v["within_budget"] for v in per_seed.values())
            out["methods"][key] = entry
            curves = {s: v["expected_max"] for s, v in per_seed.items() if v["expected_max"]}
            out["expected_max"][key] = {"per_seed": curves, **curve_band(list(curves.values()))}
    default = f"search:{searchers[0]}" if searchers else None
    if default:
        d = out["methods"][default]
        for key, m in out["methods"].items():
            if key == default:
                continue
            c = {"test_score": compare(d, m, metric, gold)}
            if m["kind"] == "search":
                c["test_hypervolume"] = compare(d, m, metric, None, key="test_hypervolume")
            out["comparisons"][key] = c
    out["checks"] = task_checks(out, default)
    return out


def _fmt(stats: dict | None, digits: int = 4) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    if stats.get("n", 1) > 1 and stats.get("std") is not None:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def _fmt_ci(ci: dict | None, digits: int = 4) -> str:
    """``+0.0123 [-0.0040, +0.0301]``, or the mean alone without an interval."""
    if not ci or ci.get("mean") is None:
        return "—"
    s = f"{ci['mean']:+.{digits}f}"
    if ci.get("low") is not None and ci.get("high") is not None and is_finite(ci["low"]) and is_finite(ci["high"]):
        s += f" [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"
    return s


def _label(key: str, default: str | None = None) -> str:
    kind, name = key.split(":", 1)
    if kind == "search":
        return f"autopeft {name}" + (" (default)" if key == default else "")
    return BASELINE_LABELS.get(name, name)


def _why_not(d: dict, b: dict, comp: dict) -> list[str]:
    """The computed reasons the default search's mean test score is below baseline ``b``'s."""
    why = []
    ex = comp.get("examples")
    if ex and ex.get("low") is not None and ex["low"] <= 0 <= ex["high"]:
        why.append(f"the difference is within the test split's noise: the paired 95% interval over test examples "
                   f"{_fmt_ci(ex)} contains 0")
    elif ex and ex.get("high") is not None and ex["high"] < 0:
        why.append(f"the baseline is ahead beyond the test split's noise (paired interval over test examples {_fmt_ci(ex)})")
    dd, bd = d["dev_score"]["mean"], b["dev_score"]["mean"]
    if dd is not None and bd is not None:
        if dd >= bd:
            why.append(f"on dev the search's pick scored at least as high ({dd:.4f} vs {bd:.4f}): its lead on the "
                       f"dev split did not carry over to test")
        else:
            why.append(f"the search's pick also scored lower on dev ({dd:.4f} vs {bd:.4f}): with this compute the "
                       f"search found no configuration better than the baseline's")
    de, be = d["examples_per_model"]["mean"], b["examples_per_model"]["mean"]
    if de and be and be > de:
        why.append(f"the baseline's picked model trained {be:,.0f} examples against the search's {de:,.0f} "
                   f"(its top fidelity): the sweep puts its compute into {be / de:.1f}x longer training, the search "
                   f"spreads it over trials")
    return why


def task_checks(summary: dict, default: str | None) -> dict[str, Any]:
    """The conclusions of a task, computed from :func:`summarize_task`'s numbers.

    * ``vs_baseline``: the default search's mean test score >= that of the best (by mean test score)
      within-budget hand-picked baseline (full fine-tuning excluded); with the paired intervals and,
      when it does not hold, why (:func:`_why_not`).
    * ``vs_all_baselines``: the same against every baseline except full fine-tuning, over budget or not.
    * ``vs_full_ft``: the paired difference to full fine-tuning at the same compute (reported).
    * ``vs_searchers``: per other searcher, test score and test hypervolume differences.
    * ``learned``: whether the default search's models learned: the mean of the pick's per-seed lower
      95% test bounds is above the majority-class score (classification) or 0 (regression).
    Each has ``holds`` (True / False / None when it cannot be computed) and ``text``.
    """
    methods, comps, task = summary["methods"], summary["comparisons"], summary["task"]
    checks: dict[str, Any] = {}
    d = methods.get(default) if default else None
    dname = f"autopeft ({default.split(':', 1)[1]})" if default else "the default search"
    if d is None or d["test_score"]["mean"] is None:
        why = ("no default searcher" if d is None else "no test score: " + ("; ".join(d["errors"].values())[:300]
                                                                                 or "no within-budget point at the top fidelity"))
        for name in ("vs_baseline", "vs_all_baselines", "vs_full_ft", "learned"):
            checks[name] = {"holds": None, "text": f"{task}: cannot compare ({why})."}
        checks["vs_searchers"] = []
        return checks

    def line(bkey: str) -> str:
        b, c = methods[bkey], comps[bkey]["test_score"]
        return (f"{dname} {_fmt(d['test_score'])} vs {_label(bkey)} {_fmt(b['test_score'])}; paired difference "
                f"{_fmt_ci(c['seeds'])} over {c['n']} seed(s), {_fmt_ci(c['examples'])} over test examples; "
                f"{dname} >= it in {c['wins']} of {c['n']} seeds")

    def best_of(cands):
        cands = [(m["test_score"]["mean"], k) for k, m in cands if m["test_score"]["mean"] is not None]
        return max(cands)[1] if cands else None

    within = best_of((k, m) for k, m in methods.items() if m["kind"] == "baseline" and not m["report_only"]
                     and m["within_budget"])
    anyb = best_of((k, m) for k, m in methods.items() if m["kind"] == "baseline" and not m["report_only"])
    if anyb is None:  # none has a result yet (an interrupted benchmark), not: none fits the budget
        checks["vs_baseline"] = {"holds": None, "text": f"{task}: no hand-picked baseline has a result yet; {dname}'s "
                                                        f"test score is {_fmt(d['test_score'])}."}
    elif within is None:
        checks["vs_baseline"] = {"holds": None, "text": f"{task}: no hand-picked baseline finished within the "
                                                        f"parameter budget; {dname}'s test score is {_fmt(d['test_score'])}."}
    else:
        b = methods[within]
        holds = d["test_score"]["mean"] >= b["test_score"]["mean"]
        text = (f"{task}: {dname} scores at least the best within-budget hand-picked baseline at equal compute: "
                f"{'holds' if holds else 'does NOT hold'} ({line(within)}).")
        why = [] if holds else _why_not(d, b, comps[within]["test_score"])
        if why:
            text += " Why: " + "; ".join(why) + "."
        checks["vs_baseline"] = {"holds": holds, "baseline": within, "default_mean": d["test_score"]["mean"],
                                 "baseline_mean": b["test_score"]["mean"], "why": why, "text": text}
    if anyb is None:
        checks["vs_all_baselines"] = {"holds": None, "text": f"{task}: no hand-picked baseline has a result yet."}
    elif anyb == within:
        checks["vs_all_baselines"] = {"holds": checks["vs_baseline"]["holds"], "baseline": within,
                                      "text": f"{task}: the best hand-picked baseline, within budget or not, is the one above."}
    else:
        b = methods[anyb]
        holds = d["test_score"]["mean"] >= b["test_score"]["mean"]
        first = next(iter(b["per_seed"].values()))
        params, limit = first["trainable_params"], first["param_limit"]
        why = [] if holds else [f"it trains {params:,} parameters, {params / limit:.1f}x the budget of {limit:,} the "
                                f"search keeps to"] + _why_not(d, b, comps[anyb]["test_score"])
        checks["vs_all_baselines"] = {
            "holds": holds, "baseline": anyb, "why": why,
            "text": (f"{task}: against every hand-picked baseline, over the parameter budget too: the best is "
                     f"{_label(anyb)} ({params:,} params, over the budget): {dname} {'>=' if holds else '<'} it "
                     f"({line(anyb)})." + (" Why: " + "; ".join(why) + "." if why else ""))}
    ft = "baseline:full_finetuning"
    if ft in methods and methods[ft]["test_score"]["mean"] is not None:
        holds = d["test_score"]["mean"] >= methods[ft]["test_score"]["mean"]
        why = [] if holds else _why_not(d, methods[ft], comps[ft]["test_score"])
        checks["vs_full_ft"] = {"holds": holds, "why": why,
                                "text": f"{task}: full fine-tuning at the same compute (reported): {line(ft)}."
                                        + (" Why: " + "; ".join(why) + "." if why else "")}
    else:
        checks["vs_full_ft"] = {"holds": None, "text": f"{task}: no full fine-tuning result."}
    checks["vs_searchers"] = []
    for key, m in methods.items():
        if m["kind"] != "search" or key == default or m["test_score"]["mean"] is None:
            if m["kind"] == "search" and key != default:
                checks["vs_searchers"].append({"holds": None, "searcher": m["name"], "text": (
                    f"{task}: {_label(key)}: no result" + (f" ({'; '.join(m['errors'].values())[:300]})" if m["errors"] else "") + ".")})
            continue
        hv = comps[key]["test_hypervolume"]
        holds = d["test_score"]["mean"] >= m["test_score"]["mean"]
        checks["vs_searchers"].append({"holds": holds, "searcher": m["name"], "text": (
            f"{task}: {line(key)}; test hypervolume {_fmt(d['test_hypervolume'])} vs {_fmt(m['test_hypervolume'])}, "
            f"paired difference {_fmt_ci(hv['seeds'])} (higher in {sum(x > 0 for x in hv['diffs'].values())} of {hv['n']} seeds).")})
    floor = summary.get("majority") if summary.get("majority") is not None else 0.0
    low = d["test_low"]["mean"]
    if low is None:
        checks["learned"] = {"holds": None, "text": f"{task}: no test interval to tell whether the models learned."}
    else:
        holds = low > floor
        what = "the majority-class score" if summary.get("majority") is not None else "0 (no correlation)"
        checks["learned"] = {"holds": holds, "text": (
            f"{task}: models learned at this fidelity: {'yes' if holds else 'NO (raise the fidelity)'} (the lower "
            f"95% test bound of {dname}'s pick, {low:.4f} as a mean over seeds, is {'above' if holds else 'not above'} "
            f"{what}, {floor:.4f}).")}
    return checks


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _per_seed(per_seed: dict, key: str, digits: int = 4) -> str:
    return ", ".join(f"s{s}: " + ("—" if v.get(key) is None else f"{v[key]:.{digits}f}") for s, v in per_seed.items())


def render_markdown(report: dict) -> str:
    """The Markdown report: command, method, sizes, one section per task, the computed conclusions, notes."""
    st, summ = report["settings"], report["summary"]
    default = f"search:{st['searchers'][0]}" if st["searchers"] else None
    mult = st["lr_multipliers"]
    sweep = ("one run of C examples at the default lr" if len(mult) == 1 and mult[0] == 1
             else f"a sweep of {len(mult)} learning rates ({', '.join(f'{m:g}x' for m in mult)} the default), "
                  f"C/{len(mult)} examples each, the run with the best dev score picked")
    lines = ["# Search quality at equal compute, on the untouched test split", ""]
    lines += ["Command (from the project root):", "", "```", st["command"], "```", ""]
    lines += [
        f"- Backbone {st['backbone']}; budget {st['budget']} of the backbone's parameters (head excluded); search "
        f"space `{st['space']}`; {st['trials']} trials per search (rejected samples take no slot); the search's "
        f"MO-ASHA scheduler; no time cap. Searchers: {', '.join(st['searchers'])} (the first is autopeft's default; "
        f"same space, scheduler, trials and top fidelity).",
        f"- Seeds: {', '.join(map(str, st['seeds']))}. A seed seeds the dev split, the sampler and every trial "
        f"of the searches, and the baselines' training; each search and baseline of a seed uses the same dev split.",
        "- Splits: every search decision and every baseline's learning-rate pick reads only the **dev** split "
        "(carved from train, stratified); the **test** split (the task's validation split) is read once per "
        "picked model. The search's number is the test score of its `best` pick (highest dev score within budget "
        "at the top fidelity).",
        f"- Total compute C = training examples the default search spent (every trial, every rung; evaluation "
        f"not counted). Each baseline gets the same C as {sweep}; full fine-tuning likewise (reported, not a "
        f"within-budget baseline). The other searchers spend what their searches spend (column 'examples spent').",
        "- Baselines: " + "; ".join(f"{BASELINE_LABELS.get(b, b)} (default lr {st['baseline_lr'][b]:g})"
                                    for b in st["baselines"]) + f"; pooling {st.get('baseline_pooling', BASELINE_POOLING)}.",
        "- ± is the sample standard deviation over seeds. Paired differences are the default searcher minus the "
        f"method, per seed: mean [95% bootstrap interval over seeds ({SEED_RESAMPLES:,} resamples; with "
        f"{len(st['seeds'])} seeds only a handful of distinct resamples, so a crude interval bounded by the smallest "
        f"and largest difference)] and mean [95% paired bootstrap interval over test examples ({EXAMPLE_RESAMPLES:,} "
        "resamples, the same examples for both methods, seeds fixed: the evaluation noise alone)].",
        "- Hypervolume on test: of each front's points (test score, trainable params / param limit, peak memory / "
        "MEM_REF), all minimised, against one reference per task (-chance, 1, 1); chance = 1/classes for "
        "accuracy, 0 for F1/MCC/Pearson; MEM_REF = 1.1x the largest peak training memory of any run of the task. "
        "A baseline's is that of its one point (0 over the budget).",
        "- Expected best dev score against compute (Dodge et al. 2019, arXiv:1909.03004, eq. 1): E[max of n draws] "
        "from a run's dev scores (a search: its within-budget top-fidelity trials; a baseline: its sweep), draw n "
        "costing n/N of the run's compute; mean over seeds in `search_quality_<task>.png`. The estimator assumes "
        "independent draws, which TPE's and NSGA-II's trials are not.",
        f"- Machine: {st['machine']}. Wall time of the runs recorded here: {st.get('total_run_time_s', 0) / 60:.1f} min.",
        "",
    ]
    for task in st["tasks"]:
        t = summ.get(task)
        if t is None:
            lines += [f"## {task}", "", "No results yet (the benchmark was interrupted before this task: run the same "
                      "command again, it continues where it stopped).", ""]
            continue
        sizes = (st.get("splits") or {}).get(task) or {}
        fid = st["max_train_examples"][task]
        head = f"## {task} ({t['metric']})"
        lines += [head, ""]
        if sizes:
            lines.append(f"Splits: train {sizes['train']:,} (less dev) / dev {sizes['dev']:,} / test {sizes['test']:,}. "
                         f"Top fidelity {fid:,} examples = {fid / sizes['train']:.2f} epochs of train.")
        mem, limit = t["mem_ref"], t.get("param_limit")
        ref = f"Hypervolume reference: score {t['score_ref']:g}"
        ref += f", parameter limit {limit:,}" if isinstance(limit, int) else ""
        ref += f", MEM_REF {mem / 2**20:.0f} MiB." if mem else ", MEM_REF — (no run finished)."
        if t.get("rungs"):
            ref += f" Rungs: {', '.join(f'{r:,}' for r in t['rungs'])} examples."
        lines += [ref, ""]
        lines += ["| method | test score, mean ± std (per seed) | test 95% interval (mean ends) | dev score of the pick | "
                  "trainable params | examples spent (mean) | examples per picked model | test hypervolume | "
                  "E[best dev] at C | wall time (mean) |",
                  "|---|---|---|---|---:|---:|---:|---|---|---:|"]
        for key, m in t["methods"].items():
            label = _label(key, default)
            if m["report_only"]:
                label += " (reported only)"
            params = {v.get("trainable_params") for v in m["per_seed"].values() if v.get("trainable_params") is not None}
            ptxt = (f"{params.pop():,}" if len(params) == 1 else "various" if params else "—")
            if m["kind"] == "baseline" and m["per_seed"] and not m["within_budget"]:
                ptxt += " (over budget)"
            score = f"{_fmt(m['test_score'])} ({_per_seed(m['per_seed'], 'test_score')})"
            if m["kind"] == "baseline" and m["per_seed"]:
                score += "; lr picked: " + ", ".join(f"s{s}: {v['picked_lr']:g}" for s, v in m["per_seed"].items()
                                                      if v.get("picked_lr") is not None)
            if m["kind"] == "search" and m["per_seed"]:
                statuses: dict[str, int] = {}
                for v in m["per_seed"].values():
                    for k, n in v["statuses"].items():
                        statuses[k] = statuses.get(k, 0) + n
                score += "; trials: " + ", ".join(f"{n} {k}" for k, n in sorted(statuses.items()))
            if m["errors"]:
                score += " — errors: " + "; ".join(f"s{s}: {e}" for s, e in m["errors"].items())[:400]
            ci = (f"[{m['test_low']['mean']:.4f}, {m['test_high']['mean']:.4f}]"
                  if m["test_low"]["mean"] is not None and m["test_high"]["mean"] is not None else "—")
            band = t["expected_max"].get(key) or {}
            em = f"{band['mean'][-1]:.4f}" if band.get("mean") else "—"
            wall = f"{m['wall_time_s']['mean']:.0f} s" if m["wall_time_s"]["mean"] is not None else "—"
            spent = f"{m['examples_spent']['mean']:,.0f}" if m["examples_spent"]["mean"] is not None else "—"
            per_model = f"{m['examples_per_model']['mean']:,.0f}" if m["examples_per_model"]["mean"] is not None else "—"
            lines.append(f"| {label} | {score} | {ci} | {_fmt(m['dev_score'])} | {ptxt} | {spent} | {per_model} | "
                         f"{_fmt(m['test_hypervolume'])} | {em} | {wall} |")
        if t["comparisons"]:
            lines += ["", f"Paired differences, {_label(default, default)} minus each method (test score; for searchers "
                          "also test hypervolume):", "",
                      "| minus | per seed | mean [95% CI over seeds] | mean [95% CI over test examples] | default >= it (seeds) |",
                      "|---|---|---|---|---:|"]
            for key, c in t["comparisons"].items():
                for what, x in c.items():
                    per = ", ".join(f"s{s}: {v:+.4f}" for s, v in x["diffs"].items()) or "—"
                    name = _label(key) + ("" if what == "test_score" else " (test hypervolume)")
                    wins = f"{x['wins']} of {x['n']}" if what == "test_score" else \
                        f"{sum(v > 0 for v in x['diffs'].values())} of {x['n']} (strictly higher)"
                    lines.append(f"| {name} | {per} | {_fmt_ci(x['seeds'])} | {_fmt_ci(x['examples'])} | {wins} |")
        if t.get("majority") is not None:
            lines += ["", f"Majority-class score on test (always the training split's most frequent label): "
                          f"{t['majority']:.4f}."]
        lines += ["", f"Expected best dev score against compute: `search_quality_{task}.png`.", ""]
    lines += ["## Conclusions (computed from the numbers above)", ""]
    def complete(t: dict) -> bool:  # reports written before runs_planned existed count as complete
        return t.get("runs_recorded", 0) >= t.get("runs_planned", 0)

    wins = [summ[t]["checks"]["vs_baseline"]["holds"] for t in st["tasks"] if t in summ and complete(summ[t])]
    n_ok = sum(1 for h in wins if h)
    n_known = sum(1 for h in wins if h is not None)
    partial = [t for t in st["tasks"] if t in summ and not complete(summ[t])]
    lines += [f"- autopeft's default searcher ({st['searchers'][0]}) scores at least the best within-budget hand-picked "
              f"baseline at equal compute (mean test score over seeds) on {n_ok} of {n_known} complete tasks with "
              f"results ({len(st['tasks'])} planned"
              + (f"; not counted, some runs still missing: {', '.join(partial)}" if partial else "") + ")."]
    for task in st["tasks"]:
        t = summ.get(task)
        if t is None:
            continue
        c = t["checks"]
        mark = "" if complete(t) else (f"PROVISIONAL ({t['runs_recorded']} of {t['runs_planned']} planned runs "
                                       f"recorded): ")
        for name in ("learned", "vs_baseline", "vs_all_baselines", "vs_full_ft"):
            lines.append(f"- {mark}{c[name]['text']}")
        lines += [f"- {mark}{x['text']}" for x in c["vs_searchers"]]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["- Examples spent by a search: the sum over its trials of the examples each trained (up to the last "
              "rung it reached); over-budget, empty and invalid trials spend none. A baseline's: the sum over its sweep.",
              "- Wall times include each run's evaluations; the first search of a process also includes Ray's start.",
              ""]
    return "\n".join(lines)


def plot_expected_max(path: Path, task_summary: dict, default: str | None = None) -> Path:
    """Expected best dev score against training examples, one line per method (mean over seeds; band:
    min-max over seeds), a dotted vertical line at the mean total compute C of the default search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, band) in enumerate(task_summary["expected_max"].items()):
        if not band.get("x"):
            continue
        n = len(band["per_seed"])
        c = colors[i % len(colors)]
        style = "-" if key.startswith("search:") else "--"
        ax.step(band["x"], band["mean"], where="post", color=c, linestyle=style, marker="o", markersize=3,
                label=f"{_label(key, default)} ({n} seed{'s' * (n > 1)})")
        ax.fill_between(band["x"], band["min"], band["max"], step="post", color=c, alpha=0.12)
    d = task_summary["methods"].get(default) if default else None
    if d and d["examples_spent"]["mean"]:
        ax.axvline(d["examples_spent"]["mean"], color="grey", linestyle=":", linewidth=1, label="C (default search)")
    ax.set_xlabel("training examples (compute)")
    ax.set_ylabel(f"expected best dev {task_summary['metric']}")
    ax.set_title(f"{task_summary['task']}: expected best dev score vs compute (Dodge et al. 2019)", fontsize=9)
    ax.legend(fontsize=7)
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
    """The searches' ``progress``: appends each line to a log file (echoes it with ``echo``); a resumed
    search's lines follow the interrupted attempt's. Plain attributes only, no open file: Ray pickles the
    search algorithm, which holds the callback."""

    def __init__(self, path: str | Path, echo: bool = False) -> None:
        self.path, self.echo = str(path), echo
        with open(self.path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")

    def __call__(self, msg: str) -> None:
        with open(self.path, "a") as f:
            f.write(msg + "\n")
        if self.echo:
            print("    " + msg, flush=True)


def run_key(kind: str, task: str, name: str, seed: int) -> str:
    return f"{kind}/{task}/{name}/s{seed}"


def task_splits(task: str, data_dir: str, seed: int = 0) -> dict[str, Any]:
    """Sizes a search of ``task`` uses: ``train`` (less dev), ``dev``, ``test``, and the recipe's ``dev``
    mapping for ``seed`` (as ``autopeft.search`` carves it: :func:`autopeft.data.tasks.default_dev_examples`)."""
    from autopeft.data.tasks import DevSplit, default_dev_examples, get_task, load_split

    t = get_task(task)
    n_train = len(load_split(t, "train", data_dir))
    n_dev = default_dev_examples(n_train)
    return {"train": n_train - n_dev, "dev": n_dev, "test": len(load_split(t, "validation", data_dir)),
            "dev_split": DevSplit(examples=n_dev, seed=seed).model_dump()}


def majority_score(task: str, data_dir: str) -> float | None:
    """The task's metric on the test split when always predicting the training split's most frequent
    label (``None`` for regression or unreadable data): what "learned nothing" scores."""
    from autopeft.data.tasks import get_task, load_split

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


def predict_test(model, recipe, data_dir: str) -> dict[str, Any]:
    """Score ``model`` once on the test split, keeping its per-example predictions: ``{"score", "low",
    "high", "metrics", "examples", "predictions", "gold"}`` (as ``autopeft.training.scoring.score_test``, seeded
    by the recipe's seed)."""
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches
    from autopeft.training.setup import pick_device
    from autopeft.training.scoring import predict_ids
    from autopeft.data.uncertainty import bootstrap_ci

    task = get_task(recipe.task)
    dev = pick_device(None)
    model = model.to(dev)
    batches = Batches(load_split(task, "validation", data_dir), load_tokenizer(recipe.backbone),
                      recipe.training.max_seq_length, dev)
    pred = predict_ids(model, task, batches, recipe.training.eval_batch_size)
    gold = np.asarray(batches.split.labels)
    metrics = task.score(pred, gold)
    low, high = bootstrap_ci(task.metrics[task.metric], pred, gold, seed=recipe.training.seed)
    as_list = (lambda a: [round(float(x), 5) for x in a]) if task.num_labels == 1 else (lambda a: [int(x) for x in a])
    return {"score": metrics[task.metric], "low": low, "high": high, "metrics": metrics, "examples": len(pred),
            "predictions": as_list(pred), "gold": as_list(gold)}


def baseline_recipe_dict(task: str, name: str, lr: float, examples: int, seed: int, dev: dict) -> dict:
    """The recipe of one baseline run: its components, mean pooling, ``lr``, ``examples`` training
    examples on its own linear schedule, the search's ``dev`` split."""
    return {"backbone": BACKBONE, "task": task, "components": BASELINES[name], "pooling": BASELINE_POOLING,
            "dev": dev, "training": {"learning_rate": lr, "max_train_examples": examples, "seed": seed}}


def run_baseline(task: str, name: str, seed: int, lrs: Sequence[float], compute: int, budget: str, dev: dict,
                 data_dir: str, say: Callable[[str], None] = print) -> dict:
    """One baseline at ``compute`` training examples: a run per lr of ``lrs`` with
    :func:`split_examples`'s share, each scored on dev; the best on dev is scored once on test."""
    import torch

    from autopeft.searching.budget import parse_budget
    from autopeft.composition.recipe import count_recipe, recipe_from_dict
    from autopeft.training.trainer import run_trial

    shares = split_examples(compute, len(lrs))
    t0 = time.time()
    sweep, best_model, best_recipe, picked = [], None, None, None
    limit = counts = None
    for lr, n in zip(lrs, shares):
        recipe = recipe_from_dict(baseline_recipe_dict(task, name, lr, n, seed, dev))
        if counts is None:
            counts = count_recipe(recipe)
            limit = parse_budget(budget).limit(counts.backbone_params)
        res, model = run_trial(recipe, data_dir)
        sweep.append({"learning_rate": lr, "examples_seen": res.examples_seen, "score": res.score,
                      "score_low": res.score_low, "score_high": res.score_high, "metrics": res.metrics,
                      "peak_memory_bytes": res.peak_memory_bytes, "train_time_s": res.train_time_s,
                      "wall_time_s": res.wall_time_s, "trainable_params": res.trainable_params})
        say(f"    lr {lr:g}, {res.examples_seen:,} examples: dev {res.score:.4f} ({res.wall_time_s:.0f} s)")
        i = pick_on_dev(sweep)
        if i == len(sweep) - 1 or i is None:  # the best on dev so far (or nothing finite yet): keep it
            best_model, best_recipe, picked = model, recipe, i
        else:
            del model
    # picked None (no finite dev score): the last run is scored, so the record still says what happened
    test = predict_test(best_model, best_recipe, data_dir)
    del best_model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"sweep": sweep, "picked": picked, "test": test, "trainable_params": sweep[0]["trainable_params"],
            "param_limit": limit, "backbone_params": counts.backbone_params, "compute": compute,
            "recipe": best_recipe.model_dump(mode="json"), "wall_time_s": time.time() - t0}


def earlier_attempt(folder: Path, fresh: bool = False) -> str:
    """What to do with a search folder the benchmark finds before a search: ``"new"`` (none),
    ``"resume"`` (an interrupted search: ``search.json`` and ``resume.json`` without ``result.json``;
    its finished trials are kept) or ``"set_aside"`` (a finished search whose record never reached the
    JSON, one that cannot be resumed, or any with ``fresh``)."""
    from autopeft.searching.resume import REQUEST_FILE

    folder = Path(folder)
    if not folder.exists():
        return "new"
    if (not fresh and (folder / "search.json").is_file() and (folder / REQUEST_FILE).is_file()
            and not (folder / "result.json").is_file()):
        return "resume"
    return "set_aside"


def run_search(task: str, searcher: str, seed: int, trials: int, examples: int, budget: str, space: str,
               data_dir: str, out: Path, log: Callable[[str], None], fresh: bool = False) -> dict:
    """One ``autopeft.search`` with the given searcher; its record, with the ``best`` pick's test
    predictions (its kept weights scored again on test: the same score as the front's ``test_score``).
    An interrupted search of the same name in ``out/runs`` is resumed, unless ``fresh``."""
    import autopeft
    from autopeft.searching.runs import kept_dir
    from autopeft.composition.recipe import Recipe
    from autopeft.training.saved import is_trained_folder, load_trained

    try:
        import ray

        ray_up = ray.is_initialized()
    except ImportError:  # pragma: no cover
        ray_up = False
    from autopeft.searching.resume import ResumeError

    name = f"bench-{task}-{searcher}-s{seed}"
    runs = out / "runs"
    folder = runs / name

    def set_aside() -> None:  # a failed or finished-but-unrecorded earlier attempt: keep it, start clean
        k = 1
        while (runs / f"{name}.earlier-{k}").exists():
            k += 1
        folder.rename(runs / f"{name}.earlier-{k}")

    state = earlier_attempt(folder, fresh)
    resume = state == "resume"
    if state == "set_aside":
        set_aside()
    kwargs = dict(task=task, budget=budget, space=space, trials=trials, time_budget_s=math.inf, data_dir=data_dir, seed=seed,
                  searcher=searcher, max_train_examples=examples, progress=log, name=name, output_dir=runs,
                  tracking_uri=f"sqlite:///{out}/mlflow.db", experiment="search-quality",
                  # every rung scores all of dev, as the searches recorded before RUNG_EVAL_EXAMPLES did: one
                  # benchmark, one scheduler (a resumed benchmark must not mix two)
                  training={"rung_eval_examples": None})
    t0 = time.time()
    try:
        result = autopeft.search(**kwargs, resume=resume)
    except ResumeError as exc:  # started with other settings: start again
        log(f"cannot resume the earlier attempt ({exc}); starting again")
        set_aside()
        resume = False
        result = autopeft.search(**kwargs)
    wall = time.time() - t0
    best = pick_best(result.pareto)
    preds = gold = None
    if best is not None and is_trained_folder(kept_dir(result.path, best["trial_id"])):
        scored = predict_test(load_trained(kept_dir(result.path, best["trial_id"])), Recipe.model_validate(best["recipe"]),
                              data_dir)
        preds, gold = scored["predictions"], scored["gold"]
        if is_finite(best.get("test_score")) and not math.isclose(scored["score"], best["test_score"], abs_tol=1e-6):
            log(f"note: the pick's test score re-scored {scored['score']:.6f}, the search reported {best['test_score']:.6f}")
    pareto = [{k: v for k, v in r.items() if k != "recipe"} | {"methods": [c.get("method") for c in r["recipe"]["components"]]}
              for r in result.pareto]
    best_rec = None
    if best is not None:
        best_rec = {k: best.get(k) for k in ("trial_id", "score", "score_low", "score_high", "test_score", "test_low",
                                             "test_high", "test_metrics", "trainable_params", "peak_memory_bytes",
                                             "examples_seen")} | {"recipe": best["recipe"]}
    return {"trials": result.trials, "pareto": pareto, "best": best_rec, "best_predictions": preds, "gold": gold,
            "param_limit": result.param_limit, "fidelity": result.fidelity, "wall_time_s": result.wall_time_s,
            "call_time_s": wall, "included_ray_start": not ray_up, "resumed": resume, "path": str(result.path),
            "mlflow_run_id": result.mlflow_run_id, "search_settings": result.settings or {}}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _parse_per_task(text: str | None, tasks: Sequence[str], defaults: dict[str, int], what: str) -> dict[str, int]:
    """``"2000"``, ``"sst2=3000,rte=2000"`` or ``"1500,sst2=3000"`` -> {task: value} for every task of
    ``tasks`` (a bare number sets every task; ``task=value`` wins over it; the rest keep ``defaults``)."""
    out = {t: defaults[t] for t in tasks}
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
    p.add_argument("--tasks", default=None, help=f"comma-separated GLUE tasks (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--searchers", default=None, help="comma-separated; the first is the default searcher the "
                   f"conclusions are about (default {','.join(DEFAULT_SEARCHERS)})")
    p.add_argument("--trials", type=int, default=None, help=f"trials per search, every searcher (default {DEFAULT_TRIALS})")
    p.add_argument("--max-train-examples", default=None,
                   help="top fidelity: one number for every task and/or task=value, e.g. 'sst2=3000,cola=4000'; "
                        "defaults: " + ", ".join(f"{t}={n}" for t, n in DEFAULT_MAX_TRAIN_EXAMPLES.items())
                        + ", every other task one epoch of train less dev")
    p.add_argument("--budget", default=DEFAULT_BUDGET, help="trainable-parameter budget (0.5%%, 0.005, 120k)")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space name or YAML path")
    p.add_argument("--baselines", default=None, help="'all', 'none' or a comma-separated subset of " + ", ".join(BASELINES))
    p.add_argument("--baseline-lr", default=None, help="default lr overrides as name=value, e.g. 'prefix_tuning=1e-2'; "
                   "defaults: " + ", ".join(f"{k}={v:g}" for k, v in BASELINE_LR.items()))
    p.add_argument("--lr-multipliers", default=",".join(f"{m:g}" for m in DEFAULT_LR_MULTIPLIERS),
                   help="the baselines' sweep: multiples of each default lr, C/len examples each ('1': one run of C)")
    p.add_argument("--quick", action="store_true", help="smoke test of every step (~2-3 min): "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " unless given")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="local GLUE folder (../shared/data/glue)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (JSON, Markdown, plots, runs/, mlflow.db)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON (rerun everything)")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="an earlier benchmark's JSON: a baseline run recorded there with exactly the config this "
                        "run needs (compute, learning rates, components, pooling, dev split) is copied, not re-run "
                        "(a baseline does not read the search space, so a changed space keeps its baselines)")
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
    from autopeft.data.tasks import get_task

    st = dict(data["settings"])
    names = {"search": set(st["searchers"]), "baseline": set(st["baselines"])}
    planned = {k: r for k, r in data.get("runs", {}).items()  # runs of this plan only (the JSON may hold more)
               if r.get("task") in st["tasks"] and r.get("seed") in st["seeds"] and r.get("name") in names.get(r.get("kind"), ())}
    runs = list(planned.values())
    st["total_run_time_s"] = sum(r.get("run_time_s", 0.0) for r in runs)  # also when the run was interrupted
    summary = {}
    for task in st["tasks"]:
        if not any(r.get("task") == task for r in runs):
            continue  # not started yet: one line in the report, no empty tables
        t = get_task(task)
        ts = summarize_task(task, runs, st["searchers"], st["baselines"], st["seeds"], score_reference(t.metric, t.num_labels),
                            t.metric, gold=(data.get("test_labels") or {}).get(task),
                            majority=(st.get("majority_score") or {}).get(task))
        limits = {r["param_limit"] for r in runs if r.get("task") == task and r.get("status") == "ok"}
        ts["param_limit"] = next(iter(limits)) if len(limits) == 1 else (sorted(limits) if limits else None)
        ss = [r.get("search_settings") or {} for r in runs if r.get("task") == task and r.get("kind") == "search"
              and r.get("status") == "ok"]
        ts["rungs"] = next((x["rungs"] for x in ss if x.get("rungs")), None)
        summary[task] = ts
    notes = list(st.get("notes", []))
    for task in summary:
        if isinstance(summary[task]["param_limit"], list):
            notes.append(f"{task}: runs disagree on the parameter limit: {summary[task]['param_limit']}.")
    notes += shared_samples_notes(runs, st["searchers"])
    errors = [f"{k}: {r.get('error')}" for k, r in planned.items() if r.get("status") != "ok"]
    if errors:
        notes.append(f"{len(errors)} run(s) failed: " + " | ".join(e[:200] for e in errors[:8]))
    have = {run_key(r["kind"], r["task"], r["name"], r["seed"]) for r in runs}
    missing = [run_key(k, t, n, s) for t in st["tasks"] for s in st["seeds"]
               for k, ns in (("search", st["searchers"]), ("baseline", st["baselines"])) for n in ns
               if run_key(k, t, n, s) not in have]
    if missing:
        notes.append(f"{len(missing)} planned run(s) have no result yet (an interrupted benchmark: run the same command "
                     f"again): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    per_task = len(st["seeds"]) * (len(st["searchers"]) + len(st["baselines"]))
    for task in summary:  # a task's conclusions drawn before all its runs are in are marked, not counted
        summary[task]["runs_planned"] = per_task
        summary[task]["runs_recorded"] = per_task - sum(1 for k in missing if k.split("/")[1] == task)
    report = {"settings": st, "summary": summary, "notes": notes}
    report["markdown"] = render_markdown(report)
    return report


def shared_samples_notes(runs: Sequence[dict], searchers: Sequence[str]) -> list[str]:
    """One note per pair of searchers that sampled the same configurations in the same order at the
    same seed (task, seed and the length of the shared prefix listed): TPE's start-up samples and
    NSGA-II's first generation are Optuna's ``RandomSampler`` with the search's seed, so a search
    shorter than those samples exactly what random search does and the searchers cannot be told
    apart there."""
    by = {(r["task"], r["seed"], r["name"]): [json.dumps(t.get("config"), sort_keys=True) for t in r["trials"]]
          for r in runs if r.get("kind") == "search" and r.get("status") == "ok" and r.get("trials")}
    notes = []
    for i, a in enumerate(searchers):
        for b in searchers[i + 1:]:
            cells = []
            for (task, seed, name), xs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                ys = by.get((task, seed, b)) if name == a else None
                if ys is None:
                    continue
                same = next((k for k, (x, y) in enumerate(zip(xs, ys)) if x != y), min(len(xs), len(ys)))
                if same > 0:
                    cells.append(f"{task} s{seed}: first {same} of {len(xs)}/{len(ys)}")
            if cells:
                notes.append(f"{a} and {b} sampled the same configurations in the same order (rejected samples "
                             f"included; the start points are shared by design) - " + "; ".join(cells)
                             + ". TPE's start-up samples and NSGA-II's first generation are Optuna's RandomSampler with "
                               "the search's seed, so every searcher's first samples after the start points are the "
                               "same draws: only the samples after the shared prefix can tell the searchers apart "
                               "(more trials per search, or a longer run, separate them).")
    return notes


def _slim(summary: dict) -> dict:
    """The summary without per-example predictions (they stay in the runs): the JSON stays readable."""
    out = {}
    for task, ts in summary.items():
        ts = dict(ts)
        ts["methods"] = {k: {**m, "per_seed": {s: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                                               for s, v in m["per_seed"].items()}} for k, m in ts["methods"].items()}
        out[task] = ts
    return out


def write_outputs(out: Path, data: dict) -> dict:
    report = build_report(data)
    data["summary"] = _slim(report["summary"])
    data["notes"] = report["notes"]
    save_results(out / JSON_NAME, data)
    (out / MD_NAME).write_text(report["markdown"])
    default = f"search:{data['settings']['searchers'][0]}" if data["settings"]["searchers"] else None
    for task, ts in report["summary"].items():
        if any(b.get("x") for b in ts["expected_max"].values()):
            plot_expected_max(out / f"search_quality_{task}.png", ts, default)
    return report


def _resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Explicit flags win, then ``--quick``'s presets, then the defaults."""
    defaults = {"tasks": ",".join(DEFAULT_TASKS), "seeds": ",".join(map(str, DEFAULT_SEEDS)),
                "searchers": ",".join(DEFAULT_SEARCHERS), "trials": DEFAULT_TRIALS, "max_train_examples": None,
                "baselines": "all"}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick and k in QUICK else v)
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _resolve(build_parser().parse_args(argv))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    data = {} if a.fresh else load_results(path)
    if data and data.get("format") != FORMAT:
        if a.report_only:
            print(f"error: {path} was written by the earlier benchmark (no format {FORMAT}): rerun the benchmark "
                  f"to replace it", file=sys.stderr)
            return 2
        print(f"note: {path} holds the earlier benchmark's results (another format): they are replaced", flush=True)
        data = {}
    if a.report_only:
        if not data:
            print(f"error: no results in {path}", file=sys.stderr)
            return 2
        write_outputs(out, data)
        print(f"wrote {out / MD_NAME}")
        return 0

    from autopeft.data.tasks import get_task

    tasks = [get_task(t).name for t in a.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    searchers = [s.strip() for s in a.searchers.split(",") if s.strip()]
    baselines = (list(BASELINES) if a.baselines == "all" else [] if a.baselines == "none"
                 else [b.strip() for b in a.baselines.split(",") if b.strip()])
    for b in baselines:
        if b not in BASELINES:
            print(f"error: unknown baseline {b!r}; valid: {', '.join(BASELINES)}", file=sys.stderr)
            return 2
    if not searchers:
        print("error: --searchers is empty: the baselines' compute is the default search's", file=sys.stderr)
        return 2
    mult = [float(x) for x in a.lr_multipliers.split(",") if x.strip()]
    if not mult or any(m <= 0 for m in mult):
        print(f"error: --lr-multipliers {a.lr_multipliers!r}: positive numbers, comma-separated", file=sys.stderr)
        return 2
    data_dir = str(Path(a.data_dir).resolve())
    splits = {t: task_splits(t, data_dir) for t in tasks}
    epoch = {t: DEFAULT_MAX_TRAIN_EXAMPLES.get(t, splits[t]["train"]) for t in tasks}
    m = _parse_per_task(a.max_train_examples, tasks, epoch, "--max-train-examples")
    lrs = _parse_lrs(a.baseline_lr)
    reuse = load_results(Path(a.reuse)) if a.reuse else {}
    from autopeft.searching.space import SearchSpace

    fingerprint = SearchSpace.load(a.space).fingerprint
    settings = {
        "command": "python benchmarks/search_quality.py" + (" " + shlex.join(argv) if argv else ""),
        "backbone": BACKBONE, "tasks": tasks, "seeds": seeds, "trials": a.trials, "max_train_examples": m,
        "budget": a.budget, "space": a.space, "space_fingerprint": fingerprint, "reuse": a.reuse, "searchers": searchers,
        "baselines": baselines, "baseline_lr": {b: lrs[b] for b in baselines}, "lr_multipliers": mult,
        "baseline_components": {b: BASELINES[b] for b in baselines}, "baseline_pooling": BASELINE_POOLING,
        "splits": {t: {k: v for k, v in s.items() if k != "dev_split"} for t, s in splits.items()},
        "data_dir": data_dir, "out": str(out), "machine": _machine(),
        # notes written by hand about recorded runs (e.g. a run starved of CPU) outlive a resume
        "notes": [] if a.fresh else list(data.get("settings", {}).get("notes", [])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "majority_score": {t: majority_score(t, data_dir) for t in tasks},
    }
    runs: dict[str, dict] = data.get("runs", {})
    data = {"format": FORMAT, "settings": settings, "runs": runs, "test_labels": data.get("test_labels", {})}
    save_results(path, data)
    (out / "runs").mkdir(exist_ok=True)
    t_start = time.time()

    def say(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    plan = []
    for task in tasks:  # task-major: an interrupted benchmark has whole tasks (all seeds)
        for seed in seeds:
            plan += [("search", task, s, seed) for s in searchers]
            plan += [("baseline", task, b, seed) for b in baselines]
    say(f"{len(plan)} runs: tasks {', '.join(f'{t} (top fidelity {m[t]:,})' for t in tasks)}; seeds {seeds}; "
        f"{a.trials} trials per search; searchers {', '.join(searchers)}; baselines {', '.join(baselines) or 'none'} "
        f"(lr x {', '.join(f'{x:g}' for x in mult)} at the default search's compute); results in {path}")
    for i, (kind, task, name, seed) in enumerate(plan, 1):
        key = run_key(kind, task, name, seed)
        if kind == "search":
            # the space's fingerprint: a search recorded with another content of the same space name is run again
            config = {"trials": a.trials, "max_train_examples": m[task], "budget": a.budget, "space": a.space,
                      "space_fingerprint": fingerprint}
        else:
            d = runs.get(run_key("search", task, searchers[0], seed)) or {}
            if d.get("status") != "ok":
                runs[key] = {"kind": kind, "task": task, "name": name, "seed": seed, "status": "error",
                             "error": f"no compute to match: the {searchers[0]} search of {task} seed {seed} did not finish"}
                say(f"({i}/{len(plan)}) {key}: skipped, {runs[key]['error']}")
                save_results(path, data)
                continue
            compute = search_compute(d["trials"])
            dev = next((t["recipe"]["dev"] for t in d["trials"] if (t.get("recipe") or {}).get("dev")),
                       task_splits(task, data_dir, seed)["dev_split"])
            config = {"budget": a.budget, "learning_rates": [lrs[name] * x for x in mult], "compute": compute,
                      "components": BASELINES[name], "pooling": BASELINE_POOLING, "dev": dev}
        prev = runs.get(key)
        if prev and prev.get("status") == "ok" and prev.get("config") == config:
            say(f"({i}/{len(plan)}) {key}: already in {JSON_NAME}, skipped")
            continue
        earlier = reuse.get("runs", {}).get(key) if kind == "baseline" else None
        if earlier and earlier.get("status") == "ok" and earlier.get("config") == config:
            runs[key] = {**earlier, "notes": [*earlier.get("notes", []), f"copied from {a.reuse}: the same config"]}
            task_gold = reuse.get("test_labels", {}).get(task)
            if task_gold is not None:
                data["test_labels"].setdefault(task, task_gold)
            say(f"({i}/{len(plan)}) {key}: the same config in {a.reuse}, copied")
            save_results(path, data)
            continue
        rec: dict[str, Any] = {"kind": kind, "task": task, "name": name, "seed": seed, "config": config}
        t0 = time.time()
        say(f"({i}/{len(plan)}) {key}: " + (f"search, {a.trials} trials, top fidelity {m[task]:,}" if kind == "search"
                                            else f"{config['compute']:,} examples over lr "
                                                 + ", ".join(f"{x:g}" for x in config["learning_rates"])) + " ...")
        try:
            if kind == "search":
                log = QuietLog(out / "runs" / f"bench-{task}-{name}-s{seed}.log", echo=a.verbose)
                rec |= run_search(task, name, seed, a.trials, m[task], a.budget, a.space, data_dir, out, log, a.fresh)
            else:
                rec |= run_baseline(task, name, seed, config["learning_rates"], config["compute"], a.budget,
                                    config["dev"], data_dir, say)
                rec["gold"] = rec["test"].pop("gold")
            gold = rec.pop("gold", None)  # the test labels, once per task (the paired bootstrap needs them)
            if gold is not None:
                data["test_labels"].setdefault(task, gold)
            rec["status"] = "ok"
        except KeyboardInterrupt:
            say("interrupted: results so far are saved; run the same command again to continue")
            save_results(path, data)
            raise
        except Exception as exc:  # record, go on with the other runs
            rec["status"] = "error"
            rec["error"] = first_line(exc, with_type=True)[:500]
            rec["traceback"] = traceback.format_exc()[-3000:]
        rec["run_time_s"] = time.time() - t0
        runs[key] = rec
        save_results(path, data)
        if rec["status"] != "ok":
            say(f"  FAILED: {rec['error']}")
        elif kind == "search":
            b = rec["best"]
            say(f"  done in {rec['run_time_s']:.0f} s: {len(rec['trials'])} trials, front of {len(rec['pareto'])}, "
                f"{search_compute(rec['trials']):,} examples spent; best pick "
                + (f"dev {b['score']:.4f}, test {b['test_score']:.4f}" if b and is_finite(b.get("test_score")) else "none"))
        else:
            p = rec["sweep"][rec["picked"]] if rec["picked"] is not None else None
            say(f"  done in {rec['run_time_s']:.0f} s: picked lr {p['learning_rate']:g} (dev {p['score']:.4f}), test "
                f"{rec['test']['score']:.4f}; {rec['trainable_params']:,} params "
                f"({'within' if rec['trainable_params'] <= rec['param_limit'] else 'OVER'} the limit {rec['param_limit']:,})"
                if p else f"  done in {rec['run_time_s']:.0f} s: no finite dev score")
    planned = {run_key(*p) for p in plan}
    settings["total_run_time_s"] = sum(r.get("run_time_s", 0.0) for k, r in runs.items() if k in planned)
    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report = write_outputs(out, data)
    for task in tasks:
        c = report["summary"][task]["checks"]
        for name in ("learned", "vs_baseline"):
            print(c[name]["text"])
    say(f"wrote {path}, {out / MD_NAME} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
