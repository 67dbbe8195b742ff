"""Ctrl-C and SIGTERM during a search: stop, record, and leave it resumable.

Ray Tune answers SIGINT by ending ``Tuner.fit`` as if the search were done: the running trial then
looked stopped by MO-ASHA (``stopped_early``, no rows), its MLflow run stayed ``RUNNING``, the search
wrote ``result.json`` and exited 0, and ``autopeft resume`` found it "already finished" (SIGTERM, a
batch scheduler's stop, killed the driver outright). Instead, while Tune runs, :class:`GracefulStop`
owns SIGINT and SIGTERM:

1. the first signal is only noted (a handler must not write files or MLflow mid-step) and the trial
   generator is frozen: no new sample, and the sampler is told nothing more, so the trials that were
   running stay live in it;
2. at the next step of Tune's loop, the search's driver
   (:class:`autopeft.searching.tune.SearchDriver`) records every running trial ``interrupted``, ends
   its MLflow run ``KILLED``, writes the resume checkpoint and ``trials.json``, marks the parent run
   interrupted (tag ``status=interrupted``, ``KILLED``), and lets Ray stop the trials;
3. a signal while those records are written is ignored; one during Ray's own clean-up stops waiting
   for it (a second Ctrl-C: the search is already saved);
4. :class:`SearchInterrupted` is raised; the CLI prints one line and exits 128 + the signal's number
   (130 for SIGINT, 143 for SIGTERM). A further signal while the process exits (Ray's own shut-down runs
   at exit and can take seconds on a loaded machine) ends it at once with that code
   (:func:`exit_on_next_signal`, installed by the ``autopeft`` command); before, it printed a
   ``KeyboardInterrupt`` traceback from Ray's exit hook and then died of SIGSEGV (exit -11).
   ``autopeft resume`` re-runs the interrupted trials from the
   start under their ids (:mod:`autopeft.searching.resume`) and ends as an uninterrupted search would.

Outside Tune's loop (before it, in the one-shot phase, while results are written),
:func:`raise_on_stop_signals` makes SIGTERM raise :class:`SearchInterrupted` as Ctrl-C raises
``KeyboardInterrupt``, so the driver always ends its runs (``ray.init`` puts its own SIGTERM handler,
``sys.exit(15)``, in place of it: :func:`autopeft.searching.tune.start_ray` puts it back). Handlers
are installed from the main thread only (Python's rule); elsewhere the defaults stay.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

#: The signals that stop a search: Ctrl-C (SIGINT) and a scheduler's or ``kill``'s SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by SIGINT (Ctrl-C) or SIGTERM, saved for ``autopeft resume``.

    Attributes:
        signum: the signal's number.
        folder: the search folder, once known (set by :func:`autopeft.api.search`).
        recorded: whether the trials and the MLflow runs were already marked interrupted.
    """

    def __init__(self, signum: int = signal.SIGINT, folder: Path | None = None, recorded: bool = False) -> None:
        super().__init__(signal_name(signum))
        self.signum, self.folder, self.recorded = int(signum), folder, recorded

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 128 + its number (130 for SIGINT)."""
        return 128 + self.signum

    def __str__(self) -> str:
        where = ""
        if self.folder is not None:
            where = f": search {self.folder.name} saved; continue it with `autopeft resume {self.folder.name}"
            where += f" --output-dir {self.folder.parent}`" if self.folder.parent.name != "autopeft_runs" else "`"
        return f"interrupted by {signal_name(self.signum)}{where}"


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def on_main_thread() -> bool:
    """True on the interpreter's main thread, the only one that may install signal handlers."""
    return threading.current_thread() is threading.main_thread()


def raise_on_stop_signals() -> Callable[[], None]:
    """Make SIGTERM raise :class:`SearchInterrupted` (SIGINT: the same, instead of a bare
    ``KeyboardInterrupt``) in the main thread; returns the function that puts the previous
    handlers back (a no-op off the main thread, where nothing is installed)."""
    if not on_main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SearchInterrupted(signum)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        previous.clear()

    return restore


def exit_on_next_signal(code: int) -> None:
    """From now on, SIGINT or SIGTERM ends the process at once with exit code ``code``, after flushing
    stdout and stderr: for a process that has saved its work and is only exiting (the CLI after a search
    was interrupted and saved), so a further Ctrl-C never lands in an exit hook (Ray's shut-down) as a
    traceback. ``os._exit`` skips the exit hooks still to run (Ray's shut-down: its processes end with
    the driver; MLflow's: the search's runs are ended already). Main thread only (Python's rule);
    elsewhere a no-op."""
    import os
    import sys

    if not on_main_thread():
        return

    def handler(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
                pass
        os._exit(code)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


class GracefulStop:
    """Owns SIGINT and SIGTERM while Ray Tune runs (a context manager; see the module docstring).

    Args:
        on_first: called from the signal handler on the first signal (keep it to setting flags).

    Attributes:
        signum: the first signal received, ``None`` until one comes.
        phase: ``running``; ``recording`` while the interruption is written; ``cleanup`` once it is
            (a further signal then raises ``KeyboardInterrupt`` to stop waiting for Ray).
    """

    def __init__(self, on_first: Callable[[int], None] | None = None) -> None:
        self.on_first = on_first
        self.signum: int | None = None
        self.count = 0
        self.phase = "running"
        self._previous: dict = {}
        self._tune_env: str | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop signal came."""
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
            if self.on_first is not None:
                self.on_first(signum)
            return
        if self.phase == "cleanup":  # the search is saved: do not wait for Ray's clean-up
            raise KeyboardInterrupt(signal_name(signum))
        # before or while the interruption is recorded: ignored, so the records are complete

    def __enter__(self) -> GracefulStop:
        import os

        if on_main_thread():
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)
            # Tune would otherwise put its own SIGINT handler in place of ours for its run
            self._tune_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self._previous:
            for s, h in self._previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            self._previous = {}
            if self._tune_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_env
