"""The pure parts of benchmarks/search_quality.py on synthetic records, with hand-computed values."""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_quality.py"
_spec = importlib.util.spec_from_file_location("search_quality_bench", _PATH)
sq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sq)

LIMIT = 100       # parameter limit
MEM = 100.0       # MEM_REF
FID = 96          # top fidelity


def row(examples, score, params=50, mem=40):
    return {"examples_seen": examples, "score": score, "trainable_params": params, "peak_memory_bytes": mem}


def trial(tid, status, *rows):
    return {"trial_id": tid, "status": status, "recipe": {"components": []}, "rows": list(rows)}


# --- references, hypervolume, fidelity rows, compute ------------------------------------------------

def test_score_reference_is_chance_level():
    assert sq.score_reference("accuracy", 2) == 0.5
    assert sq.score_reference("accuracy", 3) == pytest.approx(1 / 3)
    assert sq.score_reference("mcc", 2) == 0.0
    assert sq.score_reference("f1", 2) == 0.0
    assert sq.score_reference("pearson", 1) == 0.0
    assert sq.task_score_reference("sst2") == 0.5
    assert sq.task_score_reference("mrpc") == 0.0
    assert sq.task_score_reference("cola") == 0.0
    assert sq.task_score_reference("stsb") == 0.0


def test_hypervolume_of_one_point_is_a_box():
    # (score - ref) * (1 - p) * (1 - m) = (0.8 - 0.5) * (1 - 0.5) * (1 - 0.4)
    assert sq.fixed_hypervolume([row(FID, 0.8)], LIMIT, MEM, 0.5) == pytest.approx(0.09)
    # score reference 0 (F1 / MCC / Pearson): 0.8 * 0.5 * 0.6
    assert sq.fixed_hypervolume([row(FID, 0.8)], LIMIT, MEM, 0.0) == pytest.approx(0.24)


def test_hypervolume_of_two_points_is_the_union_of_their_boxes():
    a, b = row(FID, 0.8, params=50), row(FID, 0.7, params=20)
    # A: 0.3 * 0.5 * 0.6 = 0.09; B: 0.2 * 0.8 * 0.6 = 0.096; overlap: 0.2 * 0.5 * 0.6 = 0.06
    assert sq.fixed_hypervolume([a, b], LIMIT, MEM, 0.5) == pytest.approx(0.09 + 0.096 - 0.06)
    assert sq.fixed_hypervolume([a, row(FID, 0.7, params=60)], LIMIT, MEM, 0.5) == pytest.approx(0.09)


def test_hypervolume_on_test_scores_ignores_points_without_one():
    a = row(FID, 0.99) | {"test_score": 0.8}
    b = row(FID, 0.95, params=20) | {"test_score": None}      # a trial that kept no weights
    assert sq.fixed_hypervolume([a, b], LIMIT, MEM, 0.5, "test_score") == pytest.approx(0.09)
    assert sq.fixed_hypervolume([b], LIMIT, MEM, 0.5, "test_score") == 0.0


def test_points_at_or_beyond_the_reference_add_nothing():
    assert sq.fixed_hypervolume([], LIMIT, MEM, 0.5) == 0.0
    assert sq.fixed_hypervolume([row(FID, 0.5)], LIMIT, MEM, 0.5) == 0.0
    assert sq.fixed_hypervolume([row(FID, 0.4)], LIMIT, MEM, 0.5) == 0.0
    assert sq.fixed_hypervolume([row(FID, 0.9, params=LIMIT)], LIMIT, MEM, 0.5) == 0.0
    assert sq.fixed_hypervolume([row(FID, 0.9, mem=MEM)], LIMIT, MEM, 0.5) == 0.0


