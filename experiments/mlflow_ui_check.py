"""What a user sees in MLflow's UI after a search, checked in headless Chromium.

Builds a small tracking store the way a search writes it (:class:`autopeft.searching.tracking.SearchTracker`:
a parent run, three trained trials over two rungs, one rejected sample, the Pareto plot), starts
``autopeft ui`` on 127.0.0.1 with a free port, opens the views ``autopeft ui`` prints in headless
Chromium (Debian's ``chromium``), checks that the page shows the parent run, the nested trial runs
with their score, trainable parameters and space parameters, the ``status`` / ``pareto`` tags and the
``pareto.png`` artifact, saves screenshots, then stops ``autopeft ui`` with SIGTERM and checks that the
server and its workers are gone.

    python experiments/mlflow_ui_check.py [--out experiments] [--keep DIR]

Prints one line per check and exits 1 when one fails (about 30 s; ``tests/test_mlflow_ui.py`` runs it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                  "--window-size=2400,1100", "--virtual-time-budget=8000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(folder: Path) -> dict:
    """A finished search in ``folder/mlflow.db``, artifacts beside it in ``folder/mlartifacts``
    (:func:`autopeft.searching.tracking.artifact_location`); returns its ids and values."""
    from autopeft.searching.plots import pareto_plot
    from autopeft.searching.tracking import SearchTracker

    folder = Path(folder).resolve()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        tracker = SearchTracker(uri, "autopeft", "ui-check", {"task": "sst2", "budget": "0.5%", "searcher": "tpe"})
    finally:
        os.chdir(cwd)
    rungs = [352, 1024]
    trials = {"t0001": (0.8125, 10_240, 52e6, "finished"), "t0002": (0.7969, 4_096, 40e6, "finished"),
              "t0003": (0.6523, 65_536, 80e6, "stopped_early")}
    records, shown = [], {}
    for tid, (score, params, mem, status) in trials.items():
        tracker.start_trial(tid, {"lora.r": params // 1024, "learning_rate": 3e-3},
                            {"components": [{"method": "lora", "r": params // 1024}]}, params)
        rows = []
        for step in rungs if status == "finished" else rungs[:1]:
            row = {"score": score - (0.05 if step < rungs[-1] else 0), "trainable_params": params,
                   "trainable_percent": params / 22_000_000 * 100, "peak_memory_bytes": mem, "examples_seen": step}
            tracker.log_rung(tid, row, step)
            rows.append(row)
        tracker.end_trial(tid, status)
        records.append({"trial_id": tid, "status": status, "rows": rows})
        shown[tid] = (round(rows[-1]["score"], 4), params, status)  # the table shows the last rung's score
    tracker.start_trial("rejected_0001", {"lora.r": 512}, None, 500_000)
    tracker.end_trial("rejected_0001", "over_budget")
    front = [{"trial_id": t, "score": trials[t][0], "trainable_params": trials[t][1]} for t in ("t0001", "t0002")]
    art = folder / "art"
    art.mkdir()
    pareto_plot(art / "pareto.png", records, front, "accuracy", 110_000, rungs)
    tracker.finish({"t0001", "t0002"}, art, {"hypervolume": 0.42, "pareto_size": 2, "best_score": 0.8125})
    return {"uri": uri, "experiment_id": tracker.experiment_id, "parent_id": tracker.parent_id,
            "trial_runs": dict(tracker.trial_runs), "trials": shown}


def start_ui_on_free_port(uri: str, log: Path, tries: int = 3, workers: int = 1) -> tuple[subprocess.Popen, int]:
    """:func:`start_ui` on a free port, ``(process, port)``; a port found free can be taken by another
    process before the server binds it, so a server that exits at start is retried on the next one."""
    for attempt in range(tries):
        port = free_port()
        try:
            return start_ui(uri, port, log, workers), port
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def start_ui(uri: str, port: int, log: Path, workers: int = 1) -> subprocess.Popen:
    """``autopeft ui --workers <workers>`` on 127.0.0.1:``port``; returns once the server answers (or raises)."""
    exe = Path(sys.executable).parent / "autopeft"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "autopeft.cli"]
    proc = subprocess.Popen([*cmd, "ui", "--tracking-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"autopeft ui exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"autopeft ui did not answer within 90 s: {log.read_text()[-2000:]}")


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_and_check(proc: subprocess.Popen, timeout: float = 30) -> tuple[list[int], list[int]]:
    """SIGTERM ``autopeft ui``; returns (its server processes before, those still alive after)."""
    before = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=timeout)
    deadline = time.time() + 5
    left = [p for p in before if alive(p)]
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in before if alive(p)]
    return before, left


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump(browser: str, url: str, screenshot: Path | None = None) -> str:
    """The rendered DOM of ``url`` (and a screenshot) from headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: the UI state of a first visit
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom"]
        if screenshot is not None:
            flags.append(f"--screenshot={screenshot}")
        out = subprocess.run([browser, *flags, url], capture_output=True, text=True, timeout=120)
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent), help="Screenshot folder.")
    ap.add_argument("--keep", default=None, help="Build the store here instead of a temporary folder.")
    args = ap.parse_args(argv)
    browser = chromium()
    if not browser:
        print("chromium not found (Debian: apt-get install chromium)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="autopeft-ui-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    store = build_store(folder)
    proc, port = start_ui_on_free_port(store["uri"], folder / "ui.log")
    base = f"http://127.0.0.1:{port}"
    failures = []

    def check(what: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    try:
        from autopeft.searching.tracking import TRIALS_VIEW_PREFIX, runs_view_url

        printed = (folder / "ui.log").read_text()
        runs_url = runs_view_url(base, store["experiment_id"])
        trials_url = runs_view_url(base, store["experiment_id"], TRIALS_VIEW_PREFIX + store["parent_id"])
        check("autopeft ui prints the runs view and the trials view", runs_url in printed and trials_url in printed)
        page = dump(browser, runs_url, out / "mlflow_ui_runs.png")
        check("runs view: model-training page (Runs), not the GenAI overview",
              ">Runs<" in page and "Token Usage" not in page)
        check("runs view: the parent run ui-check", "ui-check" in page)
        for col in ("score", "trainable_params", "status", "pareto"):
            check(f"runs view: column {col}", f">{col}<" in page)
        check("runs view: the parent's best score 0.8125", "0.8125" in page)
        page = dump(browser, trials_url, out / "mlflow_ui_trials.png")
        for tid, (score, params, status) in store["trials"].items():
            check(f"trials view: trial-{tid} with score {score}, {params} parameters, status {status}",
                  f"trial-{tid}" in page and str(score) in page and str(params) in page and status in page)
        check("trials view: rejected sample with status over_budget", "trial-rejected_0001" in page and "over_budget" in page)
        check("trials view: pareto tags true and false", ">true<" in page and ">false<" in page)
        check("trials view: space parameter columns", "space.lora.r" in page and "space.learning_rate" in page)
        art_url = (f"{base}/#/experiments/{store['experiment_id']}/runs/{store['parent_id']}/artifacts/pareto.png"
                   "?workflowType=machine_learning")
        page = dump(browser, art_url, out / "mlflow_ui_pareto_artifact.png")
        check("parent run: pareto.png artifact listed and shown", "pareto.png" in page and "<img" in page)
    finally:
        before, left = stop_and_check(proc)
    check(f"SIGTERM to autopeft ui: its {len(before)} server processes are gone", bool(before) and not left)
    print(f"{len(failures)} failed; {time.time() - t0:.0f} s; screenshots in {out}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
