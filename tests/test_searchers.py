"""The searchers without Ray (issue 13): every searcher's state pickles and continues, constraints
are told the same way for every sampled point, duplicates are answered from the trial that holds
their recipe (also across a checkpoint), and an exhausted space ends the search.

Counts on the meta device (MiniLM-L6 config, no weights): milliseconds per sampled point.
"""

import pickle

import pytest

from autopeft.searching.space import SearchSpace

BASE = {"backbone": {"preset": "minilm-l6"}, "task": "sst2", "training": {"max_train_examples": 300}}
LIMIT = 100_000  # LoRA r=4 q/v on MiniLM-L6: 36,864; r=8: 73,728; r=64: 589,824
TOP = 300
CONSTRAINTS = {"budget", "nonempty", "valid"}


_CALLS: list[tuple] = []  # what BoTorch handed _quick_candidates: (train_x, train_obj, train_con or None) shapes


def _quick_candidates(train_x, train_obj, train_con, bounds, pending_x):
    """A random point in ``bounds`` from torch's generator, which BoTorchSampler seeds before every
    call (its seed, part of the pickled sampler, goes up by one per proposal): reproducible, as the
    real qNEHVI is. Module-level, so a sampler holding it pickles."""
    import torch

    _CALLS.append((tuple(train_x.shape), tuple(train_obj.shape), None if train_con is None else tuple(train_con.shape)))
    return bounds[0] + torch.rand(1, bounds.shape[1], dtype=bounds.dtype) * (bounds[1] - bounds[0])


def quick_qnehvi(monkeypatch) -> list[tuple]:
    """``qnehvi``'s BoTorchSampler as shipped, with :func:`_quick_candidates` in place of qNEHVI's GP
    fit and acquisition optimisation (a minute per proposal on 2 loaded cores). Returns the list of
    shapes BoTorch handed it."""
    pytest.importorskip("botorch")
    integration = pytest.importorskip("optuna_integration.botorch")
    _CALLS.clear()
    monkeypatch.setattr(integration, "qnehvi_candidates_func", _quick_candidates)
    return _CALLS


def _mixed_space():
    """Over-budget, empty and fine points, so rejected samples come between trials."""
    return SearchSpace.from_dict({
        "components": {"lora": {"enabled": [True, False], "r": [4, 64], "target_modules": [["query", "value"]]},
                       "bitfit": {"enabled": [False, True]}},
        "pooling": "mean",
        "training": {"learning_rate": {"loguniform": [1e-3, 1e-2]}},
        "start_points": [{"lora.enabled": True, "lora.r": 64}, {"lora.enabled": False},
                         {"lora.enabled": True, "lora.r": 4}],
    })


def _two_recipes(extra: dict | None = None):
    """Two configurations (LoRA r=4 or r=8); ``adapter.reduction_factor`` is a dimension of a component
    that is always off: it never reaches the recipe, so it makes 4 points but still 2 recipes."""
    return SearchSpace.from_dict({
        "components": {"lora": {"enabled": True, "r": [4, 8], "target_modules": [["query", "value"]]},
                       "adapter": {"enabled": False, "placement": "parallel", "reduction_factor": [16, 4]},
                       **(extra or {})},
        "pooling": "mean", "training": {"learning_rate": 1e-3},
    })


def _point(sp, r, rf=16):
    return sp.complete_point({"lora.r": r, "adapter.reduction_factor": rf})


def _top(score, params):
    return {"score": score, "trainable_params": params, "peak_memory_bytes": 1e6 + params, "examples_seen": TOP,
            "status": "running"}


def _searcher(sp, name="random", start_points=(), n_startup=6, **callbacks):
    from autopeft.searching.searchers import SpaceSearcher, make_sampler

    return SpaceSearcher(sp, BASE, LIMIT, make_sampler(name, 3, n_startup_trials=n_startup), TOP, list(start_points),
                         **callbacks)