def test_top_fidelity_rows_keep_finished_within_budget_trials_only():
    trials = [
        trial("a", "finished", row(32, 0.6), row(FID, 0.8)),
        trial("b", "stopped_early", row(32, 0.7)),
        trial("c", "finished", row(32, 0.6, params=150), row(FID, 0.9, params=150)),   # over the limit
        trial("d", "finished", row(32, 0.6), row(FID, float("nan"))),                  # no usable score
        trial("e", "over_budget"),
        trial("f", "failed"),
    ]
    rows = sq.top_fidelity_rows(trials, FID, LIMIT)
    assert [r["trial_id"] for r in rows] == ["a"]
    assert rows[0]["score"] == 0.8


def test_spent_examples_and_search_compute():
    trials = [trial("a", "finished", row(32, 0.6), row(FID, 0.8)), trial("b", "stopped_early", row(32, 0.6)),
              trial("c", "over_budget"), trial("d", "empty"), trial("e", "invalid", row(32, 0.6)), trial("f", "failed")]
    assert [sq.spent_examples(t) for t in trials] == [FID, 32, 0, 0, 0, 0]
    assert sq.search_compute(trials) == FID + 32
    assert sq.search_compute([]) == 0


def test_split_examples_shares_the_compute_exactly():
    assert sq.split_examples(7200, 3) == [2400, 2400, 2400]
    assert sq.split_examples(10, 3) == [4, 3, 3]
    assert sq.split_examples(11, 3) == [4, 4, 3]
    assert sq.split_examples(5, 1) == [5]
    assert sum(sq.split_examples(27_713, 3)) == 27_713
    with pytest.raises(ValueError):
        sq.split_examples(2, 3)
    with pytest.raises(ValueError):
        sq.split_examples(10, 0)


# --- expected maximum (Dodge et al. 2019) ------------------------------------------------------------

def test_expected_max_by_hand():
    em = sq.expected_max([0.9, 0.2, 0.5])
    assert [e["n"] for e in em] == [1, 2, 3]
    assert em[0]["mean"] == pytest.approx((0.2 + 0.5 + 0.9) / 3)
    # n = 2: P(max = v_i) = 1/9, 3/9, 5/9 -> (0.2 + 1.5 + 4.5) / 9 (the 9 ordered pairs' maxima sum to 6.2)
    assert em[1]["mean"] == pytest.approx(6.2 / 9)
    # n = 3: 1/27, 7/27, 19/27
    assert em[2]["mean"] == pytest.approx((0.2 + 7 * 0.5 + 19 * 0.9) / 27)
    # n = 1: the population standard deviation of the scores
    assert em[0]["std"] == pytest.approx(np.std([0.2, 0.5, 0.9]))
    assert sq.expected_max([0.7, 0.7])[1] == {"n": 2, "mean": pytest.approx(0.7), "std": pytest.approx(0.0, abs=1e-7)}
    assert sq.expected_max([]) == []
    assert [e["mean"] for e in sq.expected_max([0.4, float("nan"), None])] == [pytest.approx(0.4)]


def test_expected_max_matches_brute_force_enumeration():
    v = [0.31, 0.77, 0.52, 0.64]
    for n in (1, 2, 3):
        draws = list(itertools.product(v, repeat=n))
        brute = sum(max(d) for d in draws) / len(draws)
        assert sq.expected_max(v, n_max=3)[n - 1]["mean"] == pytest.approx(brute)


def test_expected_max_curve_ends_at_the_compute():
    curve = sq.expected_max_curve([0.8, 0.7], 300)
    assert curve == [[150.0, pytest.approx(0.75)], [300.0, pytest.approx(0.7 / 4 + 0.8 * 3 / 4)]]
    assert sq.expected_max_curve([], 300) == []


def test_curve_band_starts_where_every_curve_has_a_value():
    c1 = [(10, 1.0), (20, 2.0)]
    c2 = [(15, 3.0)]
    assert sq.step_value(c1, 9.9) == 0.0 and sq.step_value(c1, 9.9, before=None) is None
    assert sq.step_value(c1, 10) == 1.0 and sq.step_value(c1, 99) == 2.0
    band = sq.curve_band([c1, c2])
    assert band["x"] == [15, 20]
    assert band["mean"] == pytest.approx([2.0, 2.5])
    assert band["min"] == pytest.approx([1, 2]) and band["max"] == pytest.approx([3, 3])
    assert sq.curve_band([]) == {"x": [], "mean": [], "min": [], "max": []}


