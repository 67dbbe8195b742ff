"""Resume (issue 9, deliverable 1): a search killed with SIGKILL after its first finished trial
(while the second trains) and resumed ends exactly as the same search run without interruption
(same seed, one trial at a time): same trial ids, statuses, configurations and scores in
``trials.json``, the same Pareto front, and in MLflow the same single parent run with exactly one
nested run per trial, none left RUNNING.

Tiny random BERT (d=32, 2 layers) on 256 synthetic SST-2-format sentences in a temporary folder
(learnable in 16 steps, so trials score differently); the reference search runs beside the killed one.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autopeft.cli import app

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 160}
# LoRA r=2/4/8 (512/1,024/2,048 parameters), a parallel adapter (324/1,104): under a 1,500 budget
# r=8, r=4+adapter and the empty point are rejected, so rejected samples are replayed too.
SPACE = """
name: resume-tiny
fidelity: {max_train_examples: 256, min_train_examples: 64, reduction_factor: 2}
components:
  lora: {enabled: [true, false], r: [2, 4, 8], target_modules: [[query, value]]}
  adapter: {enabled: [false, true], placement: parallel, reduction_factor: [16, 4]}
gating: false
training:
  learning_rate: {loguniform: [1.0e-2, 1.0e-1]}
  batch_size: 16
pooling: mean
start_points:
  - {lora.enabled: true, lora.r: 4, adapter.enabled: false, training.learning_rate: 3.0e-2}
"""
TRIALS = 3
TIMING = {"train_time_s", "wall_time_s", "setup_time_s", "eval_time_s"}  # wall-clock measurements: allowed to differ
ENGINE = {"node_id"}  # the Ray node a trial ran on: each run has its own local Ray cluster
RUNNER = """
import json, sys
from autopeft.api import search
search(**json.loads(sys.argv[1]), progress=print)
"""


def _data(root: Path) -> Path:
    words = {1: ["good", "great", "fine", "lovely", "warm", "nice"], 0: ["bad", "dull", "awful", "cold", "weak", "poor"]}
    glue = root / "glue" / "sst2"
    glue.mkdir(parents=True)
    for split, n in (("train", 256), ("validation", 48)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = (i * 7 + (split == "validation")) % 2
            rows.append(" ".join(words[label][(i + k) % 6] for k in range(i % 3 + 1)) + f"\t{label}")
        (glue / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root / "glue"


def _env(tmp: Path) -> dict:
    return {**os.environ, "AUTOPEFT_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(tmp: Path, glue: Path, name: str) -> dict:
    (tmp / "space.yaml").write_text(SPACE)
    return {"task": "sst2", "budget": "1500", "backbone": TINY_BERT, "space": str(tmp / "space.yaml"),
            "trials": TRIALS, "data_dir": str(glue), "tracking_uri": f"sqlite:///{tmp / (name + '.db')}",
            "experiment": name, "name": name, "output_dir": str(tmp / "runs"), "seed": 3,
            "training": {"max_eval_examples": 48}, "time_budget_s": 3600}


def _stop_group(proc: subprocess.Popen) -> None:
    """End what is left of the killed driver's process group (its local Ray), by group id."""
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _running_trial(args: dict, done: set) -> str | None:
    """The id of a Ray trial whose MLflow run is open and which trials.json does not list as done."""
    import sqlite3

    db = args["tracking_uri"].removeprefix("sqlite:///")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute("SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE r.status = 'RUNNING' AND t.key = 'trial_id'").fetchall()
    except sqlite3.Error:
        return None
    return next((tid for (tid,) in rows if tid.startswith("trial_") and tid not in done), None)


def _comparable(trials: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in t.items() if k not in ENGINE},
             "rows": [{k: v for k, v in r.items() if k not in TIMING} for r in t["rows"]]} for t in trials]


def _mlflow(uri: str, experiment: str) -> tuple[list, list, object]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autopeft.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("autopeft.kind") == "trial"]
    return parents, children, client


