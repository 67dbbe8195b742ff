"""Ctrl-C and SIGTERM stop a search resumably (issue 14, case 4; mlflow/mlflow#1832, PR#4200).

Ray Tune's own SIGINT handler ended ``Tuner.fit`` as if the search were done: exit 0, the running
trial recorded ``stopped_early`` with no rows (as if MO-ASHA had stopped it), its MLflow run left
``RUNNING``, ``result.json`` written, so ``autopeft resume`` answered "already finished"; SIGTERM
killed the driver outright. Now, for SIGINT to the process group (a terminal's Ctrl-C) or to the
driver alone, SIGTERM, and a second Ctrl-C during shut-down: exit 128 + signal (130 for SIGINT), the
running trial recorded ``interrupted``, no MLflow run left ``RUNNING`` (the trial's ``KILLED``, the
parent tagged interrupted), no ``result.json``; and ``autopeft resume`` ends with what the search
run without interruption gives (same seed, one trial at a time).

Same tiny search as tests/test_resume.py, driven through the CLI's error mapping (``cli._run``).
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autopeft.cli import app
from test_resume import RUNNER, _args, _children_view, _comparable, _data, _env, _mlflow, _stop_group

#: ``autopeft search`` as the CLI runs it: the API call inside ``cli._run`` (exit codes, one-line
#: messages), with the tiny backbone and evaluation size the command line cannot express.
CLI_RUNNER = """
import json, sys, typer
from autopeft.api import search
from autopeft.cli import _run
try:
    _run(search, **json.loads(sys.argv[1]), progress=print)
except typer.Exit as exc:
    sys.exit(exc.exit_code)
