"""MAM adapter ("Mix-And-Match"): prefix tuning on attention + scaled parallel adapter on the FFN.

Source: He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv:2110.04366, section 4.5 ("An effective integration by transferring favorable design
elements"). Per layer:

* attention (eq. 5): ``head = Attn(x W_q, [P_k ; x W_k], [P_v ; x W_v])`` with ``P_k, P_v`` (l, d),
  ``l = num_virtual_tokens`` = 30 in the paper ("prefix tuning with a small bottleneck dimension
  l = 30"), reparametrised by Li & Liang's MLP during training (the authors' code uses a middle
  dimension of 800, ``--mid_dim 800``);
* FFN (eq. 8 with scaling, section 4.4/4.5): ``h <- h + s * ReLU(x W_down) W_up`` read from the FFN's
  input ``x`` in parallel with the FFN, bottleneck ``r = bottleneck_size`` = 512, ``s = scaling`` = 4.

Building blocks: :class:`~autopeft.methods.prefix_tuning.PrefixTuningConfig` /
:func:`~autopeft.methods.prefix_tuning.apply_prefix_tuning` and
:class:`~autopeft.methods.adapter.AdapterConfig` / :func:`~autopeft.methods.adapter.apply_adapter`
(parallel placement on the ``ffn`` sublayer, ``W_up`` zero-initialised, ``W_down`` as a Linear's
default Kaiming-uniform - the authors' "lora" init). Shapes: ``x`` (B, T, d) -> (B, T, d); prefixes
(B, heads, l, d / heads) per layer.

Note on sizes: the paper's defaults are for BART-large / mBART-large (d = 1024), where r = 512 is a
2x reduction. On a small backbone such as MiniLM-L6 (d = 384) r = 512 is *wider* than the model; the
default is kept as the paper states it, override ``bottleneck_size`` (and ``encoder_hidden_size``) to
scale down.

Trainable parameters (training-time, with ``L`` selected layers, width ``d``, MLP width ``m``):
``[l d + d m + m + m 2 L d + 2 L d] + L [2 d r + r + d]`` (+ ``2 L (d + 1)`` gated). The paper counts
the prefix after training, when only its table (l, 2 L d) remains
(:meth:`~autopeft.methods.prefix_tuning.PrefixEncoder.freeze_to_table`); set
``prefix_projection: false`` to train that table directly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from autopeft.methods.adapter import AdapterConfig, NonLinearity, apply_adapter
from autopeft.methods.base import MethodConfig, register
from autopeft.methods.prefix_tuning import PrefixTuningConfig, apply_prefix_tuning


class MAMConfig(MethodConfig):
    """MAM hyperparameters; defaults are the paper's (He et al. 2022, section 4.5).

    ``gated`` and ``layers`` apply to both parts (one gate per part and layer when gated).
    """

    method: str = "mam"
    num_virtual_tokens: int = Field(30, ge=1, description="prefix length l")
    prefix_projection: bool = Field(True, description="reparametrise the prefix by an MLP (Li & Liang)")
    encoder_hidden_size: int = Field(800, ge=1, description="width of the prefix MLP (authors' mid_dim)")
    prefix_dropout: float = Field(0.0, ge=0, lt=1)
    bottleneck_size: int = Field(512, ge=1, description="parallel adapter bottleneck r")
    scaling: float | Literal["learned"] = Field(4.0, description="parallel adapter scaling s")
    non_linearity: NonLinearity = "relu"

    def parts(self) -> list[MethodConfig]:
        """The prefix-tuning and parallel-adapter configs this preset stands for."""
        common = {"gated": self.gated, "layers": self.layers}
        return [
            PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, encoder_hidden_size=self.encoder_hidden_size,
                               prefix_projection=self.prefix_projection, prefix_dropout=self.prefix_dropout, **common),
            AdapterConfig(variant="pfeiffer", placement="parallel", sublayers=["ffn"],
                          bottleneck_size=self.bottleneck_size, scaling=self.scaling,
                          non_linearity=self.non_linearity, train_layernorm=False, **common),
        ]

    def check_fit(self, limits, recipe) -> None:
        """Each sub-method's own constraints (see :meth:`parts`)."""
        super().check_fit(limits, recipe)
        for part in self.parts():
            part.check_fit(limits, recipe)


@register("mam", MAMConfig, paper="arXiv:2110.04366", needs=("prefix",),
          why_not_peft="MAM is a prefix plus a parallel adapter; peft has no bottleneck adapters",
          why_not_merge="MAM's prefix and adapter cannot be folded into the backbone's weights")
def apply_mam(model, cfg: MAMConfig) -> None:
    """Prefix tuning in every selected layer's attention, a scaled parallel adapter on its FFN.

    Raises:
        CompositionError: a selected layer already has a prefix (prefix_tuning, p_tuning_v2,
            unipelt) or a parallel FFN adapter named ``mam``.
    """
    prefix, adapter = cfg.parts()
    apply_prefix_tuning(model, prefix)
    apply_adapter(model, adapter, name="mam")