# --- intervals ------------------------------------------------------------------------------------

def test_mean_std():
    assert sq.mean_std([1.0, 3.0]) == {"n": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert sq.mean_std([None, 2.0, float("nan")]) == {"n": 1, "mean": 2.0, "std": 0.0}
    assert sq.mean_std([]) == {"n": 0, "mean": None, "std": None}


def test_bootstrap_over_seeds_on_known_cases():
    # 3 values: a resample mean of 1 has probability 1/27 = 3.7% > 2.5%, so the interval is [1, 3]
    ci = sq.bootstrap_mean_ci([1.0, 2.0, 3.0])
    assert ci == {"n": 3, "mean": 2.0, "low": 1.0, "high": 3.0}
    # 2 values: means 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    assert sq.bootstrap_mean_ci([0.0, 1.0]) == {"n": 2, "mean": 0.5, "low": 0.0, "high": 1.0}
    # many values: close to the normal interval mean +- 1.96 sd / sqrt(n)
    v = np.random.default_rng(1).normal(0.0, 1.0, 400)
    ci = sq.bootstrap_mean_ci(v)
    half = 1.96 * v.std(ddof=1) / 20
    assert ci["low"] == pytest.approx(v.mean() - half, abs=0.015)
    assert ci["high"] == pytest.approx(v.mean() + half, abs=0.015)
    assert sq.bootstrap_mean_ci([0.4]) == {"n": 1, "mean": 0.4, "low": None, "high": None}
    assert sq.bootstrap_mean_ci([])["mean"] is None


def test_batched_metrics_match_the_task_metrics():
    from autopeft.data.tasks import METRICS

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, (4, 200))
    pred = np.where(rng.random((4, 200)) < 0.7, gold, 1 - gold)
    for m in ("accuracy", "f1", "mcc"):
        got = sq.batched_metric(m, pred, gold)
        assert got == pytest.approx([METRICS[m](p, g) for p, g in zip(pred, gold)]), m
    x = rng.normal(size=(3, 50))
    y = x + rng.normal(size=(3, 50))
    assert sq.batched_metric("pearson", x, y) == pytest.approx([METRICS["pearson"](a, b) for a, b in zip(x, y)])
    # undefined cases: no positive prediction -> F1 0 and MCC 0 (as scikit-learn)
    zeros, g = np.zeros((1, 6), int), np.array([[1, 0, 1, 0, 1, 0]])
    assert sq.batched_metric("f1", zeros, g)[0] == 0.0 and sq.batched_metric("mcc", zeros, g)[0] == 0.0


def test_paired_bootstrap_over_examples_on_known_cases():
    gold = np.array([1, 0] * 200)
    # the same predictions: difference 0 on every resample
    assert sq.paired_bootstrap_examples("accuracy", [gold], [gold], gold) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    # always right against always wrong: 1 on every resample
    assert sq.paired_bootstrap_examples("accuracy", [gold], [1 - gold], gold) == {"mean": 1.0, "low": 1.0, "high": 1.0}
    # a right on the first half only, b on the second half only: difference (2X - n)/n, X ~ Binomial(n, 1/2),
    # standard deviation 1/sqrt(n) = 0.05 for n = 400: the interval is about +-0.098
    a = np.concatenate([gold[:200], 1 - gold[200:]])
    b = np.concatenate([1 - gold[:200], gold[200:]])
    ci = sq.paired_bootstrap_examples("accuracy", [a], [b], gold)
    assert ci["mean"] == 0.0
    assert ci["low"] == pytest.approx(-0.098, abs=0.012) and ci["high"] == pytest.approx(0.098, abs=0.012)
    # two seeds: the mean of the per-seed differences (1 and 0)
    two = sq.paired_bootstrap_examples("accuracy", [gold, gold], [1 - gold, gold], gold)
    assert two == {"mean": 0.5, "low": 0.5, "high": 0.5}
    assert sq.paired_bootstrap_examples("accuracy", [], [], gold)["mean"] is None


