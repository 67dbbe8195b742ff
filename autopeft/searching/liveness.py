"""Is a search's driver still running? ``driver.json`` in the search folder says.

The driver (:func:`autopeft.api.search`) writes ``driver.json`` as it starts (:class:`DriverBeacon`):
its pid, that process's start time (psutil ``create_time``, so a reused pid is not mistaken for
it), its host name, when this session started, the seconds the search had run in earlier
sessions (a resume) and a heartbeat time that a daemon thread refreshes every
:data:`HEARTBEAT_S` seconds. When :func:`~autopeft.api.search` returns or raises, it writes
``ended``. ``kill -9`` or ``timeout``'s SIGTERM leaves the file as it was: then the pid is dead.

:func:`driver_alive` (used by ``autopeft status``): not ``ended`` and, on the driver's own host,
its pid alive with the recorded start time; on another host (a shared folder), a heartbeat
younger than :data:`HEARTBEAT_STALE_S`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from autopeft.searching.runs import write_json

#: The driver's record, in the search folder.
DRIVER_FILE = "driver.json"
#: Seconds between heartbeats.
HEARTBEAT_S = 30.0
#: Seen from another host, a driver whose heartbeat is older than this (seconds) is gone.
HEARTBEAT_STALE_S = 180.0


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class DriverBeacon:
    """Writes and refreshes ``driver.json`` while a search's driver runs.

    Args:
        folder: the search folder (exists).
        elapsed_before_s: seconds the search ran in earlier sessions (0 for a new search).
        started: ``time.time()`` when this session started (default: now).
        interval_s: seconds between heartbeats.

    Use as a context manager, or :meth:`start` then :meth:`stop`. Writes are atomic (temp file,
    rename); a failed heartbeat write (folder removed, disk full) is skipped, never raised.
    """

    def __init__(self, folder: str | Path, elapsed_before_s: float = 0.0, started: float | None = None,
                 interval_s: float = HEARTBEAT_S) -> None:
        self.path = Path(folder) / DRIVER_FILE
        self.interval_s = interval_s
        self.info: dict[str, Any] = {"pid": os.getpid(), "create_time": _create_time(os.getpid()),
                                     "hostname": socket.gethostname(),
                                     "started": time.time() if started is None else started,
                                     "elapsed_before_s": float(elapsed_before_s), "heartbeat": None, "ended": None}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        try:
            write_json(self.path, self.info)
        except OSError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.info["heartbeat"] = time.time()
            self._write()

    def start(self) -> DriverBeacon:
        """Write ``driver.json`` and start the heartbeat thread (a daemon: it dies with the process)."""
        self.info["heartbeat"] = time.time()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="autopeft-driver-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat and record ``ended`` (the driver is done, finished or not)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.info["heartbeat"] = self.info["ended"] = time.time()
        self._write()

    def __enter__(self) -> DriverBeacon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_driver(folder: str | Path) -> dict[str, Any] | None:
    """``driver.json`` of ``folder``; ``None`` when absent or unreadable (a search from an autopeft
    without it, or one caught mid-write)."""
    try:
        info = json.loads((Path(folder) / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def driver_alive(info: dict[str, Any], now: float | None = None) -> bool:
    """Whether the driver that wrote ``info`` (:func:`read_driver`) still runs.

    On its own host: not ``ended`` and a live, non-zombie process with its pid and recorded
    ``create_time`` (within 1 s). Elsewhere, or when the process cannot be inspected: not ``ended``
    and a heartbeat younger than :data:`HEARTBEAT_STALE_S` seconds.
    """
    import psutil

    if info.get("ended"):
        return False
    now = time.time() if now is None else now
    if info.get("hostname") == socket.gethostname():
        try:
            proc = psutil.Process(info["pid"])
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            recorded = info.get("create_time")
            return recorded is None or abs(proc.create_time() - float(recorded)) < 1.0
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            pass
    beat = info.get("heartbeat")
    return isinstance(beat, (int, float)) and now - beat < HEARTBEAT_STALE_S
