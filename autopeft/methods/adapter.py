"""Bottleneck adapters: Houlsby (serial, two per layer), Pfeiffer (serial, FFN only), parallel.

Sources:
* Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751, section 2.1
  and fig. 2: ``h <- h + f(h W_down) W_up`` after the attention projection and after the FFN, with
  the layer's LayerNorms trained too.
* Pfeiffer et al., "AdapterFusion", arXiv:2005.00247, section 3.1: one adapter, after the FFN only.
* He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366,
  eq. (8)-(9): the parallel adapter ``h <- h + s * f(x W_down) W_up`` reads the sublayer's input ``x``.

``W_up`` starts at zero, so every adapter starts as the identity. Trainable parameters per adapter:
``2 * d * m + m + d`` for bottleneck ``m = d / reduction_factor`` (+1 for a learned scaling);
Houlsby adds the two LayerNorms, ``4 d`` per layer. Gated, the component has ONE gate per layer
(``d + 1``), shared by its adapters in that layer (Houlsby's two) and read from the layer's input
(:meth:`autopeft.composition.model.ComposedModel.layer_gate`; UniPELT, arXiv:2110.07577, eq. 1-3).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import AfterValidator, Field
from typing_extensions import Annotated
from torch import nn

from autopeft.methods.base import MethodConfig, register

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU, "silu": nn.SiLU}


def _check_activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown non_linearity {name!r}; valid: {', '.join(_ACTIVATIONS)}")
    return name


#: An adapter ``non_linearity`` field: one of the names in ``_ACTIVATIONS``.
NonLinearity = Annotated[str, AfterValidator(_check_activation)]


class AdapterConfig(MethodConfig):
    """Adapter hyperparameters.

    ``bottleneck_size`` wins over ``reduction_factor`` when both are given
    (``m = hidden_size // reduction_factor`` otherwise). ``sublayers`` overrides the variant's
    default placement (houlsby: attention and ffn; pfeiffer and parallel: ffn).
    """

    method: str = "adapter"
    variant: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    placement: Literal["serial", "parallel"] = "parallel"
    reduction_factor: float = Field(16.0, gt=0)
    bottleneck_size: int | None = Field(None, ge=1)
    sublayers: list[Literal["attention", "ffn"]] | None = None
    scaling: float | Literal["learned"] = 1.0
    non_linearity: NonLinearity = "relu"
    train_layernorm: bool | None = None  # default: True for houlsby, else False

    def resolved_sublayers(self) -> list[str]:
        if self.sublayers:
            return list(self.sublayers)
        return ["attention", "ffn"] if self.variant == "houlsby" else ["ffn"]

    def bottleneck(self, hidden_size: int) -> int:
        return self.bottleneck_size or max(1, int(hidden_size // self.reduction_factor))

    def check_fit(self, limits, recipe) -> None:
        """Without ``bottleneck_size``, ``hidden_size // reduction_factor`` must be at least 1 (a
        0-wide bottleneck is no adapter; :meth:`bottleneck` would silently widen it to 1)."""
        super().check_fit(limits, recipe)
        d = limits.hidden_size
        if self.bottleneck_size is None and int(d // self.reduction_factor) < 1:
            raise ValueError(f"reduction_factor={self.reduction_factor:g} gives a 0-wide bottleneck on hidden size "
                             f"{d} (hidden_size // reduction_factor): use reduction_factor <= {d} or set bottleneck_size")


class BottleneckAdapter(nn.Module):
    """``f(x W_down + b) W_up + b`` scaled by ``s`` (and a gate); ``residual`` adds ``x`` (serial use).

    Shapes: ``x`` (B, T, d) -> (B, T, d); ``W_down`` (d, m), ``W_up`` (m, d).
    """

    def __init__(self, hidden_size: int, bottleneck: int, non_linearity: str = "relu",
                 scaling: float | str = 1.0, residual: bool = True, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden_size)
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scaling", torch.tensor(float(scaling)), persistent=False)
        self.residual = residual
        self.gate = gate
        if self.up.weight.device.type != "meta":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x))) * self.scaling
        if self.gate is not None:
            out = out * self.gate(x)
        return x + out if self.residual else out


def make_adapter(model, cfg: AdapterConfig, placement: str, layer: int, gate_key: str | None = None) -> BottleneckAdapter:
    """A new adapter for ``layer`` of ``model``; gated by the component's layer gate (key ``gate_key``,
    default :meth:`autopeft.composition.model.ComposedModel.gate_key`) when ``cfg`` is gated."""
    d = model.encoder.hidden_size
    return BottleneckAdapter(d, cfg.bottleneck(d), cfg.non_linearity, cfg.scaling,
                             residual=placement == "serial", gate=model.layer_gate(cfg, layer, gate_key))


@register("adapter", AdapterConfig, paper="arXiv:1902.00751",
          why_not_peft="peft has no bottleneck adapters (Houlsby / Pfeiffer, serial or parallel)",
          why_not_merge="a bottleneck adapter has a non-linearity and cannot be folded into the backbone's weights")
def apply_adapter(model, cfg: AdapterConfig, name: str = "adapter") -> None:
    """Attach one adapter per selected layer and sublayer; unfreeze LayerNorms for Houlsby."""
    train_ln = cfg.variant == "houlsby" if cfg.train_layernorm is None else cfg.train_layernorm
    for layer in model.layers_of(cfg):
        for which in cfg.resolved_sublayers():
            model.add_adapter(layer, which, cfg.placement, name, make_adapter(model, cfg, cfg.placement, layer),
                              shareable_with=cfg.shares_slots_with)
            if train_ln:
                for p in model.sublayer_norm(layer, which).parameters():
                    p.requires_grad_(True)
