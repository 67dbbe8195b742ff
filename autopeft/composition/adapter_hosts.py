"""Adapter hosts: the modules that replace a residual sublayer to hold its serial and parallel adapters
(and AdapterFusion over them); :meth:`autopeft.composition.model.ComposedModel.add_adapter` installs them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _AdapterHost(nn.Module):
    """What every adapter host holds and does: ``serial`` and ``parallel`` adapters, an optional
    ``fusion`` over the serial ones, and the ``active`` switch of AdapterDrop.

    :meth:`adapt` maps a sublayer output ``h`` (B, T, d), given the sublayer's input ``x`` (B, T, d),
    to ``serial_k(...serial_1(h + sum_j parallel_j(x)))`` (or ``fusion(h + ..., x, serial)``).
    Serial adapters: Houlsby et al. 2019, arXiv:1902.00751, fig. 2; parallel: He et al. 2022,
    arXiv:2110.04366, eq. 8.
    """

    #: Methods recognise an adapter host by this flag (``getattr(module, "adapter_host", False)``), so
    #: they need not import this module.
    adapter_host = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.serial = nn.ModuleDict()
        self.parallel = nn.ModuleDict()
        self.fusion: nn.Module | None = None
        self.active = True  # AdapterDrop switches whole slots off

    def adapt(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return h
        for adapter in self.parallel.values():
            h = h + adapter(x)
        if self.fusion is not None:
            return self.fusion(h, x, list(self.serial.values()))
        for adapter in self.serial.values():
            h = adapter(h)
        return h


class SublayerOutput(_AdapterHost):
    """Replaces a BERT ``*Output`` block (``LN(dropout(dense(h)) + x)``) to host adapters.

    ``out = LN(serial_k(...serial_1(dropout(dense(h)) + sum_j parallel_j(x))) + x)`` where ``h`` is
    the sublayer's inner activation (B, T, d_in) and ``x`` its residual input (B, T, d).
    Serial adapters transform the running output (Houlsby et al. 2019, arXiv:1902.00751, fig. 2);
    parallel adapters read ``x`` and add to the output (He et al. 2022, arXiv:2110.04366, eq. 8).
    An optional ``fusion`` module replaces the serial chain by attention over several adapters.
    """

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.adapt(self.base.dropout(self.base.dense(hidden_states)), input_tensor)
        return self.base.LayerNorm(h + input_tensor)


class SublayerModule(_AdapterHost):
    """Hosts adapters on a sublayer module whose residual add happens outside it (DistilBERT, GPT-2,
    Llama-family blocks): ``out = serial_k(...serial_1(f(x) + sum_j parallel_j(x)))``.

    ``f`` is the wrapped attention or FFN module, ``x`` (B, T, d) its input (after the pre-norm in
    pre-LN models), ``f(x)`` (B, T, d) its output (the first element when ``f`` returns a tuple, which
    is passed on with the rest unchanged). Serial adapters transform the sublayer output before the
    residual (Houlsby et al. 2019, arXiv:1902.00751, fig. 2); parallel adapters read the sublayer's
    input and add to its output (He et al. 2022, arXiv:2110.04366, eq. 8). Same attributes as
    :class:`SublayerOutput` (``serial``, ``parallel``, ``fusion``, ``active``).
    """

    def forward(self, *args: Any, **kwargs: Any):
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapt(out[0], x), *out[1:])
        return self.adapt(out, x)


ADAPTER_HOSTS = (SublayerOutput, SublayerModule)
