"""The pure parts of benchmarks/search_quality.py on synthetic trial records, with hand-computed values."""

import importlib.util
import math
from pathlib import Path

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


def test_score_reference_is_chance_level():
    assert sq.score_reference("accuracy", 2) == 0.5
    assert sq.score_reference("accuracy", 3) == pytest.approx(1 / 3)
    assert sq.score_reference("mcc", 2) == 0.0
    assert sq.score_reference("f1", 2) == 0.0
    assert sq.score_reference("pearson", 1) == 0.0
    assert sq.task_score_reference("sst2") == 0.5
    assert sq.task_score_reference("rte") == 0.5
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
    # a dominated point adds nothing
    assert sq.fixed_hypervolume([a, row(FID, 0.7, params=60)], LIMIT, MEM, 0.5) == pytest.approx(0.09)


def test_points_at_or_beyond_the_reference_add_nothing():
    assert sq.fixed_hypervolume([], LIMIT, MEM, 0.5) == 0.0
    assert sq.fixed_hypervolume([row(FID, 0.5)], LIMIT, MEM, 0.5) == 0.0          # chance level
    assert sq.fixed_hypervolume([row(FID, 0.4)], LIMIT, MEM, 0.5) == 0.0          # below chance
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


def test_spent_examples():
    assert sq.spent_examples(trial("a", "finished", row(32, 0.6), row(FID, 0.8))) == FID
    assert sq.spent_examples(trial("b", "stopped_early", row(32, 0.6))) == 32
    assert sq.spent_examples(trial("c", "over_budget")) == 0
    assert sq.spent_examples(trial("d", "empty")) == 0
    assert sq.spent_examples(trial("e", "invalid", row(32, 0.6))) == 0
    assert sq.spent_examples(trial("f", "failed")) == 0


def test_anytime_curve_of_two_trials():
    trials = [trial("a", "stopped_early", row(32, 0.7)), trial("b", "finished", row(32, 0.6), row(FID, 0.8))]
    curve = sq.anytime_curve(trials, FID, LIMIT, MEM, 0.5)
    assert curve[0] == (0, 0.0)
    assert curve[1] == (32, 0.0)                      # spent 32, nothing at the top fidelity yet
    assert curve[2][0] == 32 + FID
    assert curve[2][1] == pytest.approx(0.09)         # (0.8 - 0.5) * 0.5 * 0.6


def test_anytime_curve_over_budget_trial_spends_nothing_and_hv_only_grows():
    trials = [trial("a", "finished", row(FID, 0.8)), trial("x", "over_budget"),
              trial("b", "finished", row(FID, 0.7, params=20))]
    curve = sq.anytime_curve(trials, FID, LIMIT, MEM, 0.5)
    assert [x for x, _ in curve] == [0, FID, FID, 2 * FID]
    assert curve[1][1] == pytest.approx(0.09) and curve[2][1] == pytest.approx(0.09)
    assert curve[3][1] == pytest.approx(0.126)


def test_curve_band_on_the_union_grid():
    c1 = [(0, 0.0), (10, 1.0), (20, 2.0)]
    c2 = [(0, 0.0), (15, 3.0)]
    assert sq.step_value(c1, 9.9) == 0.0 and sq.step_value(c1, 10) == 1.0 and sq.step_value(c1, 99) == 2.0
    band = sq.curve_band([c1, c2])
    assert band["x"] == [0, 10, 15, 20]
    assert band["mean"] == pytest.approx([0, 0.5, 2.0, 2.5])
    assert band["min"] == pytest.approx([0, 0, 1, 2])
    assert band["max"] == pytest.approx([0, 1, 3, 3])
    assert sq.curve_band([]) == {"x": [], "mean": [], "min": [], "max": []}