"""


def _db(args: dict) -> str:
    return args["tracking_uri"].removeprefix("sqlite:///")


def _query(args: dict, sql: str) -> list:
    try:
        with sqlite3.connect(f"file:{_db(args)}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _scored(args: dict, trial_id: str) -> bool:
    """``trial_id`` runs and has reported its first rung (a score in MLflow): the interruption lands
    mid-trial, with MO-ASHA and MLflow holding some of its results."""
    return bool(_query(args, "SELECT 1 FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid JOIN metrics m "
                             "ON m.run_uuid = r.run_uuid WHERE r.status = 'RUNNING' AND t.key = 'trial_id' "
                             f"AND t.value = '{trial_id}' AND m.key = 'score'"))


#: A local Ray that cannot start within its 30 s (a machine loaded by other work): that run is
#: started again, as `autopeft resume` (its folder exists), at most this many times.
RAY_START_RETRIES = 2
RESUME = [sys.executable, "-c", "from autopeft.cli import main; main()", "resume"]


def _ray_did_not_start(rc: int, output: str) -> bool:
    return rc == 2 and "error: cannot start Ray" in output


def _resume_to_end(tmp: Path, name: str, resumes: dict) -> subprocess.CompletedProcess:
    """``autopeft resume name`` to its end (again when a loaded machine kept Ray from starting)."""
    for _ in range(RAY_START_RETRIES + 1):
        resumes[name] = resumes.get(name, 0) + 1
        res = subprocess.run([*RESUME, name, "--output-dir", str(tmp / "runs")], env=_env(tmp), capture_output=True,
                             text=True, timeout=900)
        if not _ray_did_not_start(res.returncode, res.stdout + res.stderr):
            return res
    return res


def _interrupt(tmp: Path, glue: Path, name: str, how: str, trial: str, resumes: dict, resume: bool = False) -> dict:
    """Run the search ``name`` (``resume``: continue it with ``autopeft resume``) and stop it as
    ``how`` says once ``trial`` has scored a rung: ``group`` (SIGINT to the process group),
    ``alone`` (SIGINT to the driver), ``term`` (SIGTERM to the driver), ``double`` (SIGINT to the
    group, and again once the shut-down has begun). Returns what the search left behind;
    ``resumes[name]`` counts the resumes (the parent run's ``autopeft.resumes``)."""
    args = _args(tmp, glue, name)
    log = tmp / f"{name}-{how}.out"
    for attempt in range(RAY_START_RETRIES + 1):
        if resume or attempt:
            resumes[name] = resumes.get(name, 0) + 1
        cmd = ([*RESUME, name, "--output-dir", str(tmp / "runs")] if resume or attempt
               else [sys.executable, "-c", CLI_RUNNER, json.dumps(args)])
        proc, sent = _run_and_stop(cmd, tmp, args, log, how, trial)
        if sent or not _ray_did_not_start(proc.returncode, log.read_text()):
            break
    folder = tmp / "runs" / name
    parents, children, _ = _mlflow(args["tracking_uri"], name)
    from autopeft.searching.resume import ResumeError, load_checkpoint, open_search_folder
    from autopeft.status import search_status

    try:
        resumable = open_search_folder(folder, resume=True) is not None
    except ResumeError as exc:  # e.g. "already finished"
        resumable = str(exc)
    return {"args": args, "folder": folder, "trial": trial, "sent": sent, "returncode": proc.returncode,
            "output": log.read_text(), "trials": json.loads((folder / "trials.json").read_text()),
            "finished": (folder / "result.json").exists(), "state": search_status(folder).state,
            "parents": parents, "children": children, "resumable": resumable, "checkpoint": load_checkpoint(folder),
            "running_runs": _query(args, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")}


def _run_and_stop(cmd: list, tmp: Path, args: dict, log: Path, how: str, trial: str):
    """Start ``cmd`` in its own process group and send the signals of ``how`` (see :func:`_interrupt`)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(tmp), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sent = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not sent:
            if _scored(args, trial):
                sig = signal.SIGTERM if how == "term" else signal.SIGINT
                (os.killpg if how in ("group", "double") else os.kill)(proc.pid, sig)
                sent.append(sig)
            time.sleep(0.1)
        while how == "double" and proc.poll() is None and len(sent) < 2 and time.time() < deadline:
            if f"interrupted by SIGINT: {trial} running" in log.read_text():  # recorded; Ray shuts down
                os.killpg(proc.pid, signal.SIGINT)
                sent.append(signal.SIGINT)
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        _stop_group(proc)
    return proc, sent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One search stopped four times (a Ctrl-C to its process group in trial_0002; then, each time
    after `autopeft resume`, in trial_0003: SIGINT to the driver alone, SIGTERM, a Ctrl-C and a second
    one during the shut-down), then resumed to its end; the uninterrupted reference runs beside the
    first stop."""
    tmp = tmp_path_factory.mktemp("interrupt")
    glue = _data(tmp)
    env = _env(tmp)
    resumes: dict = {}

    def reference() -> subprocess.CompletedProcess:
        ref = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(_args(tmp, glue, "whole"))], env=env,
                             capture_output=True, text=True, timeout=900)
        if ref.returncode and "cannot start Ray" in ref.stdout + ref.stderr:  # a loaded machine
            return _resume_to_end(tmp, "whole", resumes)
        return ref

    out: dict = {}
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(reference)
        out["group"] = _interrupt(tmp, glue, "a", "group", "trial_0002", resumes)
        for how in ("alone", "term", "double"):
            out[how] = _interrupt(tmp, glue, "a", how, "trial_0003", resumes, resume=True)
        ref = whole.result()
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    res = _resume_to_end(tmp, "a", resumes)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out.update(tmp=tmp, resume_out=res.stdout, whole=tmp / "runs" / "whole", resumes=resumes["a"],
               uri_whole=_args(tmp, glue, "whole")["tracking_uri"])
    return out


#: The signal of each stop, in the order they stop search ``a``.
CASES = {"group": signal.SIGINT, "alone": signal.SIGINT, "term": signal.SIGTERM, "double": signal.SIGINT}


@pytest.mark.integration
@pytest.mark.parametrize("how", list(CASES))
def test_a_stopped_search_exits_with_the_signal_and_one_line(runs, how):
    r, sig, name = runs[how], CASES[how], "a"
    assert r["sent"] == [sig] * (2 if how == "double" else 1)
    assert r["returncode"] == 128 + sig, r["output"][-3000:]  # 130 for SIGINT (was 0), 143 for SIGTERM (was -15)
    last = r["output"].strip().splitlines()[-1]
    assert last == (f"interrupted by {sig.name}: search {name} saved; continue it with "
                    f"`autopeft resume {name} --output-dir {r['folder'].parent}`"), r["output"][-2000:]
    assert "Traceback" not in r["output"]


@pytest.mark.integration
@pytest.mark.parametrize("how", list(CASES))
def test_the_running_trial_is_recorded_interrupted_and_the_search_is_resumable(runs, how):
    r = runs[how]
    whole = {t["trial_id"]: t["status"] for t in json.loads((runs["whole"] / "trials.json").read_text())}
    cut = r["trial"]
    status = {t["trial_id"]: t["status"] for t in r["trials"] if t["trial_id"].startswith("trial_")}
    # was: stopped_early with no rows, as if MO-ASHA had stopped it; the trials before it as in the reference
    assert status == {**{t: whole[t] for t in status if t < cut}, cut: "interrupted"}
    assert list(status) == [f"trial_{i:04d}" for i in range(1, int(cut[-1]) + 1)]
    assert next(t for t in r["trials"] if t["trial_id"] == cut)["rows"][0]["examples_seen"] == 64  # mid-trial
    assert not r["finished"] and r["state"] == "interrupted"  # no result.json; `autopeft status` agrees
    assert r["resumable"] is True  # was: "search ... already finished"
    saved = r["checkpoint"]
    assert saved["records"][cut].status == "interrupted" and saved["generator"]["next_number"] == int(cut[-1]) + 1
    assert cut in saved["searcher"]["live"]  # its sampler trial still open: re-run with its point


@pytest.mark.integration
@pytest.mark.parametrize("how", list(CASES))
def test_no_mlflow_run_is_left_running(runs, how):
    r, sig = runs[how], CASES[how]
    assert r["running_runs"] == []  # was: the interrupted trial's run RUNNING
    (parent,) = r["parents"]
    assert (parent.info.status, parent.data.tags["status"]) == ("KILLED", "interrupted")
    assert parent.data.tags["interrupted"].startswith(sig.name)
    runs_by_trial = {c.data.tags["trial_id"]: c for c in r["children"]}  # active runs
    cut = runs_by_trial[r["trial"]]
    assert (cut.info.status, cut.data.tags["status"]) == ("KILLED", "interrupted")
    assert all(c.info.status in ("FINISHED", "FAILED") for t, c in runs_by_trial.items() if t != r["trial"])


@pytest.mark.integration
def test_resume_ends_as_the_uninterrupted_search(runs):
    """Search a, stopped four times and resumed to its end, equals the search never interrupted."""
    folder = runs["group"]["folder"]
    whole = json.loads((runs["whole"] / "trials.json").read_text())
    resumed = json.loads((folder / "trials.json").read_text())
    assert [t["trial_id"] for t in resumed] == [t["trial_id"] for t in whole]
    assert _comparable(resumed) == _comparable(whole)
    front = [[(r["trial_id"], r["score"], r["trainable_params"]) for r in json.loads((f / "pareto.json").read_text())]
             for f in (folder, runs["whole"])]
    assert front[0] == front[1] and front[0]
    assert json.loads((folder / "result.json").read_text())["hypervolume"] == \
        json.loads((runs["whole"] / "result.json").read_text())["hypervolume"]
    p_whole, c_whole, client_whole = _mlflow(runs["uri_whole"], "whole")
    uri = runs["group"]["args"]["tracking_uri"]
    p_res, c_res, client_res = _mlflow(uri, "a")
    assert p_res[0].info.run_id == runs["group"]["parents"][0].info.run_id  # one parent run throughout
    assert (p_res[0].info.status, p_res[0].data.tags["status"]) == ("FINISHED", "finished")
    assert "interrupted" not in p_res[0].data.tags and p_res[0].data.tags["autopeft.resumes"] == str(runs["resumes"])
    assert p_res[0].data.params == p_whole[0].data.params
    assert _children_view(c_res, client_res) == _children_view(c_whole, client_whole)  # one run per trial
    from mlflow.tracking import MlflowClient

    for how in CASES:  # the interrupted runs: KILLED, replaced by the re-runs
        old = next(c for c in runs[how]["children"] if c.data.tags["trial_id"] == runs[how]["trial"])
        old = MlflowClient(uri).get_run(old.info.run_id)
        assert (old.info.status, old.info.lifecycle_stage) == ("KILLED", "deleted")


def test_the_cli_maps_an_interrupted_search_to_128_plus_the_signal(monkeypatch, tmp_path):
    from autopeft import api
    from autopeft.searching.interrupt import SearchInterrupted

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def stopped(**kw):
            raise SearchInterrupted(sig, tmp_path / "autopeft_runs" / "s1", recorded=True)

        monkeypatch.setattr(api, "search", stopped)
        res = CliRunner().invoke(app, ["search", "--name", "s1"])
        assert res.exit_code == code
        assert res.output.strip() == (f"interrupted by {sig.name}: search s1 saved; continue it with "
                                      "`autopeft resume s1`")


#: ``autopeft search`` as the console script runs it (:func:`autopeft.cli.main`), its search
#: interrupted and saved, in a process whose exit is slow (an exit hook, as Ray's shut-down): prints
#: ``hook`` once the exit hooks run.
SLOW_EXIT = """
import atexit, sys, time
from pathlib import Path
atexit.register(lambda: (print("hook", flush=True), time.sleep(60)))
from autopeft import api, cli
from autopeft.searching.interrupt import SearchInterrupted
signum, folder = int(sys.argv[1]), Path(sys.argv[2])
def stopped(**kw):
    raise SearchInterrupted(signum, folder, recorded=True)
api.search = stopped
sys.argv = ["autopeft", "search", "--name", "s1"]
cli.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_an_interrupted_search_exits_ends_it_with_the_code_and_no_traceback(tmp_path, sig):
    """A second Ctrl-C that landed in Ray's exit hook printed a KeyboardInterrupt traceback and the
    process died of SIGSEGV (exit -11; seen in the ``double`` case above on a loaded machine)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXIT, str(int(sig)), str(tmp_path / "runs" / "s1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    first = proc.stdout.readline().strip()
    assert first == f"interrupted by {sig.name}: search s1 saved; continue it with `autopeft resume s1 --output-dir " \
                    f"{tmp_path / 'runs'}`"
    assert proc.stdout.readline().strip() == "hook"  # exiting: Ray's shut-down would run now
    t0 = time.time()
    proc.send_signal(sig)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 128 + sig and time.time() - t0 < 20
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out


def test_the_cli_inside_another_program_leaves_its_signal_handlers_alone(monkeypatch, tmp_path):
    """Only the console script changes how the process answers signals while it exits: a program
    that runs the CLI's ``app`` in its own process (here CliRunner) keeps its handlers."""
    from autopeft import api
    from autopeft.searching.interrupt import SearchInterrupted

    def stopped(**kw):
        raise SearchInterrupted(signal.SIGINT, tmp_path / "autopeft_runs" / "s1", recorded=True)

    monkeypatch.setattr(api, "search", stopped)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert CliRunner().invoke(app, ["search", "--name", "s1"]).exit_code == 130
    assert {s: signal.getsignal(s) for s in before} == before


def test_starting_ray_keeps_the_callers_sigterm_handler():
    """ray.init put its own SIGTERM handler (sys.exit(15)) in place of the search's: a SIGTERM outside
    Tune's loop (the resume step, the results) exited 15 instead of being recorded, 143."""
    code = ("import signal, ray\n"
            "from autopeft.searching.tune import start_ray\n"
            "def mine(signum, frame):\n"
            "    pass\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "start_ray(None)\n"
            "print('KEPT', signal.getsignal(signal.SIGTERM) is mine)\n"
            "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "KEPT True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