# --- picks, memory ------------------------------------------------------------------------------------

def test_picks():
    rows = [{"trial_id": "a", "score": 0.8, "trainable_params": 90}, {"trial_id": "b", "score": 0.8, "trainable_params": 40},
            {"trial_id": "c", "score": float("nan"), "trainable_params": 1}, {"trial_id": "d", "score": 0.7, "trainable_params": 5}]
    assert sq.pick_best(rows)["trial_id"] == "b"          # the best dev score, fewer parameters on a tie
    assert sq.pick_best([]) is None
    assert sq.pick_on_dev([{"score": 0.6}, {"score": 0.7}, {"score": 0.7}, {"score": None}]) == 1   # the first on a tie
    assert sq.pick_on_dev([{"score": float("nan")}]) is None


def test_memory_reference_over_all_runs_of_a_task():
    runs = [
        {"kind": "search", "status": "ok", "trials": [trial("a", "finished", row(32, 0.6, mem=300), row(FID, 0.8, mem=200))]},
        {"kind": "baseline", "status": "ok", "sweep": [{"peak_memory_bytes": 500}, {"peak_memory_bytes": 450}]},
        {"kind": "baseline", "status": "error", "sweep": [{"peak_memory_bytes": 9999}]},
    ]
    assert sq.memory_reference(runs) == pytest.approx(550.0)
    assert sq.memory_reference([]) is None


def test_earlier_attempt_of_a_search(tmp_path):
    folder = tmp_path / "bench-cola-tpe-s0"
    assert sq.earlier_attempt(folder) == "new"
    folder.mkdir()
    assert sq.earlier_attempt(folder) == "set_aside"               # nothing to resume from
    (folder / "search.json").write_text("{}")
    (folder / "resume.json").write_text("{}")
    assert sq.earlier_attempt(folder) == "resume"                  # killed mid-search
    assert sq.earlier_attempt(folder, fresh=True) == "set_aside"
    (folder / "result.json").write_text("{}")
    assert sq.earlier_attempt(folder) == "set_aside"               # finished, never recorded


def test_parse_per_task_and_quick_presets():
    tasks = ["sst2", "cola", "mrpc"]
    d = {"sst2": 2000, "cola": 7696, "mrpc": 3301}
    assert sq._parse_per_task(None, tasks, d, "x") == d
    assert sq._parse_per_task("sst2=3000", tasks, d, "x") == {"sst2": 3000, "cola": 7696, "mrpc": 3301}
    assert sq._parse_per_task("sst2=3000,1500", tasks, d, "x") == {"sst2": 3000, "cola": 1500, "mrpc": 1500}
    with pytest.raises(SystemExit):
        sq._parse_per_task("rte=10", tasks, d, "x")
    with pytest.raises(SystemExit):
        sq._parse_per_task("0", tasks, d, "x")
    a = sq._resolve(sq.build_parser().parse_args(["--quick", "--seeds", "3"]))
    assert (a.tasks, a.seeds, a.trials, a.max_train_examples) == ("wnli", "3", 2, "64")   # an explicit flag wins
    a = sq._resolve(sq.build_parser().parse_args([]))
    assert (a.tasks, a.seeds, a.searchers, a.trials, a.baselines) == ("sst2,stsb,cola,mrpc", "0,1,2", "tpe,random,nsga2", 6, "all")


# --- a whole synthetic benchmark: aggregation, comparisons, conclusions, Markdown ----------------------

GOLD = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]


