"""The search engine: rungs = scheduler milestones, MO-ASHA promotion, rejection before Ray, and
what the sampler is told (never a low-rung score as a final one)."""

import json
import math

import numpy as np

import pytest

from autopeft.searching.pareto import crowding_distance, nondominated_fronts, pareto_front, rank_order
from autopeft.searching.space import Fidelity, SearchSpace

MINILM_META = {"preset": "minilm-l6"}


@pytest.mark.parametrize("top, expected", [
    (300, [64, 128, 300]),            # before: reported [64, 128, 300], ASHA checked [64, 192]
    (3000, [352, 1024, 3000]),        # before: reported [352, 1024, 3000], ASHA checked [352, 1056]
    (24000, [2688, 8064, 24000]),
])
def test_rungs_equal_the_scheduler_milestones(top, expected):
    from autopeft.searching.scheduler import MultiObjectiveASHA

    fid = Fidelity(max_train_examples=top, min_train_examples=2688 if top == 24000 else round(top / 9),
                   reduction_factor=3)
    rungs = fid.search_rungs(32)
    assert rungs == expected
    sched = MultiObjectiveASHA(rungs, reduction_factor=3)
    assert sched.milestones == expected[:-1]
    # every reported lower rung is a decision point: a dominated trial is stopped there
    sched.decide("a", {"examples_seen": expected[1], "score": 0.9, "trainable_params": 10, "peak_memory_bytes": 1})
    assert sched.decide("b", {"examples_seen": expected[1], "score": 0.5, "trainable_params": 20,
                              "peak_memory_bytes": 2}) == "stop"
    assert sched.decisions[-1] == ("b", expected[1], "stop")


def test_search_rungs_never_repeat_or_reach_the_top_early():
    assert Fidelity(100, 20, 3).search_rungs(32) == [32, 64, 100]
    assert Fidelity(40, 4, 3).search_rungs(32) == [32, 40]


def test_mo_asha_keeps_a_smaller_slightly_weaker_configuration():
    from autopeft.searching.scheduler import MultiObjectiveASHA

    row = lambda s, p, m: {"examples_seen": 100, "score": s, "trainable_params": p, "peak_memory_bytes": m}
    mo = MultiObjectiveASHA([100, 300, 900], reduction_factor=3)
    assert mo.decide("big", row(0.85, 100_000, 500)) == "continue"
    assert mo.decide("worse", row(0.80, 100_000, 500)) == "stop"       # dominated by big
    assert mo.decide("small", row(0.84, 20_000, 400)) == "continue"    # not dominated: an end of the front
    # plain ASHA on the score alone (top third of [0.85, 0.80, 0.84]) would stop "small"
    scores = [0.85, 0.80, 0.84]
    assert 0.84 < np.percentile(scores, 100 * (1 - 1 / 3))


def test_mo_asha_rung_without_signal_stops_nobody_until_a_score_differs():
    """CoLA benchmark, seed 0, first rung: every trial scored MCC 0, and size alone stopped LoRA q/v."""
    from autopeft.searching.scheduler import MultiObjectiveASHA

    row = lambda s, p, m: {"examples_seen": 2592, "score": s, "trainable_params": p, "peak_memory_bytes": m}
    mo = MultiObjectiveASHA([2592, 7712, 23088], reduction_factor=3)
    assert mo.decide("lora_ffn", row(0.0, 92_160, 500)) == "continue"
    assert mo.decide("adapter", row(0.0, 57_672, 400)) == "continue"
    assert mo.decide("lora_qv", row(0.0, 73_728, 450)) == "continue"  # ranked: 1 of 3 ahead (adapter) -> stop
    assert mo.decide("bigger", row(0.0, 108_368, 600)) == "continue"
    # one score differs: the rung ranks again, every result recorded at it included
    assert mo.decide("learns", row(0.12, 200_000, 900)) == "continue"   # best score: front 0
    assert mo.decide("late", row(0.0, 99_000, 550)) == "stop"          # behind learns, adapter, ... (ceil(6/3) = 2)
    assert mo.decisions[-1] == ("late", 2592, "stop") and len(mo.recorded[2592]) == 6


