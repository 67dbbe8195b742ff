"""Numeric precision of a trial: which dtype the forward pass computes in, and which dtypes the
parameters are stored in.

The rule, as in mixed-precision training (Micikevicius et al. 2018, arXiv:1710.03740) and peft
(trainable adapter weights are float32 whatever the backbone's dtype, peft#1249 / PR#1706):

* **trainable parameters** (and so their gradients and optimiser state) are always float32;
* the **forward pass and loss** run under ``torch.autocast`` in the precision's dtype (``bf16`` or
  ``fp16``), which casts each matmul's inputs to that dtype and keeps reductions such as softmax,
  layer norm and the loss in float32;
* **frozen backbone weights** of ``nn.Linear`` layers may be stored in the compute dtype
  (``backbone_dtype``), so autocast does not cast them again on every forward and they take half the
  memory; every other frozen tensor (embeddings, LayerNorm) stays float32;
* ``fp16`` gradients are scaled (``torch.amp.GradScaler``) so that small ones do not underflow.

``auto`` picks ``bf16`` where the hardware runs it fast: a CUDA device with bf16 support, or a CPU
with AMX-BF16 or AVX512-BF16 instructions; ``fp16`` on older CUDA devices; ``fp32`` elsewhere.
Parameter counts and the budget never depend on the precision.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch
from torch import nn

#: The precisions a recipe may name (``training.precision``).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
#: Compute dtype of each resolved precision.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags (Linux ``/proc/cpuinfo``) of hardware bf16 matmuls.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The flags of :data:`BF16_CPU_FLAGS` this CPU reports (empty where ``/proc/cpuinfo`` is absent,
    e.g. macOS or Windows: ``auto`` then stays fp32 on the CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.partition(":")[2].split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` made concrete for ``device``: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: ``bf16`` on a CUDA device that supports it, else ``fp16`` on CUDA; ``bf16`` on a CPU
    with AMX-BF16 or AVX512-BF16 (:func:`cpu_bf16_flags`); ``fp32`` elsewhere (e.g. Apple ``mps``).
    An explicit precision is returned as it is.

    Raises:
        ValueError: a precision outside :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and cpu_bf16_flags():
        return "bf16"
    return "fp32"


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None`` for ``fp32``: no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cast_for_training(model: nn.Module, precision: str, backbone_dtype: str = "auto") -> dict[str, int]:
    """Set the dtypes of ``model``'s parameters for training in a resolved ``precision``, in place.

    * every trainable floating-point parameter becomes float32 (a float16 or bfloat16 checkpoint
      otherwise creates its adapters and head in half precision, where AdamW's update underflows);
    * frozen ``nn.Linear`` weights and biases take ``backbone_dtype``: ``auto`` = the precision's
      compute dtype (float32 for ``fp32``), or ``fp32`` / ``bf16`` / ``fp16`` explicitly;
    * every other frozen floating-point tensor (embeddings, LayerNorm, buffers) becomes float32.

    Quantised (integer) weights are left as they are. Returns ``{dtype name: parameters}`` of the
    result, for the record.

    Raises:
        ValueError: ``backbone_dtype`` not ``auto``/``fp32``/``bf16``/``fp16``, or half-precision frozen
            weights with ``fp32`` compute (nothing would cast them back: a dtype error at the first matmul).
    """
    if backbone_dtype not in ("auto", *DTYPES):
        raise ValueError(f"unknown backbone_dtype {backbone_dtype!r}: use auto, fp32, bf16 or fp16")
    frozen_dtype = DTYPES[precision if backbone_dtype == "auto" else backbone_dtype]
    if precision == "fp32" and frozen_dtype != torch.float32:
        raise ValueError(f"backbone_dtype {backbone_dtype} needs a half precision (bf16 or fp16) to compute in")
    linear_params = {id(p) for m in model.modules() if isinstance(m, nn.Linear)
                     for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        want = torch.float32 if p.requires_grad or id(p) not in linear_params else frozen_dtype
        if p.dtype != want:
            p.data = p.data.to(want)
    for b in model.buffers():
        if b.is_floating_point() and b.dtype != torch.float32:
            b.data = b.data.float()
    counts: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A ``GradScaler`` enabled for ``fp16`` only (bf16 has float32's exponent range: no scaling)."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind, enabled=precision == "fp16")
