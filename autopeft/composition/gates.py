"""UniPELT gates: one gate per gated component and transformer layer, read from the layer's input.

Mao et al. 2022, "UniPELT", arXiv:2110.07577, eq. 1-3: ``G = sigmoid(W_G x)`` averaged over the
sequence. :meth:`autopeft.composition.model.ComposedModel.layer_gate` installs a layer's
:class:`LayerGates` and hands each gated module a :class:`GateHandle`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Gate(nn.Module):
    """UniPELT gate: ``G = mean_t sigmoid(W_G x_t + b)``, one scalar per example.

    Source: Mao et al., "UniPELT", arXiv:2110.07577, eq. (1)-(3); the mean over the sequence
    follows the authors' code and AdapterHub. Shapes: ``x`` (B, T, d) -> (B, 1, 1), where ``x`` is
    the input hidden state of the gate's transformer layer (gates live in :class:`LayerGates`).
    The last value (batch mean) is kept in ``last_value`` so users can see what the gate chose.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        self.last_value: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(x)).mean(dim=1, keepdim=True)  # (B, 1, 1)
        self.last_value = float(g.detach().mean())
        return g


class LayerGates(nn.Module):
    """The UniPELT gates of one transformer layer: one :class:`Gate` per gated component.

    Mao et al., arXiv:2110.07577, section 3.2 and eq. (1)-(3): each sub-method ``m`` of a layer gets
    one gate ``G_m = sigmoid(W_m x)`` (``G_P``, ``G_L``, ``G_A``), where ``x`` (B, T, d) is the
    layer's input hidden state. Installed as ``encoder.layer[i].peft_gates`` by
    :meth:`ComposedModel.layer_gate`; a forward pre-hook on the layer records ``x``, and each gate is
    evaluated at most once per layer forward (:meth:`value`), so a component that wraps several
    matrices of the layer (LoRA on W_q and W_v, Houlsby's two adapters) scales all of them by the
    same (B, 1, 1) value. Between forward passes it holds only the last input (see :meth:`release`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleDict()
        self._input: torch.Tensor | None = None
        self._values: dict[str, torch.Tensor] = {}

    def capture(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the layer: remember its input hidden states (B, T, d)."""
        self._input = args[0] if args else kwargs.get("hidden_states")
        self._values = {}

    def release(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of the layer: drop the gate values. The input is kept until the next forward:
        a gradient-checkpointed layer is recomputed in the backward pass without its hooks
        (transformers keeps module hooks outside the checkpoint), and the recomputation evaluates
        the gates again on that same input."""
        self._values = {}

    def value(self, key: str) -> torch.Tensor:
        """Gate ``key`` on the current layer input: (B, 1, 1).

        Raises:
            RuntimeError: called outside the forward pass of this gate's layer.
        """
        if key not in self._values:
            if self._input is None:
                raise RuntimeError(f"gate {key!r} read outside the forward pass of its transformer layer")
            self._values[key] = self.gates[key](self._input)
        return self._values[key]


class GateHandle:
    """What a gated module holds: ``handle(x)`` -> its component's gate value (B, 1, 1) for this layer.

    The argument is ignored: every gate reads the layer's input (see :class:`LayerGates`). Not an
    ``nn.Module``, so the shared :class:`Gate` is registered (and counted, and saved) once, in the
    layer's ``peft_gates``.
    """

    def __init__(self, host: LayerGates, key: str) -> None:
        self.host, self.key = host, key

    @property
    def module(self) -> Gate:
        """The shared :class:`Gate`."""
        return self.host.gates[self.key]

    def __call__(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.host.value(self.key)

    def __repr__(self) -> str:
        return f"GateHandle({self.key!r})"