def _drive(s, n, first=0):
    """Suggest and complete ``n`` trials: top fidelity, then one stopped early, then one failed, ..."""
    out = []
    for i in range(first, first + n):
        config = s.suggest(f"t{i}")
        out.append(config)
        params = 1000 * (i + 1)
        result = [_top(0.5 + i / 50, params), {**_top(0.6, params), "examples_seen": TOP // 3},
                  {**_top(float("nan"), params), "status": "failed"}][i % 3]
        s.on_trial_complete(f"t{i}", result)
    return out


# ---- every searcher: pickles (Ray, checkpoint.pkl), and the same constraints on every point ----------

@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "qnehvi"])
def test_searcher_state_pickles_and_the_restored_searcher_continues_identically(name, tmp_path, monkeypatch):
    """Before: nsga2 raised "TypeError: cannot pickle '_thread.lock' object" (Optuna's GA lock)."""
    import ray.cloudpickle

    calls = quick_qnehvi(monkeypatch) if name == "qnehvi" else None
    sp = _mixed_space()
    a = _searcher(sp, name, sp.start_points, n_startup=3)
    _drive(a, 4)
    ray.cloudpickle.dumps(a)  # what Ray does with the search algorithm
    a.save(str(tmp_path / "searcher.pkl"))  # what checkpoint.pkl holds
    b = _searcher(sp, name, sp.start_points, n_startup=3)
    b.restore(str(tmp_path / "searcher.pkl"))
    assert b.told() == a.told()
    assert _drive(b, 2, first=4) == _drive(a, 2, first=4)  # the same next proposals (the lock is a new one)
    assert b.told() == a.told() and len(a.told()) >= 8
    if name == "qnehvi":
        assert calls, "the model never proposed a point"


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "qnehvi"])
def test_constraints_are_told_the_same_way_for_every_point(name, monkeypatch):
    """Before: qnehvi raised "Expected the constraints named ['budget', 'nonempty', 'valid'] but received
    []" as soon as it modelled a finished trial beside rejected samples (3 objectives x 3 constraints)."""
    from optuna.trial import TrialState

    calls = quick_qnehvi(monkeypatch) if name == "qnehvi" else None
    sp = _mixed_space()
    s = _searcher(sp, name, sp.start_points, n_startup=3)
    configs = _drive(s, 4)  # 2 rejected start points, then trials told complete / pruned / failed / complete
    assert all(c is not None and c != s.FINISHED for c in configs)
    trials = s.study.trials
    assert {t.state for t in trials} >= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    for t in trials:
        assert set(t.constraints) == CONSTRAINTS, (t.number, t.state, t.constraints)
    assert trials[0].constraints["budget"] == pytest.approx((589_824 - LIMIT) / LIMIT)
    assert trials[1].constraints == {"budget": 0.0, "nonempty": 1.0, "valid": 0.0}
    trained = [t for t in trials if t.state != TrialState.COMPLETE or t.values[0] != 0.0]
    assert len(trained) == 4 and all(t.constraints == dict.fromkeys(CONSTRAINTS, 0.0) for t in trained)
    if name == "qnehvi":  # BoTorch modelled the 3 objectives and the 3 constraints of every complete trial
        assert calls and all(con == (obj[0], 3) and obj[1] == 3 for _, obj, con in calls), calls
        assert max(obj[0] for _, obj, _ in calls) >= 3  # rejected samples and a finished trial together


def test_nsga2_sampler_pickles_without_its_lock_and_gets_a_new_one():
    import threading

    from autopeft.searching.searchers import PicklableNSGAIISampler, make_sampler

    sampler = make_sampler("nsga2", 1)
    assert isinstance(sampler, PicklableNSGAIISampler)
    assert isinstance(sampler._thread_lock, type(threading.Lock()))
    copy = pickle.loads(pickle.dumps(sampler))
    assert isinstance(copy._thread_lock, type(threading.Lock())) and copy._thread_lock is not sampler._thread_lock
    assert copy._thread_lock.acquire(blocking=False)
    assert copy.population_size == sampler.population_size and "_autopeft_locks" not in vars(copy)


