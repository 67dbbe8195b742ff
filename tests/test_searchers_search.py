"""Every searcher through Ray Tune, and no configuration trained twice (issue 13).

* ``random``, ``nsga2`` and ``qnehvi`` each run a short real search (tiny random BERT, synthetic
  SST-2 data, 3 trials) that is SIGKILLed after its first finished trial, while the second trains,
  and resumed with ``autopeft resume``: it finishes with every trial trained once, the trial finished
  before the kill kept, every complete sampler trial carrying the same three constraints, and
  qnehvi's model proposing points while it held a trained trial beside a rejected sample. ``tpe`` is
  ``tests/test_resume.py``'s searcher (same protocol, and compared with an uninterrupted run);
  ``tests/test_searchers.py`` checks that every restored searcher proposes what the original would.
  Before: nsga2 failed before any trial ("cannot pickle '_thread.lock' object"), qnehvi at its first
  model proposal after a trained trial ("Expected the constraints named [...] but received []").
* A space of two configurations (LoRA r=4 / r=8; a dimension of a component that is always off makes
  4 points) searched with 4 trials: exactly 2 trials are trained, every other sample is a
  ``duplicate`` answered from the trial with its recipe (the sampler is told that trial's values),
  recorded in trials.json and MLflow, and the search ends when every point was sampled.
  Before: the same LoRA was trained again with identical scores.
"""

import json
import re
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from test_resume import SPACE as RESUME_SPACE
from test_resume import TINY_BERT, _data, _env, _kill_after_first_finished, _trials

pytestmark = pytest.mark.integration

TRIALS = 3
SEARCHERS = ["random", "nsga2", "qnehvi"]  # tpe: tests/test_resume.py
# as tests/test_resume.py (budget 1,500: LoRA r=8, r=4 + adapter and the empty point are rejected),
# the first start point over the budget: every search has a rejected sample before its first trial
SPACE = (RESUME_SPACE.replace("name: resume-tiny", "name: searchers-tiny")
         .replace("max_train_examples: 256, min_train_examples: 64", "max_train_examples: 64, min_train_examples: 16")
         .replace("start_points:\n", "start_points:\n  - {lora.enabled: true, lora.r: 8, adapter.enabled: false}\n"))
# qNEHVI as shipped (GP fit, qLogNEHVI with the constraints) but quicker: its model proposes from the
# second trial on (2 start-up samples, not max(4, start points + 2)), and its acquisition is optimised
# with 2 restarts instead of 20, so a proposal takes seconds on 2 CPU cores. Each model proposal
# prints how many trained trials (non-zero score) the model held. Defined in __main__ of both the
# search and the resume process: the pickled sampler refers to `counted`.
PATCH = """
import functools, optuna_integration.botorch as integration, optuna_integration.botorch.botorch as bb
import autopeft.searching.searchers as searchers
_real_optimize, _real_candidates, _real_make = bb.optimize_acqf, integration.qnehvi_candidates_func, searchers.make_sampler
bb.optimize_acqf = functools.wraps(_real_optimize)(lambda *a, **kw: _real_optimize(
    *a, **{**kw, "num_restarts": 2, "raw_samples": 32, "options": {**kw["options"], "maxiter": 20}}))
def counted(train_x, train_obj, train_con, bounds, pending_x):
    print(f"qnehvi model proposal: {int((train_obj[:, 0] != 0).sum())} trained trials, "
          f"constraints {None if train_con is None else tuple(train_con.shape)}", flush=True)
    return _real_candidates(train_x, train_obj, train_con, bounds, pending_x)
integration.qnehvi_candidates_func = counted
searchers.make_sampler = lambda name, seed, n_startup_trials=6: _real_make(
    name, seed, n_startup_trials=2 if name == "qnehvi" else n_startup_trials)
"""
RUNNER = PATCH + """
import json, sys
from autopeft.api import search
search(**json.loads(sys.argv[1]), progress=print)
"""
RESUMER = PATCH + """
import sys
from autopeft.cli import main
sys.argv = ["autopeft", *sys.argv[1:]]
main()
"""


def _args(tmp: Path, glue: Path, name: str, searcher: str) -> dict:
    (tmp / "space.yaml").write_text(SPACE)
    return {"task": "sst2", "budget": "1500", "backbone": TINY_BERT, "space": str(tmp / "space.yaml"),
            "trials": TRIALS, "data_dir": str(glue), "tracking_uri": f"sqlite:///{tmp / (name + '.db')}",
            "experiment": name, "name": name, "output_dir": str(tmp / "runs"), "seed": 5, "searcher": searcher,
            "training": {"max_eval_examples": 48, "rung_eval_examples": 16}, "time_budget_s": 3600}


