"""A real two-node Ray cluster with token authentication (issue 9, deliverable 2).

A Ray head and a second Ray node run as separate processes on this machine (``ray start --head``,
``ray start --address``, one CPU each, ``--block`` so that stopping the ``ray start`` process stops
that node and nothing else on the machine). Both nodes require a token (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN``); the search runs in a fresh process that is given only the token, as a user's
shell would be, and connects through ``ray_address`` (``--ray-address`` on the CLI).

* Two trials run side by side, one per node: each trial's node id is in ``trials.json`` and on its
  MLflow run, and Tune wrote the per-trial ``result.json`` its end-of-run analysis reads.
* The worker node's raylet is killed (SIGKILL) while a trial runs there: the search still finishes,
  that trial is recorded ``failed`` with Ray's reason, the others finish on the head.

Tiny random BERT (d=32, 2 layers) on 96 synthetic SST-2-format sentences.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 160}
SPACE = """
name: cluster-tiny
fidelity: {max_train_examples: 64, min_train_examples: 32, reduction_factor: 2}
components:
  lora: {enabled: [true, false], r: [2, 4], target_modules: [[query, value]]}
  adapter: {enabled: [false, true], placement: parallel, reduction_factor: [16, 4]}
gating: false
training: {learning_rate: 5.0e-3, batch_size: 16, max_seq_length: 24}
start_points:
  - {lora.enabled: true, lora.r: 4, adapter.enabled: false}
  - {lora.enabled: false, adapter.enabled: true, adapter.reduction_factor: 4}
  - {lora.enabled: true, lora.r: 2, adapter.enabled: false}
