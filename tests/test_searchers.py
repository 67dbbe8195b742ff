"""The searchers without Ray (issue 13): every searcher's state pickles and continues, and
constraints are told the same way for every sampled point.

Counts on the meta device (MiniLM-L6 config, no weights): milliseconds per sampled point.
"""

import pickle

import pytest

from autopeft.hpo.space import SearchSpace

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
    from autopeft.hpo.searchers import SpaceSearcher, make_sampler

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

    from autopeft.hpo.searchers import PicklableNSGAIISampler, make_sampler

    sampler = make_sampler("nsga2", 1)
    assert isinstance(sampler, PicklableNSGAIISampler)
    assert isinstance(sampler._thread_lock, type(threading.Lock()))
    copy = pickle.loads(pickle.dumps(sampler))
    assert isinstance(copy._thread_lock, type(threading.Lock())) and copy._thread_lock is not sampler._thread_lock
    assert copy._thread_lock.acquire(blocking=False)
    assert copy.population_size == sampler.population_size and "_autopeft_locks" not in vars(copy)