@pytest.fixture(scope="module", params=SEARCHERS)
def searched(request, tmp_path_factory):
    """The search SIGKILLed after its first finished trial (while the next trains), then resumed
    through the CLI; its folder and both sessions' output."""
    name = request.param
    if name == "qnehvi":
        pytest.importorskip("botorch")
        pytest.importorskip("optuna_integration")
    tmp = tmp_path_factory.mktemp(f"search-{name}")
    glue, env, out = _data(tmp), _env(tmp), tmp / "runs"
    args = _args(tmp, glue, name, name)
    with open(tmp / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    at_kill = _kill_after_first_finished(proc, out / name, args, timeout=900)
    killed_out = (tmp / "killed.log").read_text()
    assert at_kill is not None, "the search ended before its first trial finished: " + killed_out[-3000:]
    res = subprocess.run([sys.executable, "-c", RESUMER, "resume", name, "--output-dir", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"name": name, "folder": out / name, "at_kill": at_kill, "killed_out": killed_out,
            "resume_out": res.stdout}


class _Unpickler(pickle.Unpickler):
    """Reads a checkpoint whose qnehvi sampler holds PATCH's ``counted`` (defined in the search's __main__)."""

    def find_class(self, module, name):
        if (module, name) == ("__main__", "counted"):
            return lambda *args: None
        return super().find_class(module, name)


def _study(folder: Path):
    with open(folder / "checkpoint.pkl", "rb") as f:
        return _Unpickler(f).load()["searcher"]["study"]


def test_each_searcher_completes_a_search_through_ray(searched):
    from optuna.trial import TrialState

    folder = searched["folder"]
    trials = _trials(folder)
    trained = [t for t in trials if t["trial_id"].startswith("trial_")]
    assert len(trained) == TRIALS and all(t["status"] in ("finished", "stopped_early") for t in trained), trials
    assert any(t["status"] == "finished" for t in trained)
    assert trials[0]["trial_id"] == "rejected_0001" and trials[0]["status"] == "over_budget"  # the first start point
    assert json.loads((folder / "search.json").read_text())["searcher"] == searched["name"]
    assert json.loads((folder / "pareto.json").read_text()), "empty Pareto front"
    assert f"searcher {searched['name']}" in searched["killed_out"]
    assert len({json.dumps(t["recipe"], sort_keys=True) for t in trained}) == TRIALS  # none trained twice
    # the lower rungs score the seeded 16-example sample of dev, the top rung all 48 (max_eval_examples)
    top = json.loads((folder / "search.json").read_text())["rungs"][-1]
    assert {(r["examples_seen"] == top, r["eval_examples"]) for t in trained for r in t["rows"]} \
        <= {(False, 16), (True, 48)}
    assert any(r["eval_examples"] == 16 for t in trained for r in t["rows"])
    study = _study(folder)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(set(t.constraints) == {"budget", "nonempty", "valid"} for t in complete)
    told = [t for t in complete if t.values[0] != 0.0]  # trained trials told at the top fidelity
    assert len(told) == sum(1 for t in trained if t["status"] == "finished")
    assert all(t.constraints == {"budget": 0.0, "nonempty": 0.0, "valid": 0.0} for t in told)
    if searched["name"] == "qnehvi":  # the model proposed points while it held a trained trial and a rejected one
        out = searched["killed_out"] + searched["resume_out"]
        held = [(int(line.split(": ")[1].split()[0]), line.split("constraints ")[1]) for line in out.splitlines()
                if line.startswith("qnehvi model proposal")]
        assert any(n >= 1 and con.startswith("(") and con.endswith(", 3)") for n, con in held), out[-3000:]


def test_each_searcher_resumes_a_killed_search(searched):
    at_kill = searched["at_kill"]
    assert 1 <= sum(1 for t in at_kill if t["status"] in ("finished", "stopped_early", "failed")) < TRIALS
    assert "resumed after" in searched["resume_out"], searched["resume_out"]
    assert "trial_0002" in searched["resume_out"]  # re-run from the start
    resumed = _trials(searched["folder"])
    assert json.loads((searched["folder"] / "result.json").read_text())["counts"]["finished"] >= 1
    assert [t["trial_id"] for t in resumed if t["trial_id"].startswith("trial_")] == \
        [f"trial_{i:04d}" for i in range(1, TRIALS + 1)]
    for before in at_kill:  # finished before the kill: kept, not re-run
        if before["status"] == "finished":
            assert next(t for t in resumed if t["trial_id"] == before["trial_id"])["rows"] == before["rows"]


# ---- no configuration trained twice ------------------------------------------------------------------

TWO = """
name: two-configurations
fidelity: {max_train_examples: 64, min_train_examples: 16, reduction_factor: 2}
components:
  lora: {enabled: true, r: [4, 8], target_modules: [[query, value]]}
  adapter: {enabled: false, placement: parallel, reduction_factor: [16, 4]}
gating: false
training: {learning_rate: 3.0e-2, batch_size: 16}
pooling: mean
start_points: []
"""


def test_a_space_of_two_configurations_trains_each_once(tmp_path, monkeypatch):
    import mlflow
    import ray

    import autopeft
    import autopeft.searching.searchers as searchers

    made = []

    class Recorded(searchers.SpaceSearcher):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(searchers, "SpaceSearcher", Recorded)
    (tmp_path / "space.yaml").write_text(TWO)
    notes = []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        result = autopeft.search(task="sst2", budget="100%", backbone=TINY_BERT, space=str(tmp_path / "space.yaml"),
                                 trials=4, data_dir=str(_data(tmp_path)), tracking_uri=uri, experiment="dup",
                                 name="two", output_dir=tmp_path / "runs", seed=1, training={"max_eval_examples": 48},
                                 progress=notes.append)
    finally:
        ray.shutdown()
    trials = json.loads((tmp_path / "runs" / "two" / "trials.json").read_text())
    trained = [t for t in trials if t["trial_id"].startswith("trial_")]
    dups = [t for t in trials if not t["trial_id"].startswith("trial_")]
    assert len(trained) == 2 and all(t["status"] in ("finished", "stopped_early") for t in trained), trials
    assert sorted(t["recipe"]["components"][0]["r"] for t in trained) == [4, 8]
    assert len(dups) >= 2 and all(t["status"] == "duplicate" for t in dups), trials
    by_id = {t["trial_id"]: t for t in trained}
    for d in dups:
        original = by_id[d["duplicate_of"]]
        assert d["recipe"] == original["recipe"] and d["rows"] == []
        assert d["config"]["lora.r"] == original["config"]["lora.r"]
    # every point sampled (2 x 2, the adapter's reduction factor never reaching a recipe): ended, not spinning
    assert any("the searcher stopped: all 4 points of the space were sampled" in n for n in notes), notes
    # each rung line says how many dev examples its score read (48: max_eval_examples, under the rung sample)
    rung_lines = [n for n in notes if " rung " in n and "examples: " in n]
    assert rung_lines and all(re.search(r"examples: accuracy=\d\.\d{4} \(48 dev\) params=", n) for n in rung_lines), rung_lines
    saved = json.loads((tmp_path / "runs" / "two" / "result.json").read_text())
    assert saved["counts"]["duplicate"] == len(dups)
    # where the wall time went: the trials' own clocks summed, the driver's phases inside the wall
    spent = saved["time_s"]
    assert spent == pytest.approx(result.time_s)
    assert spent["training_s"] == pytest.approx(sum(t["rows"][-1]["train_time_s"] for t in trained))
    assert spent["trial_eval_s"] == pytest.approx(sum(t["rows"][-1]["eval_time_s"] for t in trained))
    assert all(t["rows"][-1]["setup_time_s"] > 0 and t["rows"][-1]["eval_time_s"] > 0 for t in trained)
    phases = spent["prepare_s"] + spent["ray_start_s"] + spent["tune_s"] + spent["finish_s"]
    assert 0 < phases <= spent["wall_s"] and spent["wall_s"] == result.wall_time_s == saved["wall_time_s"]
    assert spent["outside_training_share"] == pytest.approx(1 - spent["training_s"] / spent["wall_s"])
    # the sampler saw each duplicate answered with its original's result
    (searcher,) = made
    study = searcher.study.trials
    tunable = list(study[0].params)

    def sampler_trial(t):
        return next(s for s in study if s.params == {k: t["config"][k] for k in tunable})

    for d in dups:
        original = sampler_trial(by_id[d["duplicate_of"]])
        told = [s for s in study if s.params == {k: d["config"][k] for k in tunable} and s.number != original.number]
        assert told and all((s.state, s.values) == (original.state, original.values) for s in told)
        if by_id[d["duplicate_of"]]["status"] == "finished":
            assert original.values[0] == by_id[d["duplicate_of"]]["rows"][-1]["score"]
    # MLflow: a run per duplicate, as rejected samples have, tagged with its original
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dup").experiment_id])
    dup_runs = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("status") == "duplicate"}
    assert set(dup_runs) == {d["trial_id"] for d in dups}
    assert all(r.data.tags["duplicate_of"] == next(d["duplicate_of"] for d in dups if d["trial_id"] == tid)
               and "score" not in r.data.metrics for tid, r in dup_runs.items())
    parent = next(r for r in runs if r.info.run_id == result.mlflow_run_id)
    assert parent.data.metrics["trials_duplicate"] == len(dups)
