"""``autopeft ui`` as a user meets it: the pages in headless Chromium
(``experiments/mlflow_ui_check.py``), the store's tags and views over MLflow's REST API, SIGTERM,
and the Pareto plot."""

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "experiments" / "mlflow_ui_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("mlflow_ui_check", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_headless_chromium_sees_runs_trials_columns_tags_and_the_pareto_plot(check, tmp_path, capsys, monkeypatch):
    """The page as a user sees it (Debian's chromium; .ci/run installs it)."""
    if not check.chromium():
        pytest.skip("chromium not installed (apt-get install chromium)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = check.main(["--out", str(tmp_path / "shots"), "--keep", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("ok   ") == 16 and "FAIL" not in out
    assert sorted(f.name for f in (tmp_path / "shots").iterdir()) == [
        "mlflow_ui_pareto_artifact.png", "mlflow_ui_runs.png", "mlflow_ui_trials.png"]


def _get(base, path, **params):
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


def _post(base, path, body):
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_ui_serves_the_search_with_its_views_and_sigterm_stops_every_server_process(check, tmp_path, monkeypatch):
    from autopeft.searching.tracking import TRIALS_VIEW_PREFIX, runs_view_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = check.build_store(tmp_path)
    proc, port = check.start_ui_on_free_port(store["uri"], tmp_path / "ui.log", workers=2)  # `autopeft ui --workers 2`
    base = f"http://127.0.0.1:{port}"
    try:
        printed = (tmp_path / "ui.log").read_text()
        assert runs_view_url(base, store["experiment_id"]) in printed
        assert runs_view_url(base, store["experiment_id"], TRIALS_VIEW_PREFIX + store["parent_id"]) in printed
        tags = {t["key"]: t["value"] for t in _get(base, "experiments/get", experiment_id=store["experiment_id"])
                ["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        cols = json.loads(tags["mlflow.sharedViewState.autopeft"])["selectedColumns"]
        assert {"metrics.`score`", "metrics.`trainable_params`", "tags.`status`", "tags.`pareto`"} <= set(cols)
        trials_view = json.loads(tags[f"mlflow.sharedViewState.{TRIALS_VIEW_PREFIX}{store['parent_id']}"])
        assert trials_view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{store['parent_id']}'"
        assert {"params.`space.lora.r`", "params.`space.learning_rate`"} <= set(trials_view["selectedColumns"])
        assert trials_view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "autopeft.kind"}]

        runs = _post(base, "runs/search", {"experiment_ids": [store["experiment_id"]], "max_results": 50,
                                           "filter": trials_view["searchFilter"]})["runs"]
        by_name = {r["info"]["run_name"]: r["data"] for r in runs}
        assert sorted(by_name) == ["trial-rejected_0001", "trial-t0001", "trial-t0002", "trial-t0003"]
        for tid, (score, params, status) in store["trials"].items():
            data = by_name[f"trial-{tid}"]
            metrics = {m["key"]: m["value"] for m in data["metrics"]}
            run_tags = {t["key"]: t["value"] for t in data["tags"]}
            assert round(metrics["score"], 4) == score and metrics["trainable_params"] == params
            assert run_tags["status"] == status
            assert run_tags["pareto"] == ("true" if tid in ("t0001", "t0002") else "false")
        rejected = by_name["trial-rejected_0001"]
        assert {m["key"]: m["value"] for m in rejected["metrics"]}["trainable_params"] == 500_000
        assert {t["key"]: t["value"] for t in rejected["tags"]}["status"] == "over_budget"

        parent = _get(base, "runs/get", run_id=store["parent_id"])["run"]["data"]
        assert {m["key"]: m["value"] for m in parent["metrics"]}["score"] == 0.8125
        assert {t["key"]: t["value"] for t in parent["tags"]}["status"] == "finished"
        files = [f["path"] for f in _get(base, "artifacts/list", run_id=store["parent_id"])["files"]]
        assert "pareto.png" in files
        workers = [p for p in check.descendants(proc.pid)
                   if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2  # uvicorn's worker processes, one per --workers
    finally:
        before, left = check.stop_and_check(proc)
    assert len(before) >= 2  # the mlflow process and its uvicorn server/workers
    assert left == []
    assert proc.returncode == 128 + 15


def test_serve_kills_a_group_that_ignores_sigterm():
    """A server (and its child) ignoring SIGTERM is killed after the grace period."""
    import os
    import signal
    import sys
    import threading
    import time

    from autopeft.ui import group_members, serve

    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script = ignore + f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {ignore + 'time.sleep(60)'!r}]); time.sleep(60)"
    pids = []
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # handled by serve's handler
    t0 = time.time()
    code = serve([sys.executable, "-c", script], grace_s=1.0, on_start=pids.append)
    assert code == 128 + 15 and time.time() - t0 < 10
    assert group_members(pids[0]) == []  # no process of the group is left (zombies aside)


def test_pareto_plot_shows_budget_memory_colour_and_rungs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from autopeft.searching.plots import pareto_plot

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    row = lambda e, s, p, m: {"examples_seen": e, "score": s, "trainable_params": p, "peak_memory_bytes": m * 2**20}  # noqa: E731
    trials = [{"rows": [row(100, 0.6, 1000, 10), row(300, 0.8, 1000, 10)]},
              {"rows": [row(100, 0.7, 5000, 30)]},
              {"rows": []}]
    pareto_plot(tmp_path / "p.png", trials, [{"trainable_params": 1000, "score": 0.8}], "accuracy", 4000, [100, 300])
    assert (tmp_path / "p.png").stat().st_size > 1000
    ax, cbar_ax = figs[0].axes
    assert cbar_ax.get_ylabel() == "peak training memory (MiB)"
    labels = [c.get_label() for c in ax.collections]
    assert labels == ["rung 1: 100 examples", "rung 2: 300 examples", "Pareto front (top rung), dev"]
    rung1, rung2 = ax.collections[:2]
    assert rung1.get_offsets().tolist() == [[5000, 0.7]] and rung2.get_offsets().tolist() == [[1000, 0.8]]
    assert rung1.get_array().tolist() == [30.0] and rung2.get_array().tolist() == [10.0]  # colour = MiB
    # rows that say how many dev examples they scored (the lower rungs: the search's sample) name it
    for t in trials:
        for r in t["rows"]:
            r["eval_examples"] = 2000 if r["examples_seen"] == 300 else 500
    pareto_plot(tmp_path / "q.png", trials, [{"trainable_params": 1000, "score": 0.8}], "accuracy", 4000, [100, 300])
    assert [c.get_label() for c in figs[1].axes[0].collections][:2] == ["rung 1: 100 examples, dev on 500",
                                                                        "rung 2: 300 examples, dev on 2,000"]
    assert rung1.norm.vmin == 10 and rung1.norm.vmax == 30
    [budget] = ax.lines
    assert list(budget.get_xdata()) == [4000, 4000] and budget.get_label() == "budget 4,000"
