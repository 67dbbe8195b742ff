"""``autopeft ui``: the MLflow UI on the search store, as a child that signals reach.

The MLflow server (``mlflow ui``) runs in its own process group (its uvicorn supervisor and
workers, and MLflow's job runner when enabled, are in it too). SIGTERM, SIGINT and SIGHUP sent to
``autopeft ui`` are forwarded to that whole group; if the group has not exited ``grace_s`` seconds
later it is killed (SIGKILL). So stopping ``autopeft ui`` stops the server and every worker, which
a plain ``subprocess.call`` child did not (the server and its workers outlived a SIGTERM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from autopeft.searching.tracking import RUNS_VIEW_KEY, SHARED_VIEW_TAG_PREFIX, TRIALS_VIEW_PREFIX, runs_view_url


def server_command(tracking_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow ui`` command line for ``tracking_uri`` on ``host:port``."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
            "--port", str(port), "--workers", str(workers)]


def view_urls(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """``(what, address)`` of the autopeft views in the store: per experiment written by a search,
    its runs view and the trials view of its newest search (:mod:`autopeft.searching.tracking`). Empty when
    the store has no search or cannot be read."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        out = []
        for exp in client.search_experiments():
            if SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY not in exp.tags:
                continue
            out.append((f"experiment {exp.name!r}, every search", runs_view_url(base_url, exp.experiment_id)))
            runs = client.search_runs([exp.experiment_id], "tags.`autopeft.kind` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if runs and SHARED_VIEW_TAG_PREFIX + TRIALS_VIEW_PREFIX + runs[0].info.run_id in exp.tags:
                out.append((f"trials of search {runs[0].info.run_name!r}",
                            runs_view_url(base_url, exp.experiment_id, TRIALS_VIEW_PREFIX + runs[0].info.run_id)))
        return out
    except Exception:  # noqa: BLE001 - the addresses are a convenience; the server still starts
        return []


def serve(command: list[str], grace_s: float = 10.0, on_start: Callable[[int], None] | None = None) -> int:
    """Run ``command`` in a new process group until it exits; forward SIGTERM/SIGINT/SIGHUP to the group.

    Args:
        command: the server command (:func:`server_command`).
        grace_s: seconds the group gets to exit after a forwarded signal before SIGKILL.
        on_start: called with the server's pid once it started.

    Returns:
        The server's exit code; ``128 + signal`` when this process was signalled (shell convention).
    """
    proc = subprocess.Popen(command, start_new_session=True)
    if on_start:
        on_start(proc.pid)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum, _frame) -> None:
        received.append((signum, time.time()))
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and time.time() - received[0][1] > grace_s:
                _kill_group(proc.pid, signal.SIGKILL)
                code = proc.wait()
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # The server may exit before a worker does: nothing of the group may outlive us.
    deadline = time.time() + (grace_s if received else 0)
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    _kill_group(proc.pid, signal.SIGKILL)
    return 128 + received[0][0] if received else code


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from ``/proc`` (Linux); elsewhere
    ``[pgid]`` while the group exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                state, _ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state != "Z":
                out.append(int(d.name))
    return out


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
