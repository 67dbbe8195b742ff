"""Give a finished trial's memory back, so a worker that runs trial after trial stays flat.

A Ray worker process runs many trials. After a trial every model, optimiser and batch is
garbage, but glibc's ``malloc`` keeps the freed pages in its per-thread arenas (weight loading in
transformers and PyTorch's intra-op threads allocate from several), so the resident set grows
by ~30-80 MiB per trial on MiniLM-L6 although no object survives (measured with tracemalloc and a
census of live tensors: none). ``malloc_trim(0)`` returns those pages to the system
(``man 3 malloc_trim``): twenty trials then stay within a few per cent of the first
(``benchmarks/memory_flat.py``, ``experiments/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where there is none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Collect garbage, empty PyTorch's CUDA cache, and return freed heap pages to the system.

    Returns:
        ``True`` when glibc released memory (``malloc_trim`` returned 1), ``False`` when there was
        nothing to release or the C library has no ``malloc_trim``.
    """
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    trim = _libc_malloc_trim()
    return bool(trim(0)) if trim is not None else False