"""
RUNNER = """
import json, sys
from autopeft.api import search
search(**json.loads(sys.argv[1]), progress=print)
"""
#: The head notices a dead node within ~2 s instead of Ray's default ~30 s (health checks every 0.5 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    ray = Path(sys.executable).parent / "ray"
    found = str(ray) if ray.exists() else shutil.which("ray")
    if not found:
        pytest.skip("ray CLI not found")
    return found


def start_head(env: dict, log: Path, tries: int = 3, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """A head on a free port, ``(process, port)``. A port found free can be taken by another process
    (a Ray worker of an earlier test) before the head binds it: then try the next free port.
    ``extra``: more ``ray start`` options (e.g. ``--num-gpus=1``: one logical GPU)."""
    for attempt in range(tries):
        port = _free_port()
        try:
            return _start_node(["--head", f"--port={port}", "--include-dashboard=false", *extra], env, log,
                               fail=attempt == tries - 1), port
        except _NodeDidNotStart:
            continue
    raise AssertionError("unreachable")


class _NodeDidNotStart(Exception):
    pass


def _start_node(args: list[str], env: dict, log: Path, fail: bool = True) -> subprocess.Popen:
    """``ray start ... --block`` in its own process; returns once the node is up. If it does not come
    up: ``pytest.fail`` with its log (or, with ``fail=False``, :class:`_NodeDidNotStart`)."""
    proc = subprocess.Popen([_ray_cli(), "start", *args, "--num-cpus=1", "--disable-usage-stats", "--block"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        text = log.read_text()
        if "will now block" in text:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    _stop(proc)
    if not fail:
        raise _NodeDidNotStart(log.read_text()[-2000:])
    pytest.fail(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` node: SIGTERM makes it stop the processes it started."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in children:  # whatever the node left behind (its raylet's workers)
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker node, each 1 CPU, token authentication on; stopped afterwards."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                **FAST_HEALTH_CHECKS})
    nodes = []
    try:
        head, port = start_head(env, tmp_path / "head.log")
        nodes.append(head)
        nodes.append(_start_node([f"--address=127.0.0.1:{port}"], env, tmp_path / "worker.log"))
        yield {"address": f"127.0.0.1:{port}", "token": token, "head": nodes[0], "worker": nodes[1]}
    finally:
        for proc in reversed(nodes):
            _stop(proc)


def _data(root: Path) -> Path:
    words = {1: ["good", "great", "fine", "lovely", "warm"], 0: ["bad", "dull", "awful", "cold", "weak"]}
    glue = root / "glue" / "sst2"
    glue.mkdir(parents=True)
    for split, n in (("train", 96), ("validation", 32)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = (i * 7 + (split == "validation")) % 2
            rows.append(f"the film is {words[label][i % 5]} and {words[label][(i * 3) % 5]} indeed\t{label}")
        (glue / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root / "glue"


def _search(tmp_path: Path, cluster: dict, trials: int, name: str, **resources) -> subprocess.Popen:
    """The search in a fresh process that knows the token but not the auth mode (as a user's shell)."""
    (tmp_path / "space.yaml").write_text(SPACE)
    args = {"task": "sst2", "budget": "100%", "backbone": TINY_BERT, "space": str(tmp_path / "space.yaml"),
            "trials": trials, "data_dir": str(_data(tmp_path / f"{name}-data")), "name": name, "output_dir": str(tmp_path),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "ray_address": cluster["address"],
            "cpus_per_trial": 1, **resources}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_TOKEN": cluster["token"], "AUTOPEFT_CACHE_DIR": str(tmp_path / "tokens"),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)], cwd=tmp_path, env=env,
                            stdout=(tmp_path / f"{name}.log").open("w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 240) -> list[dict]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    log = (tmp_path / f"{name}.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "Could not fetch metrics" not in log
    return json.loads((tmp_path / name / "trials.json").read_text())


def _mlflow_nodes(tmp_path: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autopeft")
    runs = client.search_runs([exp.experiment_id], "tags.`autopeft.kind` = 'trial'")
    return {r.data.tags["trial_id"]: r.data.tags.get("node_id") for r in runs}


def test_trials_run_on_both_nodes_of_an_authenticated_cluster(cluster, tmp_path):
    trials = _finish(_search(tmp_path, cluster, 2, "two-nodes"), tmp_path, "two-nodes")
    trained = [t for t in trials if t["status"] in ("finished", "stopped_early")]
    assert len(trained) == 2, trials
    nodes = {t["node_id"] for t in trained}
    assert len(nodes) == 2 and all(len(n) == 56 for n in nodes)  # two distinct Ray node ids (28 bytes, hex)
    assert {t["hostname"] for t in trained} == {socket.gethostname()}
    assert _mlflow_nodes(tmp_path) == {t["trial_id"]: t["node_id"] for t in trained}
    # Tune's per-trial result.json, on the driver, one line per rung the trial reported
    for t in trained:
        files = list((tmp_path / "two-nodes" / "ray").glob(f"*{t['trial_id']}*/result.json"))
        assert len(files) == 1 and len(files[0].read_text().splitlines()) == len(t["rows"])


def test_a_worker_node_dying_mid_trial_fails_that_trial_and_the_search_finishes(cluster, tmp_path):
    import psutil

    proc = _search(tmp_path, cluster, 3, "node-dies")
    worker = psutil.Process(cluster["worker"].pid)
    raylet = next(p for p in worker.children(recursive=True) if p.name() == "raylet")
    deadline, victim = time.time() + 180, None
    while victim is None and time.time() < deadline and proc.poll() is None:
        victim = next((p for p in raylet.children(recursive=True) if "ImplicitFunc" in " ".join(p.cmdline())), None)
        time.sleep(0.1)
    assert victim is not None, "no trial started on the worker node"
    raylet.send_signal(signal.SIGKILL)  # the worker node is gone, its trial with it
    trials = _finish(proc, tmp_path, "node-dies")
    failed = [t for t in trials if t["status"] == "failed"]
    trained = [t for t in trials if t["status"] in ("finished", "stopped_early")]
    assert len(failed) == 1 and len(trained) == 2, trials
    assert "node has died" in failed[0]["error"], failed[0]["error"]  # Ray's reason, not a file path
    head_node = {t["node_id"] for t in trained}
    assert len(head_node) == 1  # the survivors ran on the head; the lost trial on the other node
    assert failed[0]["node_id"] and failed[0]["node_id"] not in head_node
    assert _mlflow_nodes(tmp_path)[failed[0]["trial_id"]] == failed[0]["node_id"]


def test_unreachable_cluster_is_one_line_that_names_the_token(monkeypatch):
    import ray

    from autopeft.searching import tune

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(tune, "_use_token_if_available", lambda: False)
    with pytest.raises(RuntimeError) as err:
        tune.start_ray("127.0.0.1:1")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("cannot start Ray (address 127.0.0.1:1): Failed to connect to Ray cluster")
    assert "RAY_AUTH_TOKEN" in message and "RAY_AUTH_MODE=token" in message


def test_four_trials_share_one_logical_gpu(tmp_path):
    """``--gpus-per-trial 0.25`` packs four trials on one GPU (Ray's fractional GPUs): on a head with one
    logical GPU and one CPU, four trials at 0.25 GPU and 0.25 CPU run at once (their MLflow runs
    overlap in time) and all finish. No CUDA here: the trials compute on the CPU, Ray only counts.
    The search joins the head with ``ray_address="auto"`` (``--ray-address auto``), as a user on the
    machine where ``ray start --head`` ran."""
    from mlflow.tracking import MlflowClient

    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    head, port = start_head(env, tmp_path / "head.log", extra=("--num-gpus=1",))
    try:
        cluster = {"address": "auto", "token": token}  # `--ray-address auto`: the cluster started on this machine
        proc = _search(tmp_path, cluster, 4, "quarter-gpus", cpus_per_trial=0.25, gpus_per_trial=0.25)
        trials = _finish(proc, tmp_path, "quarter-gpus", timeout=400)
    finally:
        _stop(head)
    log = (tmp_path / "quarter-gpus.log").read_text()
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port}\b", log), log[-3000:]  # joined it
    assert "0.25 CPU / 0.25 GPU per trial, 4 at a time" in log
    trained = [t for t in trials if t["trial_id"].startswith("trial_") and t["status"] in ("finished", "stopped_early")]
    assert len(trained) == 4, trials
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autopeft")
    runs = client.search_runs([exp.experiment_id], "tags.`autopeft.kind` = 'trial'")
    ids = {t["trial_id"] for t in trained}  # (a rejected sample has a run too, without training)
    spans = [(r.info.start_time, r.info.end_time) for r in runs if r.data.tags["trial_id"] in ids]
    assert len(spans) == 4 and all(end for _, end in spans)
    at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert at_once == 4, spans