def preds(correct):
    """Predictions of GOLD right on the first ``correct`` examples, wrong on the rest."""
    return [g if i < correct else 1 - g for i, g in enumerate(GOLD)]


def _search(name, seed, correct, dev=(0.80, 0.70), task="sst2"):
    trials = [trial("a", "finished", row(32, 0.6), row(FID, dev[0])), trial("b", "finished", row(32, 0.6), row(FID, dev[1])),
              trial("c", "stopped_early", row(32, 0.5))]
    test = correct / 10
    best = {"trial_id": "a", "score": dev[0], "test_score": test, "test_low": test - 0.1, "test_high": test + 0.05,
            "trainable_params": 50, "peak_memory_bytes": 40, "examples_seen": FID}
    return {"kind": "search", "task": task, "name": name, "seed": seed, "status": "ok", "trials": trials,
            "fidelity": FID, "param_limit": LIMIT, "pareto": [best], "best": best, "best_predictions": preds(correct),
            "wall_time_s": 10.0}


def _baseline(name, seed, correct, params=50, mem=40, dev=(0.60, 0.72, 0.65), task="sst2", per_run=100):
    sweep = [{"learning_rate": lr, "examples_seen": per_run, "score": s, "peak_memory_bytes": mem}
             for lr, s in zip((1.5e-3, 3e-3, 6e-3), dev)]
    test = correct / 10
    return {"kind": "baseline", "task": task, "name": name, "seed": seed, "status": "ok", "sweep": sweep,
            "picked": sq.pick_on_dev(sweep), "test": {"score": test, "low": test - 0.1, "high": test + 0.05,
                                                      "predictions": preds(correct)},
            "trainable_params": params, "param_limit": LIMIT, "wall_time_s": 5.0}


def _runs():
    # MEM_REF = 1.1 * 100 (full fine-tuning's sweep) = 110
    return [
        _search("tpe", 0, 9), _search("tpe", 1, 8),
        _search("random", 0, 6), _search("random", 1, 7, dev=(0.60, 0.65)),
        _baseline("lora", 0, 7), _baseline("lora", 1, 8),
        _baseline("prefix_tuning", 0, 10, params=300), _baseline("prefix_tuning", 1, 9, params=300),
        _baseline("full_finetuning", 0, 10, params=1000, mem=100), _baseline("full_finetuning", 1, 9, params=1000, mem=100),
    ]


SEARCHERS, BASES = ["tpe", "random"], ["lora", "prefix_tuning", "full_finetuning"]


def _summary(runs=None):
    return sq.summarize_task("sst2", runs or _runs(), SEARCHERS, BASES, [0, 1], 0.5, "accuracy", gold=GOLD, majority=0.5)