def _children_view(children, client) -> dict:
    out = {}
    for r in children:
        tid = r.data.tags["trial_id"]
        assert tid not in out, f"two active runs for {tid}"
        history = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "score")]
        out[tid] = (r.info.status, r.data.tags["status"], r.data.tags["pareto"], history,
                    {k: v for k, v in r.data.params.items()})
    return out


def _trials(folder: Path) -> list[dict]:
    """``folder/trials.json``, or ``[]`` while it is missing or half written."""
    try:
        return json.loads((folder / "trials.json").read_text())
    except (OSError, ValueError):
        return []


def _kill_after_first_finished(proc: subprocess.Popen, folder: Path, args: dict, timeout: float) -> list[dict] | None:
    """SIGKILL the search ``proc`` (writing ``folder``) after its first finished trial, once the next trial is
    training (its MLflow run exists); returns ``trials.json`` at the kill, ``None`` if the search ended or
    ``timeout`` seconds passed first (then it is killed anyway). The process is reaped and its Ray stopped."""
    at_kill = None
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            trials = _trials(folder)
            done = {t["trial_id"] for t in trials if t["status"] != "running"}
            if any(t["status"] == "finished" for t in trials) and _running_trial(args, done):
                os.kill(proc.pid, signal.SIGKILL)
                at_kill = trials
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None and at_kill is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _stop_group(proc)
    return at_kill


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    glue = _data(tmp)
    env = _env(tmp)
    out = tmp / "runs"
    # 1. the reference, uninterrupted, beside 2. the same search SIGKILLed as soon as trials.json
    # shows its first finished trial (each has its own local Ray and MLflow store)
    ref = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(_args(tmp, glue, "whole"))], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    args = _args(tmp, glue, "killed")
    folder = out / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        at_kill = _kill_after_first_finished(proc, folder, args, timeout=400)
    finally:
        try:
            ref_out, _ = ref.communicate(timeout=600)
        finally:
            if ref.poll() is None:
                os.killpg(ref.pid, signal.SIGKILL)
    assert ref.returncode == 0, ref_out[-5000:]
    assert at_kill is not None, "the search ended before its first trial finished"
    assert proc.returncode == -signal.SIGKILL
    finished_at_kill = (folder / "result.json").exists()
    from autopeft.status import search_status

    state_at_kill = search_status(folder).state  # driver.json names a dead pid
    parents_at_kill, children_at_kill, _ = _mlflow(args["tracking_uri"], "killed")
    run_ids_at_kill = {r.data.tags["trial_id"]: r.info.run_id for r in children_at_kill}
    interrupted = [r.data.tags["trial_id"] for r in children_at_kill if r.info.status == "RUNNING"]
    # 3. resume it through the CLI, with the options it was started with (from its resume.json)
    started = time.time()
    res = subprocess.run([sys.executable, "-c", "from autopeft.cli import main; main()", "resume", "killed",
                          "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=600)
    resume_s = time.time() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"tmp": tmp, "whole": out / "whole", "killed": folder, "at_kill": at_kill,
            "parents_at_kill": parents_at_kill, "run_ids_at_kill": run_ids_at_kill, "resume_out": res.stdout,
            "finished_at_kill": finished_at_kill, "interrupted": interrupted, "uri_whole": _args(tmp, glue, "whole")["tracking_uri"],
            "uri_killed": args["tracking_uri"], "state_at_kill": state_at_kill, "resume_s": resume_s}


@pytest.mark.integration
def test_the_kill_interrupted_the_search(runs):
    done = [t for t in runs["at_kill"] if t["status"] in ("finished", "stopped_early", "failed")]
    assert 1 <= len(done) < TRIALS
    assert not runs["finished_at_kill"]  # result.json came from the resume
    assert runs["interrupted"] == ["trial_0002"]  # killed while the second trial trained
    assert "resumed after" in runs["resume_out"], runs["resume_out"]
    assert runs["state_at_kill"] == "interrupted"  # autopeft status, once the driver was killed
    # the interrupted trial's run, and those of samples rejected after the last checkpoint (replayed)
    deleted = re.search(r"MLflow: (\d+) unfinished run\(s\) deleted", runs["resume_out"])
    assert deleted and int(deleted.group(1)) >= 1, runs["resume_out"]


@pytest.mark.integration
def test_resumed_trials_equal_the_uninterrupted_run(runs):
    whole = json.loads((runs["whole"] / "trials.json").read_text())
    resumed = json.loads((runs["killed"] / "trials.json").read_text())
    assert [t["trial_id"] for t in resumed] == [t["trial_id"] for t in whole]
    assert sum(1 for t in whole if not t["trial_id"].startswith("rejected_")) == TRIALS
    assert any(t["trial_id"].startswith("rejected_") for t in whole)  # rejected samples were replayed too
    assert _comparable(resumed) == _comparable(whole)
    # the trials finished before the kill kept their records (ids, rows, scores)
    for before in runs["at_kill"]:
        if before["status"] == "finished":
            after = next(t for t in resumed if t["trial_id"] == before["trial_id"])
            assert after["rows"] == before["rows"]


@pytest.mark.integration
def test_resumed_front_equals_the_uninterrupted_run(runs):
    whole = json.loads((runs["whole"] / "pareto.json").read_text())
    resumed = json.loads((runs["killed"] / "pareto.json").read_text())
    assert whole, "the front is not empty"
    assert [(r["trial_id"], r["score"], r["trainable_params"]) for r in resumed] == \
        [(r["trial_id"], r["score"], r["trainable_params"]) for r in whole]
    assert json.loads((runs["killed"] / "result.json").read_text())["hypervolume"] == \
        json.loads((runs["whole"] / "result.json").read_text())["hypervolume"]


@pytest.mark.integration
def test_resumed_mlflow_equals_the_uninterrupted_run(runs):
    p_whole, c_whole, client_whole = _mlflow(runs["uri_whole"], "whole")
    p_res, c_res, client_res = _mlflow(runs["uri_killed"], "killed")
    assert len(p_whole) == len(p_res) == 1
    assert p_res[0].info.run_id == runs["parents_at_kill"][0].info.run_id  # the same parent run, reused
    assert p_res[0].info.status == "FINISHED" and p_res[0].data.tags["autopeft.resumes"] == "1"
    assert p_res[0].data.params == p_whole[0].data.params
    view_whole, view_res = _children_view(c_whole, client_whole), _children_view(c_res, client_res)
    assert view_res == view_whole
    assert all(status in ("FINISHED", "FAILED") for status, *_ in view_res.values())  # none left RUNNING
    trials = json.loads((runs["killed"] / "trials.json").read_text())
    assert set(view_res) == {t["trial_id"] for t in trials}  # exactly one nested run per trial
    # the interrupted trial: re-run in a new run; its old run ended KILLED, tagged and deleted
    from mlflow.tracking import MlflowClient

    old = MlflowClient(runs["uri_killed"]).get_run(runs["run_ids_at_kill"]["trial_0002"])
    assert (old.info.status, old.info.lifecycle_stage, old.data.tags["status"]) == ("KILLED", "deleted", "interrupted")
    assert next(r.info.run_id for r in c_res if r.data.tags["trial_id"] == "trial_0002") != old.info.run_id
    # finished before the kill: the same MLflow run, not a re-run (one score per rung, see view equality)
    for before in runs["at_kill"]:
        if before["status"] == "finished":
            tid = before["trial_id"]
            assert next(r.info.run_id for r in c_res if r.data.tags["trial_id"] == tid) == runs["run_ids_at_kill"][tid]


# ---- one-line errors, before anything is written ------------------------------------------------

cli = CliRunner()


def _fake_search(out: Path, name: str, finished: bool) -> Path:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / "search.json").write_text("{}")
    (folder / "resume.json").write_text(json.dumps({"request": {"budget": "1%"}, "mlflow": {}}))
    if finished:
        (folder / "result.json").write_text("{}")
    return folder