def test_mean_std():
    assert sq.mean_std([1.0, 3.0]) == {"n": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert sq.mean_std([None, 2.0]) == {"n": 1, "mean": 2.0, "std": 0.0}
    assert sq.mean_std([]) == {"n": 0, "mean": None, "std": None}


def test_memory_reference_over_all_runs_of_a_task():
    runs = [
        {"kind": "search", "status": "ok", "trials": [trial("a", "finished", row(32, 0.6, mem=300), row(FID, 0.8, mem=200))]},
        {"kind": "baseline", "status": "ok", "peak_memory_bytes": 500},
        {"kind": "baseline", "status": "error", "peak_memory_bytes": 9999},
    ]
    assert sq.memory_reference(runs) == pytest.approx(550.0)
    assert sq.memory_reference([]) is None


def test_parse_per_task():
    tasks = ["sst2", "rte", "mrpc"]
    d = {"sst2": 2000, "rte": 800}
    assert sq._parse_per_task(None, tasks, d, 1000, "x") == {"sst2": 2000, "rte": 800, "mrpc": 1000}
    assert sq._parse_per_task("sst2=3000,rte=2000", tasks, d, 1000, "x") == {"sst2": 3000, "rte": 2000, "mrpc": 1000}
    assert sq._parse_per_task("sst2=3000,1500", tasks, d, 1000, "x") == {"sst2": 3000, "rte": 1500, "mrpc": 1500}
    with pytest.raises(SystemExit):
        sq._parse_per_task("cola=10", tasks, d, 1000, "x")
    with pytest.raises(SystemExit):
        sq._parse_per_task("0", tasks, d, 1000, "x")


# --- a whole synthetic benchmark: aggregation, conclusions and the Markdown ---------------------------

def _search(name, seed, trials, task="rte"):
    return {"kind": "search", "task": task, "name": name, "seed": seed, "status": "ok", "trials": trials,
            "fidelity": FID, "param_limit": LIMIT, "wall_time_s": 10.0 + seed, "included_ray_start": name == "tpe" and seed == 0}


def _baseline(name, seed, score, params, mem=40, task="rte"):
    return {"kind": "baseline", "task": task, "name": name, "seed": seed, "status": "ok", "score": score,
            "trainable_params": params, "param_limit": LIMIT, "peak_memory_bytes": mem, "examples_seen": FID,
            "wall_time_s": 5.0, "train_time_s": 4.0}


def _runs():
    # MEM_REF = 1.1 * 100 (the full fine-tuning baseline) = 110
    return [
        _search("tpe", 0, [trial("a", "finished", row(32, 0.6), row(FID, 0.80)), trial("b", "stopped_early", row(32, 0.5))]),
        _search("tpe", 1, [trial("a", "finished", row(32, 0.6), row(FID, 0.70))]),
        _search("random", 0, [trial("a", "finished", row(32, 0.6), row(FID, 0.60)), trial("x", "over_budget")]),
        _search("random", 1, [trial("a", "finished", row(32, 0.6), row(FID, 0.65))]),
        _baseline("lora", 0, 0.75, 50), _baseline("lora", 1, 0.72, 50),
        _baseline("full_finetuning", 0, 0.90, 1000, mem=100), _baseline("full_finetuning", 1, 0.91, 1000, mem=100),
    ]


def test_summarize_task_numbers_and_conclusions():
    s = sq.summarize_task("rte", _runs(), ["tpe", "random"], ["lora", "full_finetuning"], [0, 1], 0.5)
    assert s["mem_ref"] == pytest.approx(110.0)
    tpe = s["methods"]["search:tpe"]
    assert tpe["per_seed"]["0"]["best_score"] == 0.80 and tpe["per_seed"]["1"]["best_score"] == 0.70
    assert tpe["best_score"]["mean"] == pytest.approx(0.75)
    assert tpe["best_score"]["std"] == pytest.approx(math.sqrt(0.005))
    hv0 = (0.80 - 0.5) * 0.5 * (1 - 40 / 110)
    assert tpe["per_seed"]["0"]["hypervolume"] == pytest.approx(hv0)
    assert tpe["per_seed"]["0"]["examples_spent"] == FID + 32
    assert tpe["examples_spent"]["mean"] == pytest.approx((FID + 32 + FID) / 2)
    assert s["anytime"]["tpe"]["per_seed"]["0"][-1] == [FID + 32, pytest.approx(hv0)]
    rnd = s["methods"]["search:random"]
    assert rnd["per_seed"]["0"]["examples_spent"] == FID          # the over-budget trial spent nothing
    lora = s["methods"]["baseline:lora"]
    assert lora["best_score"]["mean"] == pytest.approx(0.735)
    assert lora["per_seed"]["0"]["hypervolume"] == pytest.approx((0.75 - 0.5) * 0.5 * (1 - 40 / 110))
    ft = s["methods"]["baseline:full_finetuning"]
    assert ft["best_score"]["mean"] is None and ft["score"]["mean"] == pytest.approx(0.905)
    assert ft["hypervolume"]["mean"] == 0.0 and ft["report_only"]
    # tpe 0.75 >= lora 0.735 (full fine-tuning is not a within-budget baseline); per seed 0.80>=0.75, 0.70<0.72
    vb = s["checks"]["vs_baseline"]
    assert vb["holds"] is True and vb["baseline"] == "lora" and (vb["seeds_won"], vb["seeds_compared"]) == (1, 2)
    assert "holds" in vb["text"] and "0.7500" in vb["text"]
    vr = s["checks"]["vs_random"]
    assert vr["holds"] is True and (vr["seeds_won"], vr["seeds_compared"]) == (2, 2)


def test_conclusion_says_when_it_does_not_hold():
    runs = _runs()
    runs[4]["score"] = runs[5]["score"] = 0.95   # lora beats tpe
    runs[0]["trials"][0]["rows"][-1]["score"] = 0.55   # tpe's hypervolume below random's
    s = sq.summarize_task("rte", runs, ["tpe", "random"], ["lora", "full_finetuning"], [0, 1], 0.5)
    assert s["checks"]["vs_baseline"]["holds"] is False
    assert "does NOT hold" in s["checks"]["vs_baseline"]["text"]
    assert s["checks"]["vs_random"]["holds"] is False
    assert "does NOT hold" in s["checks"]["vs_random"]["text"]


def test_failed_searches_are_reported_not_compared():
    runs = [r for r in _runs() if r["kind"] == "baseline"]
    runs += [{"kind": "search", "task": "rte", "name": n, "seed": 0, "status": "error",
              "error": "TypeError: search() got an unexpected keyword argument 'searcher'"} for n in ("tpe", "random")]
    s = sq.summarize_task("rte", runs, ["tpe", "random"], ["lora"], [0, 1], 0.5)
    assert s["checks"]["vs_baseline"]["holds"] is None
    assert "searcher" in s["checks"]["vs_baseline"]["text"]
    assert s["checks"]["vs_random"]["holds"] is None


def _settings(**kw):
    st = {"command": "python benchmarks/search_quality.py --tasks rte", "backbone": "minilm-l6", "tasks": ["rte"],
          "seeds": [0, 1], "trials": 2, "max_train_examples": {"rte": FID}, "baseline_examples": {"rte": FID},
          "budget": "0.5%", "space": "default", "searchers": ["tpe", "random"], "baselines": ["lora", "full_finetuning"],
          "baseline_lr": {"lora": 3e-3, "full_finetuning": 5e-5}, "baseline_pooling_note": "mean",
          "machine": "test", "notes": [], "total_run_time_s": 120.0}
    return st | kw


def test_render_markdown_and_plot(tmp_path):
    runs = {f"r{i}": r for i, r in enumerate(_runs())}
    report = sq.build_report({"settings": _settings(), "runs": runs})
    md = report["markdown"]
    assert "python benchmarks/search_quality.py --tasks rte" in md
    assert "| method | best within-budget score" in md
    assert "search: tpe (default) | 0.7500 ± 0.0707 (s0: 0.8000, s1: 0.7000)" in md
    assert "over budget (1,000 params > 100)" in md
    assert "MEM_REF 0 MiB (110 bytes)" in md
    assert "holds" in md and "Conclusions" in md
    png = sq.plot_anytime(tmp_path / "rte.png", report["summary"]["rte"], ["tpe", "random"])
    assert png.stat().st_size > 1000


def test_write_outputs_and_report_only(tmp_path):
    data = {"settings": _settings(), "runs": {f"r{i}": r for i, r in enumerate(_runs())}}
    sq.write_outputs(tmp_path, data)
    assert (tmp_path / "search_quality.md").is_file() and (tmp_path / "search_quality_rte.png").is_file()
    stored = sq.load_results(tmp_path / "search_quality.json")
    assert stored["summary"]["rte"]["checks"]["vs_random"]["holds"] is True
    (tmp_path / "search_quality.md").unlink()
    assert sq.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "search_quality.md").is_file()


def test_shared_prefix_counts_leading_identical_trained_trials():
    def t(tid, lr, status="finished"):
        return {"trial_id": tid, "status": status, "recipe": {"training": {"learning_rate": lr}}, "rows": [row(FID, 0.7)]}

    a = [t("1", 1), t("2", 2), t("r", 9, "over_budget"), t("3", 3), t("4", 4)]
    b = [t("1", 1), t("2", 2), t("3", 3), t("5", 5)]
    assert sq.shared_prefix(a, b) == 3          # the rejected sample is not a trained trial
    assert sq.shared_prefix(a, [t("9", 9)]) == 0
    assert sq.shared_prefix([], b) == 0