def test_summarize_task_numbers():
    s = _summary()
    assert s["mem_ref"] == pytest.approx(110.0)
    tpe = s["methods"]["search:tpe"]
    assert tpe["per_seed"]["0"]["test_score"] == 0.9 and tpe["test_score"]["mean"] == pytest.approx(0.85)
    assert tpe["test_score"]["std"] == pytest.approx(math.sqrt(0.005))
    assert tpe["per_seed"]["0"]["test_hypervolume"] == pytest.approx((0.9 - 0.5) * 0.5 * (1 - 40 / 110))
    assert tpe["per_seed"]["0"]["examples_spent"] == 2 * FID + 32
    # Dodge: two top-fidelity dev scores 0.8, 0.7 over a compute of 2 * 96 + 32 = 224
    assert tpe["per_seed"]["0"]["expected_max"] == [[112.0, pytest.approx(0.75)], [224.0, pytest.approx(0.775)]]
    lora = s["methods"]["baseline:lora"]
    assert lora["per_seed"]["0"]["picked_lr"] == 3e-3 and lora["dev_score"]["mean"] == pytest.approx(0.72)
    assert lora["test_score"]["mean"] == pytest.approx(0.75) and lora["within_budget"]
    assert lora["examples_spent"]["mean"] == 300
    # sweep dev scores 0.60, 0.72, 0.65 -> E[max of 3] = (0.60 + 7 * 0.65 + 19 * 0.72) / 27 at 300 examples
    assert lora["per_seed"]["0"]["expected_max"][-1] == [300.0, pytest.approx((0.60 + 7 * 0.65 + 19 * 0.72) / 27)]
    assert lora["per_seed"]["0"]["test_hypervolume"] == pytest.approx((0.7 - 0.5) * 0.5 * (1 - 40 / 110))
    prefix = s["methods"]["baseline:prefix_tuning"]
    assert not prefix["within_budget"] and prefix["test_hypervolume"]["mean"] == 0.0
    # paired: tpe - lora = +0.2 (s0), 0.0 (s1); over seeds: resample means 0, 0.1, 0.2 -> [0, 0.2]
    c = s["comparisons"]["baseline:lora"]["test_score"]
    assert c["diffs"] == {"0": pytest.approx(0.2), "1": pytest.approx(0.0)}
    assert c["seeds"]["mean"] == pytest.approx(0.1)
    assert (c["seeds"]["low"], c["seeds"]["high"]) == (pytest.approx(0.0), pytest.approx(0.2))
    assert c["wins"] == 2 and c["n"] == 2
    assert c["examples"]["mean"] == pytest.approx(0.1)
    assert c["examples"]["low"] <= 0.1 <= c["examples"]["high"]
    hv = s["comparisons"]["search:random"]["test_hypervolume"]
    assert hv["diffs"]["0"] == pytest.approx((0.9 - 0.6) * 0.5 * (1 - 40 / 110))


def test_conclusions_when_the_search_wins():
    ch = _summary()["checks"]
    assert ch["vs_baseline"]["holds"] is True and ch["vs_baseline"]["baseline"] == "baseline:lora"
    assert "holds" in ch["vs_baseline"]["text"] and "+0.1000 [+0.0000, +0.2000] over 2 seed(s)" in ch["vs_baseline"]["text"]
    # prefix tuning is over the budget, better on test: reported, not the within-budget check
    assert ch["vs_all_baselines"]["holds"] is False and ch["vs_all_baselines"]["baseline"] == "baseline:prefix_tuning"
    assert any("300 parameters, 3.0x the budget of 100" in w for w in ch["vs_all_baselines"]["why"])
    assert "Why: it trains 300 parameters" in ch["vs_all_baselines"]["text"]
    assert ch["vs_full_ft"]["holds"] is False and "Why:" in ch["vs_full_ft"]["text"]
    assert ch["vs_searchers"][0]["holds"] is True and ch["vs_searchers"][0]["searcher"] == "random"
    # learned: the mean lower bound (0.8 + 0.7) / 2 = 0.75 > majority 0.5
    assert ch["learned"]["holds"] is True and "0.7500" in ch["learned"]["text"]


def test_conclusions_say_where_not_and_why():
    runs = _runs()
    runs[4] = _baseline("lora", 0, 10, dev=(0.6, 0.7, 0.65), per_run=300)   # the baseline beats the search on test
    runs[5] = _baseline("lora", 1, 10, dev=(0.6, 0.7, 0.65), per_run=300)
    vb = _summary(runs)["checks"]["vs_baseline"]
    assert vb["holds"] is False and "does NOT hold" in vb["text"]
    assert any("did not carry over to test" in w for w in vb["why"])      # dev 0.80 >= 0.70
    assert any("300 examples against the search's 96" in w for w in vb["why"])
    runs[4]["sweep"][1]["score"] = runs[5]["sweep"][1]["score"] = 0.95          # now it is ahead on dev too
    vb = _summary(runs)["checks"]["vs_baseline"]
    assert any("also scored lower on dev (0.8000 vs 0.9500)" in w for w in vb["why"])


