"""Prefix attention: a layer's self-attention with learned key/value vectors prepended (prefix tuning,
P-Tuning v2, MAM, UniPELT); :meth:`autopeft.composition.model.ComposedModel.attention` installs it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.composition.gates import GateHandle


class PrefixAttention(nn.Module):
    """Self-attention with learned key/value vectors prepended (Li & Liang 2021, arXiv:2101.00190).

    ``head_i = Attn(x W_q, [P_k; x W_k], [P_v; x W_v])`` (He et al. 2022, arXiv:2110.04366, eq. 5).
    Wraps the backbone's own attention module and pads the attention mask so every query sees every
    prefix slot. Two styles (:attr:`autopeft.backbones.arch.Family.prefix_style`):

    * ``recompute`` (BERT family, DistilBERT): recomputes the attention from the module's own
      query/key/value Linears (``qkv_names``; possibly LoRA-wrapped), attention kernel and, where the
      module holds it, output projection ``out_proj``;
    * ``cache`` (GPT-2, Llama, Mistral, Qwen2): runs the module's own forward (rotary embeddings,
      grouped-query heads) and hands the prefix in as its key/value cache, as peft's prefix tuning
      does through ``past_key_values``: keys are not rotated, real tokens see every prefix slot.

    Shapes: ``hidden_states`` (B, T, d); each source returns ``(P_k, P_v)`` of (B, kv_heads, P, head_dim).
    """

    def __init__(self, base: nn.Module, style: str = "recompute", qkv_names: tuple[str, str, str] = ("query", "key", "value"),
                 out_proj: str | None = None) -> None:
        super().__init__()
        self.base = base
        self.style, self.qkv_names, self.out_proj = style, tuple(qkv_names), out_proj
        self._sources: list[tuple[Callable[[int], tuple[torch.Tensor, torch.Tensor]], GateHandle | None]] = []

    def add_source(self, source: Callable[[int], tuple[torch.Tensor, torch.Tensor]], gate: GateHandle | None) -> None:
        """Prepend ``source(B) -> (P_k, P_v)``, scaled by ``gate`` (a layer gate, see :class:`LayerGates`) if given."""
        self._sources.append((source, gate))

    def _prefixes(self, hidden_states: torch.Tensor, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for source, gate in self._sources:
            pk, pv = source(hidden_states.shape[0])  # (B, H_kv, P, hd) each
            if gate is not None:
                g = gate(hidden_states)[:, :, :, None]  # (B, 1, 1, 1)
                pk, pv = pk * g, pv * g
            keys.append(pk.to(dtype))
            values.append(pv.to(dtype))
        return keys, values

    @staticmethod
    def _pad_mask(attention_mask: torch.Tensor | None, n_prefix: int, t: int, dtype: torch.dtype,
                  device: torch.device, causal: bool) -> torch.Tensor | None:
        """The attention mask with ``n_prefix`` always-visible key columns in front: (B|1, 1, T, P+T).

        A missing mask means "no padding" (with causal masking for decoders left to the kernel); as
        the kernel cannot infer causality once keys outnumber queries, an explicit additive mask is
        built then."""
        if attention_mask is not None:
            fill = True if attention_mask.dtype == torch.bool else 0.0
            return F.pad(attention_mask, (n_prefix, 0), value=fill)
        if not causal:
            return None
        mask = torch.full((t, n_prefix + t), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[:, :n_prefix] = 0.0
        mask[:, n_prefix:] = torch.triu(mask[:, n_prefix:], diagonal=1)
        return mask[None, None]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.style == "cache":
            return self._forward_cache(hidden_states, *args, **kwargs)
        return self._forward_recompute(hidden_states, *args, **kwargs)

    def _forward_cache(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = self._prefixes(hidden_states, hidden_states.dtype)
        if not keys:
            return self.base(hidden_states, *args, **kwargs)
        n_prefix = sum(x.shape[2] for x in keys)
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = self._pad_mask(mask, n_prefix, hidden_states.shape[1], hidden_states.dtype,
                                                  hidden_states.device, causal=True)
        kwargs.pop("past_key_values", None)
        kwargs["cache"] = _PrefixCache(torch.cat(keys, dim=2), torch.cat(values, dim=2))
        kwargs.pop("use_cache", None)
        return self.base(hidden_states, *args, **kwargs)

    def _forward_recompute(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           *args: Any, **kwargs: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        b = self.base
        bsz, t = hidden_states.shape[:2]
        shape = (bsz, t, -1, b.attention_head_size)
        qn, kn, vn = self.qkv_names
        q = getattr(b, qn)(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, hd)
        k = getattr(b, kn)(hidden_states).view(shape).transpose(1, 2)
        v = getattr(b, vn)(hidden_states).view(shape).transpose(1, 2)
        keys, values = self._prefixes(hidden_states, k.dtype)
        n_prefix = sum(x.shape[2] for x in keys)
        if n_prefix:
            k = torch.cat(keys + [k], dim=2)
            v = torch.cat(values + [v], dim=2)
            attention_mask = self._pad_mask(attention_mask, n_prefix, t, k.dtype, k.device, causal=False)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(b.config._attn_implementation, eager_attention_forward)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        out, weights = interface(
            b, q, k, v, attention_mask,
            dropout=0.0 if not self.training else b.dropout.p, scaling=b.scaling, **kwargs,
        )
        out = out.reshape(bsz, t, -1).contiguous()
        if self.out_proj is not None:
            out = getattr(b, self.out_proj)(out)
        return out, weights


class _PrefixCache:
    """A stand-in for a transformers ``Cache`` holding one layer's prefix: ``update(k, v, ...)``
    returns ``([P_k; k], [P_v; v])`` along the sequence axis (dim 2), as a cache of P past tokens
    would. Shapes: ``P_k``, ``P_v`` (B, kv_heads, P, head_dim)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=2))

    def get_seq_length(self, *args: Any) -> int:
        return int(self.keys.shape[2])