def _one_line(res, code: int, text: str) -> None:
    assert res.exit_code == code, res.output
    assert text in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_existing_name_without_resume_is_a_one_line_error_and_nothing_is_overwritten(tmp_path):
    folder = _fake_search(tmp_path, "taken", finished=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = cli.invoke(app, ["search", "--name", "taken", "--output-dir", str(tmp_path), "--budget", "1%"])
    _one_line(res, 2, "search 'taken' already exists")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_an_output_dir_under_a_file_is_refused_before_mlflow(tmp_path, monkeypatch, where):
    """Was: every check passed, MLflow's parent run was made, then the folder failed (exit 1)."""
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    res = cli.invoke(app, ["search", "--name", "s", "--output-dir", str(tmp_path / where), "--budget", "1%"])
    _one_line(res, 2, f"error: search folder {str(tmp_path / where / 's')!r} cannot be created: "
                      f"{str(tmp_path / 'file')!r} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no mlflow.db, no folder


@pytest.mark.parametrize("argv,text", [
    (["resume", "nope"], "no search 'nope' to resume"),
    (["search", "--resume", "--name", "nope"], "no search 'nope' to resume"),
    (["search", "--resume"], "--resume needs the --name"),
    (["resume", "done"], "search 'done' already finished"),
    (["resume", "latest"], "search 'done' already finished"),  # latest, as status and export take it
])
def test_resume_errors_are_one_line(argv, text, tmp_path):
    _fake_search(tmp_path, "done", finished=True)
    res = cli.invoke(app, [*argv, "--output-dir", str(tmp_path)])
    _one_line(res, 2, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]


@pytest.mark.parametrize("name,content,text", [
    ("resume.json", "[1]", "resume.json: not a search's request"),
    ("resume.json", '{"request": {"budget": "1%"}, "mlflow": {}}', "resume.json: not a search's request"),
    ("resume.json", '{"request": "x", "mlflow": {"tracking_uri": "u", "parent_run_id": "p"}}', "not a search's request"),
    ("search.json", "[1, 2]", "search.json: not a JSON object"),
])
def test_resume_of_a_folder_whose_file_has_the_wrong_shape_is_one_line(tmp_path, name, content, text):
    """Valid JSON of the wrong shape (was: TypeError / AttributeError / KeyError, exit 1)."""
    folder = _fake_search(tmp_path, "s", finished=False)
    (folder / "resume.json").write_text(json.dumps({"request": {"budget": "1%", "task": "sst2"},
                                                    "mlflow": {"tracking_uri": "u", "parent_run_id": "p"}}))
    (folder / name).write_text(content)
    res = cli.invoke(app, ["resume", "s", "--output-dir", str(tmp_path)])
    _one_line(res, 2, text)


# ---- the state that makes a resume continue exactly -----------------------------------------------

def _tiny_searcher_factory(tmp_path):
    """A function making fresh TPE searchers (seed 5) over the tiny SPACE, alike in everything."""
    from autopeft.searching.searchers import SpaceSearcher, make_sampler
    from autopeft.searching.space import SearchSpace

    (tmp_path / "space.yaml").write_text(SPACE)
    space = SearchSpace.load(str(tmp_path / "space.yaml"))
    base = {"backbone": TINY_BERT, "task": "sst2", "training": {"max_train_examples": 64, "seed": 0}}
    return lambda: SpaceSearcher(space, base, 1500, make_sampler("tpe", 5, n_startup_trials=2), 64,
                                 space.start_points)


def test_searcher_state_round_trip_continues_the_same_proposals(tmp_path):
    searcher = _tiny_searcher_factory(tmp_path)
    a = searcher()
    for i in range(4):
        a.suggest(f"t{i}")
        a.on_trial_complete(f"t{i}", {"score": 0.5 + i / 10, "trainable_params": 100 * i, "peak_memory_bytes": 1e6,
                                      "examples_seen": 64})
    a.suggest("t4")  # live when saved: a resume re-creates it with the same point
    a.save(str(tmp_path / "searcher.pkl"))
    b = searcher()
    b.restore(str(tmp_path / "searcher.pkl"))
    assert b.suggest("t4") == a.suggest("t4")
    for s in (a, b):
        s.on_trial_complete("t4", {"score": 0.7, "trainable_params": 300, "peak_memory_bytes": 1e6, "examples_seen": 64})
    assert [b.suggest(f"u{i}") for i in range(3)] == [a.suggest(f"u{i}") for i in range(3)]
    assert b.told() == a.told()


def test_scheduler_state_round_trip_keeps_arrival_order_and_decisions(tmp_path):
    from autopeft.searching.scheduler import MultiObjectiveASHA

    a = MultiObjectiveASHA([16, 32, 64], reduction_factor=2)
    for tid, score in (("x", 0.6), ("y", 0.7), ("z", 0.6)):
        a.decide(tid, {"score": score, "trainable_params": 100, "peak_memory_bytes": 1e6, "examples_seen": 16})
    a.save(str(tmp_path / "sched.json"))
    b = MultiObjectiveASHA([16, 32, 64], reduction_factor=2)
    b.restore(str(tmp_path / "sched.json"))
    assert list(b.recorded[16]) == ["x", "y", "z"] and b.decisions == a.decisions
    report = {"score": 0.65, "trainable_params": 50, "peak_memory_bytes": 1e6, "examples_seen": 16}
    assert b.decide("w", report) == a.decide("w", report)
    with pytest.raises(ValueError, match="not milestones"):
        MultiObjectiveASHA([8, 64]).set_state(a.get_state())


def test_trials_running_at_the_checkpoint_are_created_again_under_their_ids(tmp_path):
    """Several trials at a time: those live when the checkpoint was written come back first, with
    their own ids and points, their rows dropped; then numbering goes on; num_samples still holds."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import ConcurrencyLimiter

    from autopeft.searching.resume import NumberedSearchGenerator, load_checkpoint, restore, save_checkpoint
    from autopeft.searching.scheduler import MultiObjectiveASHA
    from autopeft.searching.searchers import SpaceSearcher, make_sampler
    from autopeft.searching.space import SearchSpace
    from autopeft.searching.tune import TrialRecord

    (tmp_path / "space.yaml").write_text(SPACE)
    space = SearchSpace.load(str(tmp_path / "space.yaml"))
    base = {"backbone": TINY_BERT, "task": "sst2", "training": {"max_train_examples": 256, "seed": 0}}

    def fresh():
        searcher = SpaceSearcher(space, base, 1500, make_sampler("tpe", 1, n_startup_trials=2), 256, space.start_points)
        gen = NumberedSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=3))
        gen.add_configurations(Experiment("e", lambda config: None, num_samples=4, config={}))
        return searcher, gen, MultiObjectiveASHA([64, 128, 256], reduction_factor=2)

    searcher, gen, sched = fresh()
    first = [gen.next_trial() for _ in range(3)]
    assert [t.trial_id for t in first] == ["trial_0001", "trial_0002", "trial_0003"]
    top = {"score": 0.8, "trainable_params": 1024, "peak_memory_bytes": 1e6, "examples_seen": 256}
    gen.on_trial_complete("trial_0001", top)
    sched.decide("trial_0002", {**top, "examples_seen": 64})
    records = {t.trial_id: TrialRecord(t.trial_id, dict(t.config), status="running") for t in first}
    records["trial_0001"].status, records["trial_0001"].rows = "finished", [top]
    records["trial_0002"].rows = [{**top, "examples_seen": 64}]
    save_checkpoint(tmp_path, records, searcher, sched, gen, 12.5)

    searcher2, gen2, sched2 = fresh()
    records2: dict = {}
    assert restore(load_checkpoint(tmp_path), records2, searcher2, sched2, gen2) == 12.5
    assert gen2.reissue == ["trial_0002", "trial_0003"] and records2["trial_0002"].rows == []
    assert records2["trial_0001"].rows == [top] and list(sched2.recorded[64]) == ["trial_0002"]
    again = [gen2.next_trial() for _ in range(3)]
    assert [t.trial_id for t in again] == ["trial_0002", "trial_0003", "trial_0004"]
    assert [t.config for t in again[:2]] == [t.config for t in first[1:]]
    assert gen2.is_finished() and gen2.next_trial() is None  # 4 distinct trials, as asked


@pytest.mark.integration
def test_resumed_wall_time_counts_the_sessions_before_the_kill(runs):
    """result.json's wall_time_s = the killed session's running time (its checkpoint's clock,
    printed as "resumed after Ns") + the resumed session's own time."""
    before = int(re.search(r"resumed after (\d+)s", runs["resume_out"]).group(1))
    wall = json.loads((runs["killed"] / "result.json").read_text())["wall_time_s"]
    driver = json.loads((runs["killed"] / "driver.json").read_text())  # the resumed session's record
    assert before >= 2 and round(driver["elapsed_before_s"]) == before  # the first trial had finished
    session = driver["ended"] - driver["started"]  # the resumed search() call, start to end
    assert 1.0 < session <= runs["resume_s"]
    # not the session alone (that would be off by elapsed_before_s, at least 2 s); the tolerance is half
    # of that, so that under load the MLflow and file writes between the wall clock's reading and the
    # heartbeat's end (0.6-0.7 s measured on a loaded machine) do not fail it
    assert wall == pytest.approx(driver["elapsed_before_s"] + session, abs=driver["elapsed_before_s"] / 2)


def test_elapsed_before_is_the_checkpoint_clock(tmp_path):
    """What api.search adds to a resumed session's time: the checkpoint's elapsed_s, 0 without one."""
    from types import SimpleNamespace

    from autopeft.searching.resume import elapsed_before, save_checkpoint

    assert elapsed_before(tmp_path) == 0.0
    state = SimpleNamespace(get_state=lambda: {}, resume_state=lambda: {})
    assert save_checkpoint(tmp_path, {}, state, state, state, 42.5)
    assert elapsed_before(tmp_path) == 42.5
    (tmp_path / "checkpoint.pkl").write_bytes(b"truncated")
    from autopeft.searching.resume import ResumeError

    with pytest.raises(ResumeError, match="cannot read the resume state"):
        elapsed_before(tmp_path)


def test_a_space_changed_since_the_search_started_refuses_the_resume(tmp_path):
    """search.json recorded the space's name and path only: an edited YAML (or a shipped space changed
    by an upgrade) resumed silently with other dimensions. The space's fingerprint is now compared."""
    import yaml

    from autopeft.searching.resume import ResumeError, check_same_settings
    from autopeft.searching.space import SearchSpace

    data = yaml.safe_load(open(SearchSpace.load("default").source).read())
    same = SearchSpace.from_dict(data)
    assert same.fingerprint == SearchSpace.load("default").fingerprint and len(same.fingerprint) == 16
    data["start_points"][1]["training.learning_rate"] = 4.0e-3
    edited = SearchSpace.from_dict(data)
    assert edited.fingerprint != same.fingerprint
    assert SearchSpace.load("full").fingerprint != same.fingerprint

    settings = {"space": "default", "space_source": "/x/default.yaml", "space_fingerprint": same.fingerprint}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "search.json").write_text(json.dumps(settings))
    check_same_settings(tmp_path / "s", settings)
    with pytest.raises(ResumeError) as err:
        check_same_settings(tmp_path / "s", {**settings, "space_fingerprint": edited.fingerprint})
    assert str(err.value) == ("search 's': its search space /x/default.yaml changed since the search started (its "
                              "dimensions, values or start points); restore it to resume, or start a new search")
    # a folder written before fingerprints: resumed as before
    (tmp_path / "s" / "search.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "space_fingerprint"}))
    check_same_settings(tmp_path / "s", {**settings, "space_fingerprint": edited.fingerprint})


def test_a_search_started_before_the_rung_sample_resumes_as_it_started(tmp_path):
    """A search folder from before RUNG_EVAL_EXAMPLES (its training settings lack rung_eval_examples) is
    resumed scoring all of dev at every rung, as it started, and passes the settings check; one started
    with the sample keeps it; a user's explicit setting is kept (and the settings check then names it)."""
    from autopeft import api
    from autopeft.searching.resume import ResumeError, check_same_settings

    old = {"training": {"max_train_examples": 24000, "seed": 0}}
    (tmp_path / "search.json").write_text(json.dumps(old))
    base = {"max_train_examples": 24000, "seed": 0, "rung_eval_examples": api.RUNG_EVAL_EXAMPLES}
    api._as_started(base, tmp_path, {})
    assert base == old["training"]
    check_same_settings(tmp_path, old)
    new = {"training": {**old["training"], "rung_eval_examples": 500}}
    (tmp_path / "search.json").write_text(json.dumps(new))
    base = {**new["training"]}
    api._as_started(base, tmp_path, {})
    assert base == new["training"]
    base = {**new["training"], "rung_eval_examples": 300}  # a later version's default: the started one stands
    api._as_started(base, tmp_path, {})
    assert base == new["training"]
    (tmp_path / "search.json").write_text(json.dumps(old))
    base = {**old["training"], "rung_eval_examples": None}  # --rung-eval-examples all: how it started
    api._as_started(base, tmp_path, {"rung_eval_examples": None})
    assert base == old["training"]
    check_same_settings(tmp_path, old)
    base = {**old["training"], "rung_eval_examples": 200}
    api._as_started(base, tmp_path, {"rung_eval_examples": 200})
    assert base["rung_eval_examples"] == 200
    with pytest.raises(ResumeError, match="was started with training="):
        check_same_settings(tmp_path, {"training": base})


def test_a_searcher_state_saved_before_a_recipe_field_existed_still_finds_its_recipes(tmp_path):
    """The searcher's record of trained recipes is keyed by the recipe's JSON; a state saved by a version
    without a field added since (``training.rung_eval_examples``, ``training.backbone_dropout``) is read
    with that field's default filled in, so a resumed search answers the same point as a duplicate instead
    of training it again."""
    import copy

    from autopeft.searching.searchers import _key

    searcher = _tiny_searcher_factory(tmp_path)
    a = searcher()
    a.suggest("t0")
    state = a.get_state()
    [(key, origin)] = state["origins"].items()
    old = json.loads(key)
    for field in ("rung_eval_examples", "backbone_dropout"):
        old["training"].pop(field)
    old_state = copy.copy(state)
    old_state["origins"] = {_key(old): origin}
    b = searcher()
    b.set_state(old_state)
    assert b._origins == {key: tuple(origin)}


def test_todays_recipe_keys_are_left_as_they_are():
    """Re-reading a key through Recipe must not change a key today's searcher wrote (else every resumed
    search would retrain its points): the key of one recipe per method family, and of the default and full
    spaces' start points, is a fixed point."""
    from autopeft.composition.recipe import RecipeError, recipe_from_dict
    from autopeft.methods.base import available_methods
    from autopeft.searching.searchers import _current_recipe_key, _key
    from autopeft.searching.space import SearchSpace

    recipes = []
    for name in available_methods():
        try:
            recipes.append(recipe_from_dict({"backbone": TINY_BERT, "components": [{"method": name}],
                                             "training": {"seed": 1, "rung_eval_examples": 500}}))
        except RecipeError:  # a method that needs arguments (AdapterFusion's adapters)
            continue
    base = {"backbone": "minilm-l6", "task": "sst2", "training": {"seed": 0}}
    for space in (SearchSpace.load("default"), SearchSpace.load("full")):
        recipes += [space.to_recipe(space.complete_point(p), base) for p in space.start_points]
    assert len(recipes) >= 12
    for r in recipes:
        key = _key(r.model_dump(mode="json"))
        assert _current_recipe_key(key) == key, key