def test_mo_asha_stops_failed_and_nan_reports_without_recording_them():
    from autopeft.searching.scheduler import MultiObjectiveASHA

    mo = MultiObjectiveASHA([100, 300], reduction_factor=3)
    assert mo.decide("nan", {"examples_seen": 100, "score": float("nan"), "trainable_params": 1,
                             "peak_memory_bytes": 1}) == "stop"
    assert mo.decide("failed", {"status": "failed", "examples_seen": 0}) == "stop"
    assert mo.recorded[100] == {}


def test_nondominated_sorting_and_crowding():
    pts = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [4, 4]], dtype=float)  # minimisation
    assert nondominated_fronts(pts) == [[0, 1, 2], [3], [4]]
    cd = crowding_distance(pts[[0, 1, 2]])
    assert math.isinf(cd[0]) and math.isinf(cd[2]) and cd[1] == pytest.approx((3 - 0) / 3 + (3 - 0) / 3)
    assert rank_order(pts) == [0, 2, 1, 3, 4]


def test_nan_score_is_never_on_the_front():
    rows = [{"score": float("nan"), "trainable_params": 10000, "peak_memory_bytes": 1e8},
            {"score": 0.80, "trainable_params": 73728, "peak_memory_bytes": 2e8}]
    assert pareto_front(rows) == [1]


def _space():
    return SearchSpace.from_dict({
        "components": {
            "lora": {"enabled": [True, False], "r": [4, 64], "target_modules": [["query", "value"]]},
            "bitfit": {"enabled": [False, True]},
        },
        "pooling": ["mean", "cls"],
        "training": {"learning_rate": {"loguniform": [1e-3, 1e-2]}},
        "start_points": [{"lora.enabled": True, "lora.r": 64},   # over budget
                         {"lora.enabled": False},                # empty
                         {"lora.enabled": True, "lora.r": 4}],   # fine
    })


BASE = {"backbone": MINILM_META, "task": "sst2", "training": {"max_train_examples": 300}}
LIMIT = 100_000  # LoRA r=4 q/v on MiniLM-L6: 4 * (384 + 384) * 2 * 6 = 36,864; r=64: 589,824


def test_check_point_counts_on_the_meta_device():
    from autopeft.searching.searchers import check_point

    sp = _space()
    assert check_point(sp, sp.complete_point({"lora.enabled": True, "lora.r": 4}), BASE, LIMIT).trainable_params == 36_864
    v = check_point(sp, sp.complete_point({"lora.enabled": True, "lora.r": 64}), BASE, LIMIT)
    assert (v.status, v.trainable_params) == ("over_budget", 589_824)
    assert check_point(sp, sp.complete_point({"lora.enabled": False}), BASE, LIMIT).status == "empty"