def test_no_baseline_yet_is_not_reported_as_none_within_the_budget():
    """An interrupted benchmark with the searches of a task and none of its baselines said "no hand-picked
    baseline finished within the parameter budget" and "the best ... is the one above" (there was none)."""
    ch = _summary([r for r in _runs() if r["kind"] == "search"])["checks"]
    assert ch["vs_baseline"]["holds"] is None
    assert ch["vs_baseline"]["text"] == "sst2: no hand-picked baseline has a result yet; autopeft (tpe)'s test score is 0.8500 ± 0.0707."
    assert ch["vs_all_baselines"] == {"holds": None, "text": "sst2: no hand-picked baseline has a result yet."}
    over = [r for r in _runs() if r["kind"] == "search" or r["name"] == "prefix_tuning"]  # only one over the budget
    ch = _summary(over)["checks"]
    assert "no hand-picked baseline finished within the parameter budget" in ch["vs_baseline"]["text"]
    assert ch["vs_all_baselines"]["baseline"] == "baseline:prefix_tuning"


def test_failed_default_search_is_reported_not_compared():
    runs = [r for r in _runs() if r["kind"] == "baseline"]
    runs += [{"kind": "search", "task": "sst2", "name": n, "seed": 0, "status": "error",
              "error": "SearcherError: unknown searcher"} for n in SEARCHERS]
    ch = _summary(runs)["checks"]
    assert ch["vs_baseline"]["holds"] is None and "unknown searcher" in ch["vs_baseline"]["text"]


def _settings(**kw):
    st = {"command": "python benchmarks/search_quality.py --tasks sst2", "backbone": "minilm-l6", "tasks": ["sst2"],
          "seeds": [0, 1], "trials": 3, "max_train_examples": {"sst2": FID}, "budget": "0.5%", "space": "default",
          "searchers": SEARCHERS, "baselines": BASES, "lr_multipliers": [0.5, 1.0, 2.0],
          "baseline_lr": {"lora": 3e-3, "prefix_tuning": 3e-3, "full_finetuning": 5e-5}, "baseline_pooling": "mean",
          "splits": {"sst2": {"train": 192, "dev": 100, "test": 10}}, "majority_score": {"sst2": 0.5},
          "machine": "test", "notes": [], "total_run_time_s": 120.0}
    return st | kw


def _data():
    return {"format": sq.FORMAT, "settings": _settings(), "runs": {f"r{i}": r for i, r in enumerate(_runs())},
            "test_labels": {"sst2": GOLD}}


def test_render_markdown_and_plot(tmp_path):
    report = sq.build_report(_data())
    md = report["markdown"]
    assert "python benchmarks/search_quality.py --tasks sst2" in md
    assert "| autopeft tpe (default) | 0.8500 ± 0.0707 (s0: 0.9000, s1: 0.8000)" in md
    assert "Top fidelity 96 examples = 0.50 epochs of train." in md
    assert "| LoRA r=8, alpha 16, query/value | s0: +0.2000, s1: +0.0000 | +0.1000 [+0.0000, +0.2000] |" in md
    assert "300 (over budget)" in md and "full fine-tuning (reported only)" in md
    assert "C/3 examples each" in md
    assert "on 1 of 1 complete tasks with results (1 planned)." in md
    assert "sst2: autopeft (tpe) scores at least the best within-budget hand-picked baseline at equal compute: holds" in md
    assert "no result yet" not in md                      # every planned run is there
    png = sq.plot_expected_max(tmp_path / "sst2.png", report["summary"]["sst2"], "search:tpe")
    assert png.stat().st_size > 1000


def test_write_outputs_and_report_only(tmp_path):
    sq.write_outputs(tmp_path, _data())
    assert (tmp_path / "search_quality.md").is_file() and (tmp_path / "search_quality_sst2.png").is_file()
    stored = sq.load_results(tmp_path / "search_quality.json")
    assert stored["summary"]["sst2"]["checks"]["vs_baseline"]["holds"] is True
    assert "predictions" not in stored["summary"]["sst2"]["methods"]["search:tpe"]["per_seed"]["0"]
    (tmp_path / "search_quality.md").unlink()
    assert sq.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "on 1 of 1 complete tasks" in (tmp_path / "search_quality.md").read_text()


