"""QLoRA: LoRA in full precision on top of a frozen backbone stored in 4-bit NF4.

Source: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
For one wrapped Linear (eq. 5): ``Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2`` where
``doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)`` (eq. 6): 4-bit NormalFloat weights with
block constants ``c2`` (per 64 weights) themselves quantised to 8 bits with constants ``c1`` (per 256
blocks). ``L1 L2`` is LoRA (Hu et al., arXiv:2106.09685, eq. 3) with ``L1 = A^T`` (d_in, r),
``L2 = (alpha/r) B^T`` (r, d_out), trained in full precision (float32 here); the dequantised weight
and the matmul use ``compute_dtype`` (bfloat16 in the paper). Gradients flow through the frozen
4-bit layers to every LoRA weight (section 3, "QLoRA").

What is quantised (:func:`autopeft.backbones.quantization.quantize_backbone`, called by
:func:`autopeft.composition.recipe.build_model` before the components are applied): every Linear of the
encoder and the pooler. Embeddings, LayerNorms and the task head stay in full precision. On the meta
device (parameter counting) nothing is quantised, so counts equal plain LoRA's with the same
``r``/``target_modules``/``layers``: ``r * (d_in + d_out)`` per wrapped Linear.

The paper's paged optimiser (section 3) is used by :func:`autopeft.training.trainer.make_optimizer` on CUDA.
Defaults follow the paper's finding that LoRA must sit on every linear layer of the transformer
blocks to match 16-bit fine-tuning (section 4): all six Linear slots.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from autopeft.backbones.arch import LINEAR_TARGETS
from autopeft.methods.base import register
from autopeft.methods.lora import LoraConfig, LoraLinear


class QLoraConfig(LoraConfig):
    """QLoRA hyperparameters: LoRA's (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``)
    plus the dtype of the 4-bit matmuls."""

    method: str = "qlora"
    target_modules: list[str] = Field(default_factory=lambda: list(LINEAR_TARGETS))
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype in which the NF4 weights are dequantised and multiplied (paper: bfloat16)")


class QLoraLinear(LoraLinear):
    """:class:`LoraLinear` over a 4-bit ``base_layer``: ``y = W_nf4 x + g(x) (alpha/r) B A x``.

    Shapes: ``x`` (..., d_in) -> (..., d_out); ``A`` (r, d_in), ``B`` (d_out, r) in float32.
    """

    def _check_mergeable(self) -> None:
        from autopeft.backbones.quantization import is_quantized

        if is_quantized(self.base_layer):
            raise RuntimeError("cannot merge LoRA into a 4-bit NF4 base layer (it would need re-quantisation); "
                               "keep the adapter unmerged")
        super()._check_mergeable()


@register("qlora", QLoraConfig, paper="arXiv:2305.14314", quantized_base=True,
          why_not_peft=("QLoRA's LoRA sits on autopeft's own 4-bit NF4 base weights; on peft's base the logits "
                        "would differ"),
          why_not_merge="QLoRA's base weights are 4-bit NF4; dequantise before merging")
def apply_qlora(model, cfg: QLoraConfig) -> None:
    """Quantise the backbone if :func:`autopeft.composition.recipe.build_model` has not, set the 4-bit compute
    dtype, and wrap every ``target_modules`` Linear of every selected layer in a :class:`QLoraLinear`.

    Raises:
        CompositionError: another component already holds one of the Linear slots.
        ImportError: bitsandbytes is missing (real, non-meta backbones only).
    """
    from autopeft.backbones.quantization import MARKER, quantize_backbone, set_compute_dtype

    device = next(model.backbone.parameters()).device
    if device.type != "meta":
        if not getattr(model.backbone, MARKER, None):
            quantize_backbone(model.backbone, device=device)
        set_compute_dtype(model.backbone, cfg.compute_dtype)
        model.quantized = True
    for layer in model.layers_of(cfg):
        for target in cfg.target_modules:
            model.wrap_linear(layer, target, lambda base: QLoraLinear(
                base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, model.layer_gate(cfg, layer)))