def test_searcher_rejects_infeasible_points_before_ray_and_tells_the_sampler():
    import optuna

    from autopeft.searching.searchers import SpaceSearcher, make_sampler

    sp = _space()
    rejected = []
    s = SpaceSearcher(sp, BASE, LIMIT, make_sampler("tpe", 0), 300, sp.start_points,
                      on_reject=lambda c, v: rejected.append(v.status))
    config = s.suggest("t1")
    # the first two start points were rejected without becoming a trial; the third is the trial
    assert rejected == ["over_budget", "empty"]
    assert sp.decode(config)["lora.r"] == 4 and sp.decode(config)["lora.enabled"] is True
    states = [t.state for t in s.study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert s.study.trials[0].constraints["budget"] == pytest.approx((589_824 - LIMIT) / LIMIT)
    assert s.study.trials[1].constraints["nonempty"] == 1.0


def test_a_trial_stopped_at_a_low_rung_never_reaches_the_sampler_as_final():
    from autopeft.searching.searchers import SpaceSearcher, make_sampler

    sp = _space()
    s = SpaceSearcher(sp, BASE, LIMIT, make_sampler("random", 0), 300, [])
    s.suggest("low")
    s.suggest("top")
    s.suggest("nan")
    row = {"trainable_params": 36_864, "peak_memory_bytes": 1e8, "status": "running"}
    s.on_trial_complete("low", {**row, "score": 0.9, "examples_seen": 128})
    s.on_trial_complete("top", {**row, "score": 0.8, "examples_seen": 300})
    s.on_trial_complete("nan", {**row, "score": float("nan"), "examples_seen": 300})
    told = [t for t in s.told() if t[0] != "COMPLETE" or t[1][0] != 0.0]  # drop rejected samples
    assert told == [("PRUNED", None), ("COMPLETE", (0.8, 36_864.0, 1e8)), ("FAIL", None)]


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "qnehvi"])
def test_searchers_by_name_are_seeded(name):
    from autopeft.searching.searchers import SpaceSearcher, make_sampler

    pytest.importorskip("optuna")
    if name == "qnehvi":
        pytest.importorskip("botorch")
        pytest.importorskip("optuna_integration")
    sp = _space()
    runs = []
    for seed in (7, 7, 8):
        s = SpaceSearcher(sp, BASE, LIMIT, make_sampler(name, seed), 300, [])
        runs.append([s.suggest(f"t{i}") for i in range(3)])
    assert runs[0] == runs[1]  # the same seed: the same points
    assert runs[2] != runs[0]  # another seed: others (a sampler that ignored its seed passed before)
    assert len({json.dumps(p, sort_keys=True) for p in runs[0]}) > 1  # and not one point over and over


def test_unknown_searcher_is_a_one_line_error():
    from autopeft.searching.searchers import SearcherError, make_sampler

    with pytest.raises(SearcherError, match="unknown searcher 'bayes'; valid: tpe, random, nsga2, qnehvi"):
        make_sampler("bayes", 0)


def test_a_nan_score_fails_the_trial_in_the_worker(monkeypatch):
    """STS-B's Pearson is NaN for constant predictions: the trial reports failed, not a score."""
    import ray.tune

    import autopeft.training.trainer
    from autopeft.searching import tune as hpo_tune

    reported = []
    monkeypatch.setattr(ray.tune, "report", lambda row: reported.append(dict(row)))

    def fake_run_trial(recipe, data_dir, rungs, report, device, on_step=None, keep_dir=None):
        report({"score": 0.7, "examples_seen": 64, "trainable_params": 1, "peak_memory_bytes": 1})
        report({"score": float("nan"), "examples_seen": 128, "trainable_params": 1, "peak_memory_bytes": 1})
        raise AssertionError("not reached: the NaN report stops the trial")

    monkeypatch.setattr(autopeft.training.trainer, "run_trial", fake_run_trial)
    sp = _space()
    hpo_tune._trial_fn(sp.complete_point({"lora.enabled": True, "lora.r": 4}), sp, BASE, [64, 128], None, "cpu")
    assert [r["status"] for r in reported] == ["running", "failed"]
    assert "NonFiniteScore" in reported[1]["error"] and "nan" in reported[1]["error"]


def test_export_never_picks_a_nan_row(tmp_path):
    import json

    import autopeft

    recipe = {"backbone": MINILM_META, "task": "stsb", "components": [{"method": "lora"}]}
    rows = [{"trial_id": "nan", "score": float("nan"), "trainable_params": 10000, "peak_memory_bytes": 1e8,
             "recipe": recipe},
            {"trial_id": "ok", "score": 0.80, "trainable_params": 73728, "peak_memory_bytes": 2e8,
             "recipe": {**recipe, "components": [{"method": "lora", "r": 4}]}}]
    (tmp_path / "pareto.json").write_text(json.dumps(rows))
    for pick in ("best", "smallest", "leanest"):
        assert autopeft.export(tmp_path, pick=pick).components[0].r == 4