def test_report_notes_missing_runs():
    data = _data()
    data["runs"] = {k: r for k, r in data["runs"].items() if not (r["name"] == "random" and r["seed"] == 1)}
    report = sq.build_report(data)
    assert any("1 planned run(s) have no result yet" in n and "search/sst2/random/s1" in n for n in report["notes"])
    # a task's conclusions drawn before all its runs are in are marked, and the headline does not count it
    assert (report["summary"]["sst2"]["runs_recorded"], report["summary"]["sst2"]["runs_planned"]) == (9, 10)
    md = report["markdown"]
    assert "on 0 of 0 complete tasks with results (1 planned; not counted, some runs still missing: sst2)." in md
    assert ("- PROVISIONAL (9 of 10 planned runs recorded): sst2: autopeft (tpe) scores at least the best "
            "within-budget hand-picked baseline at equal compute: holds") in md


def test_report_only_refuses_the_earlier_format(tmp_path, capsys):
    (tmp_path / "search_quality.json").write_text(json.dumps({"settings": {}, "runs": {}}))
    assert sq.main(["--report-only", "--out", str(tmp_path)]) == 2
    assert "earlier benchmark" in capsys.readouterr().err


def test_shared_samples_notes_name_the_prefix_two_searchers_sampled_alike():
    def search(name, seed, configs, task="sst2"):
        return {"kind": "search", "status": "ok", "task": task, "seed": seed, "name": name,
                "trials": [{"config": {"lora.r": c}} for c in configs]}

    runs = [search("tpe", 0, [8, 4, 2, 16]), search("random", 0, [8, 4, 2, 1, 3]), search("nsga2", 0, [8, 4, 2, 1, 3]),
            search("tpe", 1, [5, 4]), search("random", 1, [8, 4])]
    notes = sq.shared_samples_notes(runs, ["tpe", "random", "nsga2"])
    assert len(notes) == 3
    assert "tpe and random" in notes[0] and "sst2 s0: first 3 of 4/5" in notes[0] and "s1" not in notes[0]
    assert "random and nsga2" in notes[2] and "sst2 s0: first 5 of 5/5" in notes[2]
    assert sq.shared_samples_notes([search("tpe", 0, [1]), search("random", 0, [2])], ["tpe", "random"]) == []


def test_a_resumed_benchmark_keeps_the_notes_written_about_its_recorded_runs(tmp_path, monkeypatch, glue_dir):
    """settings.notes (written by hand, e.g. a run's wall time starved of CPU) survive a resume; --fresh drops them.
    The searches fail at once here (recorded as errors), so only the settings are exercised."""
    def no_search(*args, **kwargs):
        raise RuntimeError("no search in this test")

    monkeypatch.setattr(sq, "run_search", no_search)
    data = {"format": sq.FORMAT, "settings": {"notes": ["search/sst2/tpe/s0 ran starved"]}, "runs": {}, "test_labels": {}}
    (tmp_path / "search_quality.json").write_text(json.dumps(data))
    argv = ["--tasks", "sst2", "--seeds", "0", "--searchers", "tpe", "--baselines", "none", "--out", str(tmp_path),
            "--data-dir", str(glue_dir)]
    sq.main(argv)
    stored = sq.load_results(tmp_path / "search_quality.json")
    assert stored["settings"]["notes"] == ["search/sst2/tpe/s0 ran starved"]
    assert stored["runs"]["search/sst2/tpe/s0"]["error"] == "RuntimeError: no search in this test"
    sq.main([*argv, "--fresh"])
    assert sq.load_results(tmp_path / "search_quality.json")["settings"]["notes"] == []
