"""CPU threads: a trial computes on as many threads as the CPUs it was given.

Nothing else sets them: PyTorch's intra-op pool defaults to the machine's cores and its inter-op
pool too, whatever Ray reserved for the trial (Ray sets ``OMP_NUM_THREADS`` in its workers, which
PyTorch's intra-op pool follows, but not the inter-op pool; ray-project/ray#28594). Two trials with
one CPU each then ran two busy threads each on two cores; on a 16-core node a trial with
``--cpus-per-trial 4`` would run 16 inter-op threads.

:func:`limit_threads` sets, in the calling process: the environment of the OpenMP / MKL / OpenBLAS /
numexpr / vecLib and Rust (``RAYON_NUM_THREADS``, the tokenizers' pool) thread pools that start
later, the pools already loaded (``threadpoolctl``), and PyTorch's intra-op and inter-op threads. The
inter-op pool can be sized once per process, before it first runs: a process that already ran it
keeps its size (a Ray worker reused for the next trial of the same search has the same CPUs anyway).

Used by the Ray trainable (:func:`autopeft.searching.tune._trial_fn`, from the trial's Ray resources,
:func:`ray_cpus`) and by ``autopeft train`` (``--cpus``, default :func:`available_cpus`).
"""

from __future__ import annotations

import os

#: Environment variables that size the thread pools of native libraries when they start.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def threads_for(cpus: float | None) -> int:
    """Threads for ``cpus`` CPUs: the whole CPUs, at least one (0.5 CPU: 1 thread); ``None``: all
    :func:`available_cpus`."""
    if cpus is None:
        return available_cpus()
    return max(1, int(cpus))


def ray_cpus() -> float | None:
    """The CPUs Ray assigned to the calling task or actor (a trial), ``None`` outside Ray or when it
    was given none."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker: no assignment to follow
        return None
    return float(cpus) if cpus else None


def limit_threads(n: int) -> dict[str, int]:
    """Compute on ``n`` threads in this process (see the module docstring); returns
    ``{"threads": intra-op, "interop_threads": inter-op}`` as PyTorch reports them afterwards.

    Raises:
        ValueError: ``n`` < 1.
    """
    import torch

    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)  # OpenMP / BLAS pools already loaded (numpy, scikit-learn, torch)
    except Exception:  # noqa: BLE001 - threadpoolctl missing or a library it cannot drive
        pass
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # the pool already ran in this process: its size is fixed from then on
            pass
    return current_threads()


def current_threads() -> dict[str, int]:
    """``{"threads": PyTorch intra-op threads, "interop_threads": inter-op threads}`` of this process."""
    import torch

    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
