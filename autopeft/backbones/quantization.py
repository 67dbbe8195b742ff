"""4-bit NormalFloat (NF4) storage of a backbone's encoder weights, for QLoRA.

Source: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.

* NF4 (section 3, eq. 4): each block of 64 consecutive weights is scaled by its absolute maximum
  ``c2`` into [-1, 1] and stored as the index (4 bits) of the nearest of 16 normal-quantile levels.
* Double quantisation (section 3): the fp32 block constants ``c2`` are themselves quantised to 8
  bits in blocks of 256, with one fp32 constant ``c1`` per block and a mean offset.
* ``doubleDequant(c1, c2, W_NF4) = dequant(dequant(c1, c2), W_NF4)`` gives the compute-dtype
  weight used in ``Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2`` (eq. 5-6); the LoRA part lives in
  :mod:`autopeft.methods.qlora` (full precision, on top of the quantised ``base_layer``).

Storage per quantised weight: 0.5 byte per element + 1 byte per 64 elements (8-bit ``c2``) + 4 bytes
per 256 blocks (fp32 ``c1``) + small fixed tables (16 NF4 levels, 256 8-bit levels, offset): about
0.13 of the fp32 bytes for the 384- and 768-wide layers of MiniLM and BERT-base
(see :func:`quantized_weight_bytes`).

Implementation: bitsandbytes (``bnb.nn.Linear4bit(..., quant_type="nf4", compress_statistics=True)``).
Quantisation happens when the weight is moved to its device (``Params4bit.to``); this works on CUDA
and, with a bitsandbytes that has the CPU backend (checked with 0.50.2), on CPU. Two CPU details are handled by :class:`NF4Linear`:

* bitsandbytes repacks a Linear4bit's weight into a bf16-only inference layout the first time it
  runs in eval mode on a CPU with AVX512-BF16; afterwards training through it no longer matches.
  NF4Linear switches that repacking off, so eval and training use the same weights.
* the CPU dequantisation kernel of bitsandbytes 0.50 returns wrong values for some shapes whose
  ``in_features`` is not a multiple of the block size (e.g. 37x32, 8x48; all MiniLM/BERT shapes are
  fine). Each layer is checked once against a pure-torch dequantisation
  (:func:`dequantize_nf4`) when it is quantised on CPU; a layer that disagrees computes with the
  pure-torch path on CPU.

Embeddings, LayerNorms and the task head stay unquantised; only the Linear layers of the encoder
(query/key/value/attention output/FFN in/FFN out) and the pooler are.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.backbones.arch import Encoder

#: Block size of the first quantisation (QLoRA: 64) and of the second one (QLoRA: 256; fixed in bnb).
BLOCKSIZE = 64
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
#: Attribute set on a backbone whose Linear layers have been quantised (value: ``"nf4"``).
MARKER = "autopeft_quantized"


def _bnb():
    """Import bitsandbytes quietly (its CPU backend logs a warning about an optional hub kernel)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ImportError("4-bit quantisation (qlora, quantization: nf4) needs bitsandbytes: pip install bitsandbytes") from exc
    finally:
        logger.setLevel(level)
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (a backbone or an :class:`autopeft.composition.model.ComposedModel`) holds NF4 weights."""
    return _NF4_CLASS is not None and any(isinstance(m, _NF4_CLASS) for m in module.modules())


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` (n,) times ``scales[i // blocksize]``; the last block may be partial."""
    n = values.numel()
    pad = (-n) % blocksize
    v = F.pad(values, (0, pad)).view(-1, blocksize)
    return (v * scales.view(-1, 1)[: v.shape[0]]).reshape(-1)[:n]


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``doubleDequant(c1, c2, W_NF4)`` of a quantised ``Params4bit`` (QLoRA eq. 6).

    Returns the (out_features, in_features) weight in the dtype it was quantised from.

    Raises:
        ValueError: ``weight`` is not a quantised Params4bit (no ``quant_state``).
    """
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("dequantize_nf4 needs a quantised bitsandbytes Params4bit (it has no quant_state)")
    packed = weight.data.reshape(-1).view(torch.uint8)
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()  # high nibble first
    n = math.prod(qs.shape)
    levels = qs.code.float()[idx[:n]]  # (n,) NF4 levels in [-1, 1]
    absmax = qs.absmax
    if qs.nested:  # c2 stored in 8 bits: c2 = code8[q] * c1[block of 256] + offset
        s2 = qs.state2
        absmax = _blockwise(s2.code.float()[absmax.long().reshape(-1)], s2.absmax.float(), s2.blocksize) + qs.offset
    out = _blockwise(levels, absmax.float().reshape(-1), qs.blocksize)
    return out.view(*qs.shape).to(qs.dtype)


class _ReferenceMatmul(torch.autograd.Function):
    """``y = x W^T`` with ``W = dequantize_nf4(weight)`` recomputed in backward (nothing big saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return x @ dequantize_nf4(weight).to(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad @ dequantize_nf4(ctx.weight).to(grad.dtype), None


def _make_nf4_linear_class():
    bnb = _bnb()

    class NF4Linear(bnb.nn.Linear4bit):
        """A ``bnb.nn.Linear4bit`` (NF4, double quantisation) with two CPU fixes (module docstring).

        Shapes: ``x`` (..., in_features) -> (..., out_features), in ``x``'s dtype; the matmul runs in
        ``compute_dtype``. The weight is a frozen ``Params4bit`` (packed uint8 + quant state).
        """

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.support_avx512bf16_for_cpu = False  # no one-way bf16 repacking in eval mode
            self.reference_on_cpu = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not (self.reference_on_cpu and x.device.type == "cpu"):
                return super().forward(x)
            dtype = x.dtype
            h = x.to(self.compute_dtype or dtype)
            out = _ReferenceMatmul.apply(h, self.weight)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(dtype)

    return NF4Linear


_NF4_CLASS: type | None = None


def __getattr__(name: str):  # lazy: importing autopeft must not import bitsandbytes
    if name == "NF4Linear":
        return nf4_linear_class()
    raise AttributeError(name)


def nf4_linear_class() -> type:
    """The :class:`NF4Linear` class (created on first use, so bitsandbytes is imported lazily)."""
    global _NF4_CLASS
    if _NF4_CLASS is None:
        _NF4_CLASS = _make_nf4_linear_class()
    return _NF4_CLASS


def quantize_linear(linear: nn.Linear, device: str | torch.device, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """An :class:`NF4Linear` holding ``linear``'s weight in NF4 (double-quantised) on ``device``.

    The bias stays in full precision. ``compute_dtype`` is the dtype of the matmul.

    Raises:
        ValueError: ``device`` is the meta device (nothing to quantise).
    """
    bnb = _bnb()
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("cannot quantise on the meta device")
    cls = nf4_linear_class()
    with torch.device("meta"):  # no throw-away fp32 allocation for the placeholder weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    weight = linear.weight.detach()
    q.weight = bnb.nn.Params4bit(weight.to(device), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", blocksize=BLOCKSIZE, module=q).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    q.train(linear.training)
    if device.type == "cpu":
        q.reference_on_cpu = not _cpu_kernel_agrees(q.weight)
    return q


def _cpu_kernel_agrees(weight: torch.Tensor) -> bool:
    """Whether bitsandbytes' CPU dequantisation of ``weight`` equals :func:`dequantize_nf4`.

    Odd ``in_features`` go to bitsandbytes' torch.compile'd generic path (seconds of compilation per
    shape on CPU); they take the pure-torch path instead, so they count as disagreeing.
    """
    from bitsandbytes.functional import dequantize_4bit

    if weight.quant_state.shape[-1] % 2:
        return False
    reference = dequantize_nf4(weight).float()
    for dtype in (torch.float32, torch.bfloat16):  # the CPU kernels differ per output dtype
        state = copy.copy(weight.quant_state)
        state.dtype = dtype
        kernel = dequantize_4bit(weight.data, state).float()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        if not torch.allclose(kernel, reference, rtol=tol, atol=1e-7):
            return False
    return True


def quantize_backbone(backbone: nn.Module, device: str | torch.device = "cpu",
                      compute_dtype: torch.dtype | str = torch.float32) -> int:
    """Replace every encoder (and pooler) Linear of ``backbone`` by an NF4 :class:`NF4Linear`, in place.

    Quantised: every Linear slot of every layer in the family table (``autopeft.backbones.arch.FAMILIES``: six
    on BERT, seven on Llama/Qwen2/Mistral, four on GPT-2; inside a
    LoRA-style wrapper its ``base_layer``) and ``pooler.dense`` when present. Embeddings,
    LayerNorms and the task head stay as they are. Sets ``backbone.autopeft_quantized = "nf4"``.

    Args:
        backbone: a ``*ForSequenceClassification`` model of a known family.
        device: where the weights live; ``meta`` (shape-only models for counting) is a no-op.
        compute_dtype: dtype of the 4-bit matmuls (``float32``, ``bfloat16``, ``float16``).

    Returns:
        The number of Linear layers quantised (0 on the meta device or when already quantised).

    Raises:
        ValueError: unknown ``compute_dtype``.
        ArchitectureError: ``backbone`` is not of a known family.
        ImportError: bitsandbytes is missing.
    """
    dtype = _dtype(compute_dtype)
    if torch.device(device).type == "meta" or any(p.device.type == "meta" for p in backbone.parameters()):
        return 0
    cls = nf4_linear_class()
    encoder = Encoder.of(backbone)
    done = 0
    for layer in range(encoder.num_layers):
        for path in encoder.family.linear.values():
            module = encoder.get(layer, path)
            if _plain_linear(module, cls):
                encoder.replace(layer, path, quantize_linear(module, device, dtype))
                done += 1
            elif _plain_linear(getattr(module, "base_layer", None), cls):
                module.base_layer = quantize_linear(module.base_layer, device, dtype)
                done += 1
    pooler = getattr(getattr(backbone, "base_model", backbone), "pooler", None)
    if pooler is not None and _plain_linear(getattr(pooler, "dense", None), cls):
        pooler.dense = quantize_linear(pooler.dense, device, dtype)
        done += 1
    if done or is_quantized(backbone):
        setattr(backbone, MARKER, "nf4")
    return done


#: Bits a weight takes in NF4 with double quantisation (QLoRA, arXiv:2305.14314, section 3): the 4-bit
#: code, an 8-bit absmax per block of 64 weights and a float32 constant per 256 such blocks,
#: ``4 + 8/64 + 32/(64*256)`` = 4.127 bits.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def weight_bytes(backbone: nn.Module) -> dict[str, int]:
    """Bytes the backbone's weights take stored in ``fp32``, ``bf16`` and ``nf4`` (every tensor of
    the backbone, its head included; works on the meta device).

    ``nf4``: the Linear weights :func:`quantize_backbone` quantises at :data:`NF4_BITS` each, every other
    tensor (embeddings, LayerNorms, biases, the head) in bf16, as QLoRA keeps them.

    Raises:
        ArchitectureError: ``backbone`` is not of a known family.
    """
    params = {id(p): p.numel() for p in backbone.parameters()}
    encoder = Encoder.of(backbone)
    quantised = set()
    for layer in range(encoder.num_layers):
        for path in encoder.family.linear.values():
            module = encoder.get(layer, path)
            module = getattr(module, "base_layer", module)
            if isinstance(module, nn.Linear):
                quantised.add(id(module.weight))
    pooler = getattr(getattr(backbone, "base_model", backbone), "pooler", None)
    if isinstance(getattr(pooler, "dense", None), nn.Linear):
        quantised.add(id(pooler.dense.weight))
    total = sum(params.values())
    q = sum(n for i, n in params.items() if i in quantised)
    return {"fp32": 4 * total, "bf16": 2 * total, "nf4": math.ceil(q * NF4_BITS / 8) + 2 * (total - q)}


def set_compute_dtype(module: nn.Module, compute_dtype: torch.dtype | str) -> int:
    """Set the matmul dtype of every :class:`NF4Linear` in ``module``; returns how many.

    Raises:
        ValueError: unknown ``compute_dtype``.
    """
    dtype = _dtype(compute_dtype)
    n = 0
    for m in module.modules():
        if _NF4_CLASS is not None and isinstance(m, _NF4_CLASS):
            m.compute_dtype = dtype
            m.compute_type_is_set = True
            n += 1
    return n


def quantized_weight_bytes(layer: nn.Module) -> int:
    """Bytes that the weight of an :class:`NF4Linear` really occupies: packed 4-bit codes plus every
    tensor of its quant state (8-bit block constants, fp32 second-level constants, code tables,
    offset). The bias (full precision) is not included.

    Raises:
        ValueError: ``layer`` has no quantised weight.
    """
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    if qs is None:
        raise ValueError(f"{type(layer).__name__} has no quantised weight")
    tensors = [layer.weight.data]
    for state in (qs, qs.state2 if qs.nested else None):
        if state is None:
            continue
        tensors += [v for v in vars(state).values() if torch.is_tensor(v) and v is not state]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _plain_linear(module: Any, cls: type) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, cls) and type(module).__name__ != "Linear4bit"


def _dtype(compute_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(compute_dtype, torch.dtype):
        if compute_dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype}")
        return compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return COMPUTE_DTYPES[compute_dtype]