# ---- duplicates ---------------------------------------------------------------------------------------

def test_a_duplicate_is_answered_from_its_original_and_never_becomes_a_trial():
    from autopeft.searching.searchers import SpaceSearcher

    sp = _two_recipes()
    dups, accepted = [], []
    # r=4 twice (adapter off: its reduction factor does not matter), then r=8
    s = _searcher(sp, "random", [_point(sp, 4, 16), _point(sp, 4, 4), _point(sp, 8, 16)],
                  on_duplicate=lambda c, v: dups.append((c, v)), on_accept=lambda t, c, v: accepted.append(t))
    assert sp.decode(s.suggest("t1"))["lora.r"] == 4
    assert sp.decode(s.suggest("t2"))["lora.r"] == 8  # the second r=4 point was a duplicate of running t1
    assert [(c["adapter.reduction_factor"], v.status, v.duplicate_of) for c, v in dups] == [(4, "duplicate", "t1")]
    assert dups[0][1].trainable_params == 36_864 and dups[0][1].recipe["components"][0]["r"] == 4
    assert s.told()[1] == ("RUNNING", None)  # waits for t1
    s.on_trial_complete("t1", _top(0.81, 36_864))
    assert s.told()[:2] == [("COMPLETE", (0.81, 36_864.0, 1_036_864.0))] * 2  # the sampler saw t1's values
    s.on_trial_complete("t2", {**_top(0.7, 73_728), "examples_seen": TOP // 3})  # stopped early
    # every point sampled: the space is exhausted, no third trial
    assert s.suggest("t3") == SpaceSearcher.FINISHED and s.exhausted
    assert "all 4 points of the space were sampled" in s.stop_reason
    assert accepted == ["t1", "t2"] and s.duplicates == len(dups) >= 2
    by_origin = {"t1": ("COMPLETE", (0.81, 36_864.0, 1_036_864.0)), "t2": ("PRUNED", None)}
    told = s.told()
    trials = s.study.trials  # no point of this space is rejected: every one but t1 (0) and t2 (2) is a duplicate
    assert len(trials) == 2 + len(dups)
    for t, (config, verdict) in zip([t for t in trials if t.number not in (0, 2)], dups):
        assert t.params == config
        assert told[t.number] == by_origin[verdict.duplicate_of]
        assert verdict.recipe["components"][0]["r"] == config["lora.r"] == (4 if verdict.duplicate_of == "t1" else 8)


def test_a_duplicate_of_a_failed_trial_is_told_failed_and_of_a_finished_one_its_values():
    sp = _two_recipes()
    s = _searcher(sp, "random", [_point(sp, 4, 16), _point(sp, 8, 16), _point(sp, 4, 4), _point(sp, 8, 4)],
                  on_duplicate=lambda c, v: None)
    s.suggest("t1")
    s.suggest("t2")
    s.on_trial_complete("t1", {**_top(float("nan"), 36_864), "status": "failed"})
    s.on_trial_complete("t2", _top(0.9, 73_728))
    assert s.suggest("t3") == s.FINISHED  # both enqueued duplicates answered at once, then exhausted
    assert s.told()[:4] == [("FAIL", None), ("COMPLETE", (0.9, 73_728.0, 1_073_728.0)),
                            ("FAIL", None), ("COMPLETE", (0.9, 73_728.0, 1_073_728.0))]


def test_duplicates_survive_a_checkpoint(tmp_path):
    """Saved while r=4 runs and a duplicate waits for it: the restored searcher tells that duplicate
    when the re-run completes, and answers a later r=8 sample from the trial finished before."""
    sp = _two_recipes()
    order = [_point(sp, 8, 16), _point(sp, 4, 16), _point(sp, 4, 4), _point(sp, 8, 4)]
    a = _searcher(sp, "random", order, on_duplicate=lambda c, v: None)
    a.suggest("t1")
    a.on_trial_complete("t1", _top(0.9, 73_728))
    assert sp.decode(a.suggest("t2"))["lora.r"] == 4
    a.save(str(tmp_path / "searcher.pkl"))
    dups = []
    b = _searcher(sp, "random", order, on_duplicate=lambda c, v: dups.append(v.duplicate_of))
    b.restore(str(tmp_path / "searcher.pkl"))
    assert b.suggest("t2") == a.suggest("t2")  # the trial that was running comes back with its point
    assert b.suggest("t3") == b.FINISHED  # r=4 (waits for t2) and r=8 (from t1) were duplicates
    assert dups == ["t2", "t1"]
    assert b.told()[2:] == [("RUNNING", None), ("COMPLETE", (0.9, 73_728.0, 1_073_728.0))]
    b.on_trial_complete("t2", _top(0.8, 36_864))
    assert b.told()[1] == b.told()[2] == ("COMPLETE", (0.8, 36_864.0, 1_036_864.0))


def test_consecutive_duplicates_stop_a_search_whose_space_is_not_finite(monkeypatch):
    """A continuous dimension that never reaches the recipe: duplicates count toward the stop."""
    import autopeft.searching.searchers as searchers

    monkeypatch.setattr(searchers, "MAX_CONSECUTIVE_REJECTS", 25)
    sp = _two_recipes({"spare": {"method": "lora", "enabled": False, "lora_dropout": {"uniform": [0.0, 0.5]}}})
    s = _searcher(sp, "tpe", on_duplicate=lambda c, v: None)
    assert s.points is None
    seen = set()
    for i in range(1, 30):
        config = s.suggest(f"t{i}")
        if config == s.FINISHED:
            break
        seen.add(sp.decode(config)["lora.r"])
        s.on_trial_complete(f"t{i}", _top(0.8, 1000 * i))
    assert config == s.FINISHED and seen == {4, 8} and i == 3  # two trials, then the stop
    assert s.stop_reason == "25 samples in a row were over budget, empty, invalid or duplicates"
    assert s.duplicates >= 25 and s.suggest("t9") == s.FINISHED


def test_space_points_count_only_finite_spaces():
    from autopeft.searching.searchers import _count_points, optuna_distribution

    sp = SearchSpace.from_dict({"components": {"lora": {"enabled": [True, False], "r": {"int": [2, 5]},
                                                        "target_modules": [["query"], ["query", "value"]]}},
                                "pooling": ["mean", "cls", "mean"]})
    dists = {k: optuna_distribution(d) for k, d in sp.tunable().items()}
    assert _count_points(dists) == 2 * 4 * 2 * 2  # "mean" listed twice is one point
    assert _count_points({}) == 1
    sp2 = SearchSpace.from_dict({"components": {"lora": {"enabled": True}},
                                 "training": {"learning_rate": {"loguniform": [1e-4, 1e-3]}}})
    assert _count_points({k: optuna_distribution(d) for k, d in sp2.tunable().items()}) is None


def test_duplicates_of_failed_trials_do_not_hide_that_every_trained_trial_failed(tmp_path):
    """The CLI's line under an empty front: a duplicate was never trained, so it is not a trial that
    could have reached the top fidelity."""
    import types

    from autopeft.cli import empty_front_advice

    trials = [{"trial_id": "trial_0001", "status": "failed", "error": "ValueError: boom"},
              {"trial_id": "duplicate_0001", "status": "duplicate", "error": None, "duplicate_of": "trial_0001"}]
    result = types.SimpleNamespace(trials=trials, pareto=[], param_limit=10_000, fidelity=3000, path=tmp_path,
                                   settings={})
    assert empty_front_advice(result) == f"every trained trial failed (first: ValueError: boom); see {tmp_path / 'trials.json'}"


def test_a_checkpoint_keeps_duplicate_records_and_what_the_searcher_knows_of_them(tmp_path):
    """Through resume.save_checkpoint / restore, as a killed search: the duplicate's record (with its
    duplicate_of) is kept, and the restored searcher knows which trial holds each recipe."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import ConcurrencyLimiter

    from autopeft.searching.resume import NumberedSearchGenerator, load_checkpoint, restore, save_checkpoint
    from autopeft.searching.scheduler import MultiObjectiveASHA
    from autopeft.searching.tune import TrialRecord

    sp = _two_recipes()
    order = [_point(sp, 4, 16), _point(sp, 4, 4), _point(sp, 8, 16), _point(sp, 8, 4)]

    def fresh(records):
        def on_duplicate(config, verdict):
            did = f"duplicate_{sum(t.startswith('duplicate_') for t in records) + 1:04d}"
            records[did] = TrialRecord(did, sp.decode(config), verdict.recipe, "duplicate", None,
                                       verdict.trainable_params, duplicate_of=verdict.duplicate_of)

        searcher = _searcher(sp, "random", order, on_duplicate=on_duplicate)
        gen = NumberedSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=1))
        gen.add_configurations(Experiment("e", lambda config: None, num_samples=3, config={}))
        return searcher, gen, MultiObjectiveASHA([100, TOP], reduction_factor=3)

    records: dict = {}
    searcher, gen, sched = fresh(records)
    first = gen.next_trial()
    records[first.trial_id] = TrialRecord(first.trial_id, dict(first.config), status="finished", rows=[_top(0.8, 36_864)])
    gen.on_trial_complete(first.trial_id, _top(0.8, 36_864))
    second = gen.next_trial()  # r=4 again (a duplicate), then r=8
    records[second.trial_id] = TrialRecord(second.trial_id, dict(second.config))
    assert list(records) == ["trial_0001", "duplicate_0001", "trial_0002"]
    save_checkpoint(tmp_path, records, searcher, sched, gen, 3.0)

    records2: dict = {}
    searcher2, gen2, sched2 = fresh(records2)
    restore(load_checkpoint(tmp_path), records2, searcher2, sched2, gen2)
    assert records2["duplicate_0001"].duplicate_of == "trial_0001"
    assert records2["duplicate_0001"].as_dict()["duplicate_of"] == "trial_0001"
    assert records2["duplicate_0001"].status == "duplicate" and gen2.reissue == ["trial_0002"]
    again = gen2.next_trial()
    assert again.trial_id == "trial_0002" and again.config == second.config
    gen2.on_trial_complete("trial_0002", _top(0.7, 73_728))
    assert gen2.next_trial() is None  # the last point (r=8) was answered from trial_0002; then exhausted
    assert list(records2) == ["trial_0001", "duplicate_0001", "trial_0002", "duplicate_0002"]
    assert records2["duplicate_0002"].duplicate_of == "trial_0002" and searcher2.exhausted
    assert [t[0] for t in searcher2.told()] == ["COMPLETE"] * 4
    assert searcher2.told()[1] == searcher2.told()[0] and searcher2.told()[3] == searcher2.told()[2]


def test_qnehvi_prints_no_experimental_warning(monkeypatch):
    """Optuna marks BoTorchSampler and qnehvi_candidates_func experimental and warned at the sampler's
    creation and on every proposal (the search's output showed "ExperimentalWarning: ... is
    experimental" lines). The proposals come from :func:`_quick_candidates` wrapped in Optuna's own
    ``experimental_func`` decorator, so they warn as the real qNEHVI does, without its minute of GP
    fitting: 2 random start-up trials, then 2 proposals."""
    integration = pytest.importorskip("optuna_integration.botorch")
    import warnings

    import optuna
    from optuna._experimental import experimental_func

    from autopeft.searching.searchers import make_sampler

    _CALLS.clear()
    monkeypatch.setattr(integration, "qnehvi_candidates_func", experimental_func("3.1.0")(_quick_candidates))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("qnehvi", 0, 2))
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.params["x"] ** 2), n_trials=4)
    assert len(study.trials) == 4 and len(_CALLS) == 2  # 2 proposals went through the warning function
    assert [str(w.message) for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)] == []
