"""BitFit: train only (a subset of) the backbone's bias terms.

Source: Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199, section 2: of ``h = W x + b`` only ``b`` is trained; the
paper's reduced variant trains the query bias and the FFN-intermediate bias (``b_q``, ``b_m2``).

Trainable parameters: the sum of the chosen bias sizes, e.g. all biases of BERT-base: 102,913 - head.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from autopeft.arch import LINEAR_TARGETS, canonical_target
from autopeft.methods.base import MethodConfig, register

#: Bias groups beyond the Linear targets: the LayerNorm biases of each layer.
_LAYERNORM_BIASES = {"attention_layernorm": "attention.output.LayerNorm", "ffn_layernorm": "output.LayerNorm"}


class BitFitConfig(MethodConfig):
    """Which biases to train: ``all`` (every bias in the encoder layers) or a list of names from
    query, key, value, attention_output, ffn_in, ffn_out, attention_layernorm, ffn_layernorm."""

    method: str = "bitfit"
    biases: list[str] | str = Field("all")

    @field_validator("biases")
    @classmethod
    def _names(cls, v):
        if v == "all":
            return v
        if isinstance(v, str) or not v:
            raise ValueError("biases must be 'all' or a non-empty list")
        out = []
        for name in v:
            out.append(name if name in _LAYERNORM_BIASES else canonical_target(name))
        return out


@register("bitfit", BitFitConfig, paper="arXiv:2106.10199")
def apply_bitfit(model, cfg: BitFitConfig) -> None:
    """Unfreeze the chosen bias vectors in the selected layers."""
    names = list(LINEAR_TARGETS) + list(_LAYERNORM_BIASES) if cfg.biases == "all" else cfg.biases
    for layer in model.layers_of(cfg):
        for name in names:
            model.claim(("bias", layer, name))
            path = _LAYERNORM_BIASES.get(name) or LINEAR_TARGETS[name]
            module = model.encoder.get(layer, path)
            module = getattr(module, "base_layer", module)  # a LoRA wrapper keeps the Linear inside
            module.bias.requires_grad_(True)
