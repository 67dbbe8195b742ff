"""UniPELT: prefix tuning, LoRA and a serial adapter in one layer, each behind its own learned gate.

Source: Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
arXiv:2110.07577, section 3 and eq. (1)-(3): ``G_P``, ``G_L``, ``G_A = sigmoid(W x)`` scale the
prefix vectors, the LoRA update and the adapter output respectively (see :class:`autopeft.composition.gates.Gate`).
Each selected layer holds exactly these three gates (``encoder.layer[i].peft_gates``), each reading
the layer's input hidden states ``x`` (B, T, d); ``G_L`` is shared by every LoRA-wrapped projection
of the layer (W_q and W_v by default). Gate parameters: ``3 L (d + 1)`` for ``L`` selected layers.
Defaults follow the paper's setting: prefix length 10, LoRA r=8 on W_q and W_v with alpha 16,
Pfeiffer-placed serial adapter with reduction factor 16. The gates can be used on any other
combination too: set ``gating: true`` in a recipe or ``gated: true`` on a component.
"""

from __future__ import annotations

from pydantic import Field

from autopeft.methods.adapter import AdapterConfig, apply_adapter
from autopeft.methods.base import MethodConfig, TargetModules, register
from autopeft.methods.lora import LoraConfig, apply_lora
from autopeft.methods.prefix_tuning import PrefixTuningConfig, apply_prefix_tuning


class UniPELTConfig(MethodConfig):
    """One config for the three gated sub-methods; each part can be switched off."""

    method: str = "unipelt"
    gated: bool | None = True
    use_prefix: bool = True
    use_lora: bool = True
    use_adapter: bool = True
    num_virtual_tokens: int = Field(10, ge=1)
    encoder_hidden_size: int = Field(64, ge=1)
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: TargetModules = Field(default_factory=lambda: ["query", "value"])
    reduction_factor: float = Field(16.0, gt=0)
    bottleneck_size: int | None = Field(None, ge=1)

    def parts(self) -> list[MethodConfig]:
        """The sub-method configs this preset stands for."""
        common = {"gated": self.gated, "layers": self.layers}
        out: list[MethodConfig] = []
        if self.use_prefix:
            out.append(PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens,
                                          encoder_hidden_size=self.encoder_hidden_size, **common))
        if self.use_lora:
            out.append(LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=self.target_modules, **common))
        if self.use_adapter:
            out.append(AdapterConfig(variant="pfeiffer", placement="serial", reduction_factor=self.reduction_factor,
                                     bottleneck_size=self.bottleneck_size, **common))
        return out

    def check_fit(self, limits, recipe) -> None:
        """Each sub-method's own constraints (see :meth:`parts`)."""
        super().check_fit(limits, recipe)
        for part in self.parts():
            part.check_fit(limits, recipe)


@register("unipelt", UniPELTConfig, paper="arXiv:2110.07577", needs=("prefix",),
          why_not_peft="UniPELT's gated LoRA + prefix + adapter mix has no peft counterpart",
          why_not_merge="UniPELT's gates depend on the input and cannot be folded into the backbone's weights")
def apply_unipelt(model, cfg: UniPELTConfig) -> None:
    """Apply the enabled sub-methods, each with one gate per layer (``G_P``, ``G_L``, ``G_A``)."""
    appliers = {"prefix_tuning": apply_prefix_tuning, "lora": apply_lora, "adapter": apply_adapter}
    for part in cfg.parts():
        appliers[part.method](model, part)
