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


#: Share of a GPU's memory trials may plan to fill (the rest: CUDA context, allocator fragmentation).
GPU_FILL = 0.85
#: Most trials packed on one GPU by default (beyond this the GPU's compute, not memory, is the limit).
MAX_TRIALS_PER_GPU = 8


def estimate_trial_bytes(weight_bytes: int, trainable_params: int, layers: int, hidden: int, heads: int,
                         batch_size: int, seq_len: int, activation_bytes: int = 4) -> int:
    """Peak memory of one training trial, bytes, as a planning estimate.

    ``weight_bytes`` (the backbone stored as it trains) + 16 bytes per trainable parameter (float32
    weight, gradient and AdamW's two moments) + the activations kept for the backward pass: per layer
    ``s b h (34 + 5 a s / h)`` bytes in half precision (Korthikanti et al. 2022, arXiv:2205.05198,
    eq. (1): ``s`` sequence length, ``b`` batch, ``h`` hidden size, ``a`` heads), scaled by
    ``activation_bytes / 2`` (4: float32 activations). Padding-free batches (the trainer groups by
    length) need less; the estimate is for ``seq_len`` tokens everywhere.
    """
    s, b, h, a = seq_len, batch_size, hidden, heads
    activations = layers * s * b * h * (34 + 5 * a * s / h) * activation_bytes / 2
    return int(weight_bytes + 16 * trainable_params + activations)


def trials_per_gpu(gpu_bytes: int, trial_bytes: int, most: int = MAX_TRIALS_PER_GPU) -> int:
    """How many trials of ``trial_bytes`` fit on a GPU of ``gpu_bytes`` within :data:`GPU_FILL`: at
    least 1 (a trial larger than the GPU still gets a whole one), at most ``most``."""
    return max(1, min(most, int(GPU_FILL * gpu_bytes // max(1, trial_bytes))))
