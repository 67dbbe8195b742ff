"""Live progress (files written by the trial, polled by the driver) and ``autopeft status``."""

import io
import json
import time

import pytest
from typer.testing import CliRunner

from autopeft.searching.progress import LiveProgress, TrialProgressWriter, current_rung, progress_file, read_progress
from autopeft.status import STALE_AFTER_S, SearchFolderError, format_status, search_status
from tests.conftest import TINY_BERT


@pytest.fixture
def tiny_glue(tmp_path, monkeypatch):
    """``<dir>/sst2/{train,validation}.tsv``; token cache kept in tmp."""
    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path / "token-cache"))
    root = tmp_path / "glue"
    (root / "sst2").mkdir(parents=True)
    for split, n in (("train", 96), ("validation", 32)):
        rows = ["sentence\tlabel"] + [f"the film was {'good' if i % 2 else 'bad'} number {i}\t{i % 2}" for i in range(n)]
        (root / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(root)


def test_current_rung_is_the_rung_being_trained_towards():
    rungs = [352, 1024, 3000]
    assert [current_rung(n, rungs) for n in (0, 32, 352, 353, 1024, 2999, 3000)] == [0, 0, 0, 1, 1, 2, 2]


def test_writer_throttles_but_always_writes_rung_boundaries(tmp_path):
    path = progress_file(tmp_path, "t1")
    w = TrialProgressWriter(path, "t1", [64, 128], interval_s=3600)
    w(32, 0.9)
    assert read_progress(tmp_path)["t1"]["examples_seen"] == 32  # the first step is written
    w(48, 0.8)
    assert read_progress(tmp_path)["t1"]["examples_seen"] == 32  # within the interval: skipped
    w(64, 0.7)
    s = read_progress(tmp_path)["t1"]
    assert (s["examples_seen"], s["rung"], s["loss"], s["top"]) == (64, 0, 0.7, 128)
    w(96, 0.6)  # first step of the next rung
    assert read_progress(tmp_path)["t1"]["rung"] == 1
    assert [f.name for f in path.parent.iterdir()] == ["t1.json"]  # no temporary file left behind


def test_writer_never_fails_the_trial(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    w = TrialProgressWriter(blocker / "progress" / "t.json", "t", [10])  # parent is a file: OSError
    w(5, 1.0)
    assert w.enabled is False


def test_read_progress_skips_half_written_files(tmp_path):
    (tmp_path / "progress").mkdir()
    (tmp_path / "progress" / "bad.json").write_text('{"examples_se')
    TrialProgressWriter(progress_file(tmp_path, "ok"), "ok", [10])(5, 0.5)
    assert list(read_progress(tmp_path)) == ["ok"]


def test_search_folder_files_are_replaced_whole_never_half_written(tmp_path):
    """``autopeft status`` reads trials.json while the search rewrites it: a plain write_text let it read
    half a file (``cannot read trials.json``). Every search-folder JSON goes through ``write_json``."""
    import re
    from pathlib import Path

    from autopeft.searching.runs import write_json

    path = tmp_path / "trials.json"
    write_json(path, [{"trial_id": "trial_0000", "score": 0.5}])
    loop: list = []
    loop.append(loop)  # not JSON: the write fails before anything replaces the file
    with pytest.raises(ValueError, match="Circular reference"):
        write_json(path, loop)
    assert json.loads(path.read_text()) == [{"trial_id": "trial_0000", "score": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.json"]  # no temporary file left
    # the kind: no module that writes a search folder writes JSON any other way
    root = Path(__file__).resolve().parents[1] / "autopeft"
    writers = [root / "api.py", *(f for f in sorted((root / "searching").glob("*.py")) if f.name != "runs.py")]
    plain = [f"{f.name}:{i}" for f in writers for i, line in enumerate(f.read_text().splitlines(), 1)
             if re.search(r"write_text\(json\.dumps", line)]
    assert plain == [], plain


def test_run_trial_reports_only_at_rungs_and_steps_leave_scores_unchanged(tmp_path, tiny_glue):
    """Live progress adds no Tune report: the scheduler and searcher see the same rung rows."""
    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.training.trainer import run_trial

    recipe = recipe_from_dict({"backbone": {**TINY_BERT, "vocab_size": 30522, "max_position_embeddings": 128},
                               "task": "sst2", "components": [{"method": "lora", "r": 2}],
                               "training": {"max_train_examples": 96, "batch_size": 16, "max_seq_length": 32,
                                            "seed": 0}})
    plain, steps = [], []
    run_trial(recipe, tiny_glue, [32, 64, 96], report=plain.append, device="cpu")
    with_progress = []
    writer = TrialProgressWriter(progress_file(tmp_path, "t"), "t", [32, 64, 96], interval_s=0)
    run_trial(recipe, tiny_glue, [32, 64, 96], report=with_progress.append, device="cpu",
              on_step=lambda seen, loss, secs: (steps.append((seen, loss)), writer(seen, loss, secs)))
    assert [r["examples_seen"] for r in with_progress] == [32, 64, 96]
    assert [r["score"] for r in with_progress] == [r["score"] for r in plain]
    assert [s for s, _ in steps] == list(range(16, 97, 16))  # every optimiser step
    last = read_progress(tmp_path)["t"]
    assert last["examples_seen"] == 96
    # training seconds so far: at the last step, all the training the last row counts (evaluation excluded)
    assert 0 < last["train_time_s"] <= with_progress[-1]["train_time_s"] + 1e-9
    assert last["train_time_s"] > 0.9 * with_progress[-1]["train_time_s"]


def test_a_trial_cut_by_the_time_budget_counts_its_training_past_the_last_rung():
    """The default run's last trial, cut by the 26-minute cap 90 s after its rung at 8,064 examples, was
    counted as time outside training (result.json said 21.1% outside, about 15.5% in truth)."""
    from autopeft.api import time_breakdown

    trials = [{"trial_id": "a", "rows": [{"train_time_s": 100.0, "eval_time_s": 5.0, "setup_time_s": 1.0}], "cut": None},
              {"trial_id": "b", "rows": [{"train_time_s": 79.0, "eval_time_s": 4.0, "setup_time_s": 1.0}],
               "cut": {"examples_seen": 20_000, "train_time_s": 169.0}},
              {"trial_id": "c", "rows": [], "cut": {"examples_seen": 512, "train_time_s": 6.0}},  # cut before a rung
              {"trial_id": "d", "rows": []}]
    out = time_breakdown(trials, {"tune_s": 300.0}, 300.0)
    assert out["training_s"] == 100.0 + 169.0 + 6.0 and out["trial_eval_s"] == 9.0
    assert out["outside_training_share"] == pytest.approx(1 - 275.0 / 300.0)


def _folder(tmp_path, result=False, progress=True):
    folder = tmp_path / "autopeft_runs" / "s1"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"task": "sst2", "budget": "0.5%", "param_limit": 100_000,
                                                    "searcher": "tpe", "trials": 6, "rungs": [352, 1024, 3000]}))
    rows = lambda *pts: [{"examples_seen": e, "score": s, "trainable_params": p} for e, s, p in pts]  # noqa: E731
    trials = [
        {"trial_id": "a", "status": "finished", "rows": rows((352, 0.70, 50_000), (1024, 0.78, 50_000), (3000, 0.81, 50_000))},
        {"trial_id": "b", "status": "finished", "rows": rows((352, 0.72, 90_000), (1024, 0.80, 90_000), (3000, 0.84, 90_000))},
        {"trial_id": "c", "status": "stopped_early", "rows": rows((352, 0.90, 20_000))},
        {"trial_id": "r1", "status": "over_budget", "rows": []},
        {"trial_id": "d", "status": "running", "rows": rows((352, 0.75, 30_000))},
    ]
    (folder / "trials.json").write_text(json.dumps(trials))
    if progress:
        TrialProgressWriter(progress_file(folder, "d"), "d", [352, 1024, 3000])(640, 0.4321)
    if result:
        (folder / "result.json").write_text(json.dumps({"wall_time_s": 125.0}))
    return folder


def test_status_of_a_running_search(tmp_path):
    st = search_status(_folder(tmp_path))
    assert st.state == "running"
    assert st.counts == {"finished": 2, "stopped_early": 1, "over_budget": 1, "running": 1}
    assert st.best == {"trial_id": "b", "score": 0.84, "trainable_params": 90_000}
    assert st.best_any_rung["trial_id"] == "c" and st.best_any_rung["score"] == 0.90
    [r] = st.running
    assert (r["trial_id"], r["examples_seen"], r["top"], r["rung"], r["rungs"], r["loss"]) == ("d", 640, 3000, 2, 3, 0.4321)
    lines = format_status(st)
    assert lines[1] == "trials: 5 (2 finished, 1 over_budget, 1 running, 1 stopped_early)"
    # the task's metric by name (was always "score=": search.json holds the task, not the metric)
    assert lines[2] == "best at the top fidelity: trial b accuracy=0.8400 (90,000 trainable parameters)"
    for task, metric in (("stsb", "pearson"), ("cola", "mcc"), ("no-such-task", "score"), (None, "score"), (5, "score"),
                         (["x"], "score"), ({"name": "x", "source": "a.csv"}, "score")):
        st.settings["task"] = task
        assert format_status(st)[2].startswith(f"best at the top fidelity: trial b {metric}=0.8400"), task
    assert lines[3].startswith("running: trial d 640/3,000 examples, rung 2/3, loss 0.4321, updated ")


def test_status_of_a_finished_and_of_a_stopped_search(tmp_path):
    st = search_status(_folder(tmp_path, result=True))
    assert (st.state, st.elapsed_s, st.running) == ("finished", 125.0, [])
    st = search_status(_folder(tmp_path / "x", progress=False), now=time.time() + STALE_AFTER_S + 1)
    assert st.state == "stopped"
    assert st.running == [{"trial_id": "d", "examples_seen": 0, "top": 3000, "rung": None, "rungs": 3, "loss": None,
                           "age_s": None}]


def test_status_counts_what_the_files_say_and_no_more(tmp_path):
    """A finished search with no trials said "0 (none yet)", and a record without a status counted as running."""
    folder = _folder(tmp_path, result=True)
    (folder / "trials.json").unlink()
    assert format_status(search_status(folder))[1] == "trials: 0 (none)"
    (folder / "result.json").unlink()
    assert format_status(search_status(folder))[1] == "trials: 0 (none yet)"  # still running: none yet
    (folder / "trials.json").write_text(json.dumps([{"trial_id": "a", "rows": []}, {"trial_id": "b", "status": "finished"}]))
    st = search_status(folder)
    assert st.counts == {"without a status": 1, "finished": 1} and [r["trial_id"] for r in st.running] == ["d"]


def test_status_budget_excludes_a_larger_trial_from_best(tmp_path):
    folder = _folder(tmp_path)
    settings = json.loads((folder / "search.json").read_text())
    (folder / "search.json").write_text(json.dumps({**settings, "param_limit": 60_000}))
    assert search_status(folder).best["trial_id"] == "a"


def test_status_cli(tmp_path, monkeypatch):
    from autopeft.cli import app

    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["status", "s1"])
    assert out.exit_code == 0, out.output
    assert "search s1: running" in out.output and "best at the top fidelity: trial b accuracy=0.8400" in out.output
    out = CliRunner().invoke(app, ["status", "latest", "--json"])
    assert json.loads(out.output)["counts"]["finished"] == 2
    out = CliRunner().invoke(app, ["status", "nope"])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "error: no search 'nope'" in out.output
    with pytest.raises(SearchFolderError):
        search_status(tmp_path)
    monkeypatch.chdir(tmp_path / "autopeft_runs" / "s1")  # from elsewhere: --output-dir names the parent
    out = CliRunner().invoke(app, ["status", "s1", "--output-dir", str(tmp_path / "autopeft_runs"), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["counts"]["finished"] == 2, out.output


@pytest.mark.parametrize("name,content,shape", [("trials.json", '{"a": 1}', "a list of records (JSON objects)"),
                                                 ("trials.json", '["x", 3, null]', "a list of records (JSON objects)"),
                                                 ("trials.json", "null", "a list of records (JSON objects)"),
                                                 ("search.json", "[1, 2]", "a JSON object"),
                                                 ("result.json", '"done"', "a JSON object")])
def test_status_of_a_folder_whose_file_has_the_wrong_shape_is_one_line(tmp_path, monkeypatch, name, content, shape):
    """Valid JSON of the wrong shape (was: exit 1, ``AttributeError: 'str' object has no attribute 'get'``)."""
    from autopeft.cli import app

    folder = _folder(tmp_path)
    (folder / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["status", "s1"])
    assert out.exit_code == 2 and out.output == f"error: cannot read autopeft_runs/s1/{name}: not {shape}\n", out.output


def test_live_progress_adds_updates_and_drops_bars(tmp_path):
    from rich.console import Console
    from rich.progress import Progress

    bars, tasks = Progress(console=Console(file=io.StringIO())), {}
    w = TrialProgressWriter(progress_file(tmp_path, "t1"), "t1", [100, 300], interval_s=0)
    w(50, 0.9)
    LiveProgress.refresh(bars, tasks, tmp_path)
    t = bars.tasks[0]
    assert (t.description, t.completed, t.total, t.fields["rung"], t.fields["loss"]) == \
        ("trial t1", 50, 300, "rung 1/2 (100)", "0.9000")
    w(200, 0.5)
    LiveProgress.refresh(bars, tasks, tmp_path)
    assert (bars.tasks[0].completed, bars.tasks[0].fields["rung"]) == (200, "rung 2/2 (300)")
    progress_file(tmp_path, "t1").unlink()  # the driver deletes it when the trial ends
    LiveProgress.refresh(bars, tasks, tmp_path)
    assert bars.tasks == [] and tasks == {}


def test_quiet_search_passes_no_progress(monkeypatch, tmp_path):
    from autopeft import api
    from autopeft.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def fake_search(**kw):
        seen["progress"] = kw["progress"]
        raise Stop

    monkeypatch.setattr(api, "search", fake_search)
    monkeypatch.setenv("AUTOPEFT_DEBUG", "1")
    CliRunner().invoke(app, ["search", "--quiet"])
    assert seen["progress"] is None
    CliRunner().invoke(app, ["search"])
    assert callable(seen["progress"])  # lines (no terminal here: no live bars)


def test_live_progress_survives_pickling_by_ray_tune():
    """Tuner pickles the searcher, whose callbacks reach the progress object (its console holds locks)."""
    import pickle

    from ray import cloudpickle
    from rich.console import Console

    lp = LiveProgress(Console(file=io.StringIO()), poll_s=0.25)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(lp))
        assert copy.poll_s == 0.25 and isinstance(copy.console, Console) and copy.console is not lp.console


# ---- is the driver alive? (driver.json, autopeft.searching.liveness) ----------------------------------------

def _driver(folder, **fields):
    import os
    import socket

    import psutil

    info = {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "hostname": socket.gethostname(),
            "started": time.time() - 30, "elapsed_before_s": 0.0, "heartbeat": time.time(), "ended": None, **fields}
    (folder / "driver.json").write_text(json.dumps(info))


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_running_while_the_driver_lives_interrupted_once_it_is_gone(tmp_path):
    import socket

    from autopeft.searching.liveness import HEARTBEAT_STALE_S

    folder = _folder(tmp_path)
    now = time.time()
    # this test's own process, alive: running; elapsed counts the earlier sessions (a resume) too
    _driver(folder, started=now - 30, elapsed_before_s=60.0)
    st = search_status(folder, now=now)
    assert st.state == "running" and st.elapsed_s == pytest.approx(90.0)
    assert format_status(st)[0].startswith("search s1: running, 1.5 min;")
    # a dead pid with a fresh heartbeat: the pid decides on its own host
    _driver(folder, pid=_dead_pid(), started=now - 30, heartbeat=now - 6)
    st = search_status(folder, now=now)
    assert st.state == "interrupted" and st.elapsed_s == pytest.approx(24.0)  # until its last heartbeat
    assert format_status(st)[0].startswith(
        "search s1: interrupted (the driver is gone; continue with `autopeft resume s1`), 0.4 min;")
    # a live pid that is another process (pid reused: other start time): interrupted
    _driver(folder, create_time=now - 3600)
    assert search_status(folder, now=now).state == "interrupted"
    # a driver that raised and recorded its end (its process, e.g. a notebook, lives on): interrupted
    _driver(folder, ended=now - 1)
    assert search_status(folder, now=now).state == "interrupted"
    # on another host: only the heartbeat can tell
    other = socket.gethostname() + "-elsewhere"
    _driver(folder, hostname=other, pid=_dead_pid(), heartbeat=now - 10)
    assert search_status(folder, now=now).state == "running"
    _driver(folder, hostname=other, heartbeat=now - HEARTBEAT_STALE_S - 1)
    assert search_status(folder, now=now).state == "interrupted"


def test_status_of_a_finished_search_ignores_the_driver(tmp_path):
    folder = _folder(tmp_path, result=True)
    _driver(folder)  # alive (this process)
    assert (search_status(folder).state, search_status(folder).elapsed_s) == ("finished", 125.0)
    _driver(folder, pid=_dead_pid())
    assert search_status(folder).state == "finished"


def test_driver_beacon_heartbeats_and_records_its_end(tmp_path):
    from autopeft.searching.liveness import DriverBeacon, read_driver

    folder = _folder(tmp_path)
    beacon = DriverBeacon(folder, elapsed_before_s=12.0, interval_s=0.05).start()
    try:
        first = read_driver(folder)["heartbeat"]
        deadline = time.time() + 5
        while read_driver(folder)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_driver(folder)["heartbeat"] > first  # refreshed by the thread
        assert search_status(folder).state == "running"
    finally:
        beacon.stop()
    info = read_driver(folder)
    assert info["ended"] is not None and info["elapsed_before_s"] == 12.0
    assert search_status(folder).state == "interrupted"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_status_after_the_driver_is_killed(tmp_path, sig):
    """kill -9 (or timeout's SIGTERM) of a process holding a DriverBeacon: running, then interrupted."""
    import signal
    import subprocess
    import sys

    folder = _folder(tmp_path)
    code = ("import sys, time; from autopeft.searching.liveness import DriverBeacon; "
            "DriverBeacon(sys.argv[1], interval_s=0.1).start(); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert search_status(folder).state == "running"
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=10)
        assert search_status(folder).state == "interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_the_time_budget_cuts_a_running_trial_and_records_how_far_it_trained(tiny_glue, tmp_path):
    """``time_budget_s`` (``--time-budget``) end to end: a trial far from its top fidelity when the cap
    comes is recorded ``stopped_early`` with where its progress file left it (``cut``), and result.json
    counts that training."""
    import ray

    import autopeft

    space = tmp_path / "space.yaml"
    space.write_text("name: cut\nfidelity: {max_train_examples: 1000000, min_train_examples: 64, reduction_factor: 8}\n"
                     "components:\n  lora: {enabled: true, r: 2, target_modules: [[query, value]]}\n"
                     "training: {batch_size: 16, max_seq_length: 24, learning_rate: 1.0e-3}\n")
    t0 = time.time()
    result = autopeft.search(task="sst2", budget="100%", backbone={**TINY_BERT, "vocab_size": 30522,
                                                                   "max_position_embeddings": 128},
                             space=str(space), trials=1, time_budget_s=40, data_dir=tiny_glue, name="cut",
                             output_dir=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=None)
    ray.shutdown()
    assert time.time() - t0 < 120
    [trial] = result.trials
    assert trial["status"] == "stopped_early" and trial["rows"], trial
    cut, last = trial["cut"], trial["rows"][-1]
    assert last["examples_seen"] < cut["examples_seen"] < 1_000_000
    assert cut["train_time_s"] > last["train_time_s"]
    time_s = json.loads((tmp_path / "cut" / "result.json").read_text())["time_s"]
    assert time_s["training_s"] == pytest.approx(cut["train_time_s"])
    assert json.loads((tmp_path / "cut" / "trials.json").read_text())[0]["cut"] == cut
