"""What a built model gets before its first training step, from its recipe's ``training`` settings:
the device it runs on, gradient checkpointing, the frozen backbone's dropout, and the precision
(stored dtypes and autocast).

The trainer applies them to every trial, and :func:`autopeft.training.saved.load_trained` applies the
precision to a model read back, so it scores as it was trained.
"""

from __future__ import annotations

import torch

from autopeft.errors import AutopeftError
from autopeft.backbones.precision import cast_for_training, compute_dtype, resolve_precision
from autopeft.composition.model import ComposedModel
from autopeft.composition.recipe import Recipe


class DeviceError(AutopeftError, ValueError):
    """A device this machine cannot compute on: an unknown name, or CUDA/MPS where there is none."""


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU.

    Raises:
        DeviceError: ``device`` is not a name torch knows (``tpu``), asks for CUDA where this torch
            sees no GPU or for a GPU index past the last, or for MPS where there is none: one line,
            before any data or model is loaded (was: torch's multi-clause RuntimeError, or an
            AssertionError at the model's move, exit 1).
    """
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {device!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r}: MPS is not available here; use --device cpu")
    return dev


#: Backbone size (parameters) from which ``training.gradient_checkpointing: null`` turns checkpointing on.
CHECKPOINTING_FROM = 1_000_000_000


def set_gradient_checkpointing(model: ComposedModel, recipe: Recipe) -> bool:
    """Turn on the backbone's gradient checkpointing when the recipe asks for it (``None``: when the
    backbone has over :data:`CHECKPOINTING_FROM` parameters); returns whether it is on.

    Non-reentrant checkpointing (``use_reentrant=False``): the layers' inputs need not require grad (a
    frozen embedding is fine), tensors a layer reads from outside it (prefix keys and values, gates)
    receive their gradients, and dropout draws the same masks in the recomputation, so the gradients
    equal those without checkpointing (tests/test_precision.py checks every family that trains
    through the backbone)."""
    want = recipe.training.gradient_checkpointing
    if want is None:
        want = model.backbone_params > CHECKPOINTING_FROM
    if want:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return bool(want)


def set_backbone_dropout(model: ComposedModel, p: float | None) -> int:
    """Set the probability of every dropout module of the frozen backbone (``training.backbone_dropout``)
    to ``p``: embeddings, attention probabilities, hidden states and the task head's, including those of
    backbone modules an autopeft wrapper holds (``base_layer`` / ``base``); the method modules' own
    dropout (``lora_dropout``, ...) is theirs to set. ``None`` changes nothing. transformers' attention
    reads its ``nn.Dropout``'s ``p`` at each call (``dropout=self.dropout.p``), so the change reaches the
    fused attention kernels too. Returns how many modules were set.

    Dropout: Srivastava et al. 2014 (JMLR 15, eq. 2-3); the lever's effect on SST-2 is measured in
    experiments/gap_to_full_ft.md."""
    if p is None:
        return 0
    from autopeft.composition.walk import backbone_modules, is_autopeft_module

    dropouts = [m for _, m in backbone_modules(model.backbone)
                if isinstance(m, torch.nn.Dropout) and not is_autopeft_module(m)]
    for m in dropouts:
        m.p = float(p)
    return len(dropouts)


def set_precision(model: ComposedModel, recipe: Recipe, device: torch.device | str) -> str:
    """Put ``model`` in the recipe's precision (``training.precision`` resolved for ``device``, and
    ``training.backbone_dtype``; :func:`autopeft.backbones.precision.cast_for_training`) and make its forward run
    under autocast in it, for training and every evaluation alike. On CUDA, float32 matmuls (what
    autocast leaves in float32, and all of an ``fp32`` trial) use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``). Returns the resolved precision (``fp32``,
    ``bf16`` or ``fp16``)."""
    precision = resolve_precision(recipe.training.precision, device)
    cast_for_training(model, precision, recipe.training.backbone_dtype)
    model.compute_dtype = compute_dtype(precision)
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
    return precision
