"""Prefix Tuning: trainable key/value vectors prepended in every layer's self-attention.

Source: Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190, section 4.3 and eq. (5): ``P_theta[i,:] = MLP_theta(P'_theta[i,:])`` - the prefix
is produced by an MLP from a smaller matrix during training (reparametrisation for stability);
after training only ``P_theta`` is kept (:func:`PrefixEncoder.freeze_to_table`). The attention
then reads ``Attn(x W_q, [P_k; x W_k], [P_v; x W_v])`` (He et al., arXiv:2110.04366, eq. 5).

Layout as in Hugging Face peft's ``PrefixEncoder``: ``Embedding(P, d)`` -> ``Linear(d, h)`` ->
``tanh`` -> ``Linear(h, L * 2 * d)``. Trainable parameters: ``P d + d h + h + h 2 L d + 2 L d``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from autopeft.methods.base import MethodConfig, PeftMapping, PeftTarget, register


class PrefixTuningConfig(MethodConfig):
    """``num_virtual_tokens`` is the prefix length P; ``encoder_hidden_size`` is the MLP width h."""

    method: str = "prefix_tuning"
    num_virtual_tokens: int = Field(10, ge=1)
    encoder_hidden_size: int = Field(64, ge=1)
    prefix_projection: bool = True
    prefix_dropout: float = Field(0.0, ge=0, lt=1)


class PrefixEncoder(nn.Module):
    """Produces per-layer prefixes; ``forward(B)`` -> (L, 2, B, heads, P, head_dim).

    With ``projection`` the table is reparametrised by the MLP (prefix tuning); without, the table
    ``(P, L*2*d)`` is itself trained (P-Tuning v2, arXiv:2110.07602 section 3.2).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, hidden_size: int, num_heads: int,
                 projection: bool, encoder_hidden_size: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.p, self.l, self.d, self.h = num_virtual_tokens, num_layers, hidden_size, num_heads
        out = num_layers * 2 * hidden_size
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
            self.transform = nn.Sequential(
                nn.Linear(hidden_size, encoder_hidden_size), nn.Tanh(), nn.Linear(encoder_hidden_size, out))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)
        self.dropout = nn.Dropout(dropout)
        self._cache: tuple[int, torch.Tensor] | None = None

    def table(self) -> torch.Tensor:
        """The prefix table ``P_theta``, shape (P, L * 2 * d)."""
        w = self.embedding.weight
        return self.transform(w) if self.projection else w

    def freeze_to_table(self) -> None:
        """Replace the MLP by the table it produces (Li & Liang section 4.3): same outputs, fewer tensors."""
        if not self.projection:
            return
        table = self.table().detach()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False)
        del self.transform
        self.projection = False

    def adapt_to_saved(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Called by :func:`autopeft.training.saved.load_trained` before loading ``tensors``: if they hold the
        table of an encoder saved after :meth:`freeze_to_table` (``<prefix>embedding.weight`` of shape
        (P, L * 2 * d), no MLP), freeze this one to a table too, so the saved tensors fit."""
        table = tensors.get(prefix + "embedding.weight")
        if (self.projection and table is not None and tuple(table.shape) == (self.p, self.l * 2 * self.d)
                and not any(k.startswith(prefix + "transform.") for k in tensors)):
            self.freeze_to_table()

    def forward(self, batch_size: int) -> torch.Tensor:
        t = self.dropout(self.table())  # (P, L*2*d)
        t = t.view(self.p, self.l, 2, self.h, self.d // self.h).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, hd)
        return t.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)  # (L, 2, B, H, P, hd)


class _LayerSource:
    """Callable handed to ``ComposedModel.add_prefix``: layer ``index``'s slice of the encoder's output."""

    def __init__(self, encoder: PrefixEncoder, index: int) -> None:
        self.encoder, self.index = encoder, index

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(batch_size)[self.index]  # (2, B, H, P, hd)
        return out[0], out[1]


def attach_prefixes(model, cfg, projection: bool, name: str) -> PrefixEncoder:
    """Build a :class:`PrefixEncoder` for the selected layers and hook each into its attention."""
    layers = model.layers_of(cfg)
    # Keys/values are kv_heads * head_dim wide (grouped-query attention: fewer than the query heads), as
    # peft sizes its prefix for such models.
    enc = PrefixEncoder(cfg.num_virtual_tokens, len(layers), model.encoder.kv_width, model.encoder.num_kv_heads,
                        projection, getattr(cfg, "encoder_hidden_size", 0), getattr(cfg, "prefix_dropout", 0.0))
    model.extras[name] = enc
    for i, layer in enumerate(layers):
        model.add_prefix(layer, _LayerSource(enc, i), model.layer_gate(cfg, layer), num_tokens=cfg.num_virtual_tokens)
    return enc


#: Model types whose transformers attention takes no key/value cache: peft cannot give them prefixes.
NO_CACHE_MODEL_TYPES = ("distilbert",)
#: Why prefixes cannot be merged into the backbone's weights.
WHY_PREFIX_NOT_MERGED = "prefixes add attention keys/values, no weight to fold them into"


def prefix_peft_check(cfg, backbone_config: Callable[[], Any]) -> str | None:
    """Why peft's prefix tuning cannot hold prefix component ``cfg`` exactly, or ``None``."""
    model_type = str(getattr(backbone_config(), "model_type", ""))
    if model_type in NO_CACHE_MODEL_TYPES:
        return (f"{cfg.method} on {model_type}: its transformers attention takes no key/value cache, so peft "
                "cannot feed it prefixes")
    if cfg.layers != "all":
        return f"{cfg.method} on layers {cfg.layers}: peft's prefix tuning puts a prefix in every layer"
    return None


def prefix_peft(cfg, target: PeftTarget) -> tuple:
    """peft's ``PrefixTuningConfig(prefix_projection=False)`` holding the prefix table; a prefix MLP is
    folded into its table first (Li & Liang, sec. 4.3), as peft itself saves it."""
    import peft

    enc = next(m for m in target.extras.values() if isinstance(m, PrefixEncoder))
    pc = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=cfg.num_virtual_tokens,
                                 prefix_projection=False)

    def fill(pm) -> None:
        pm.prompt_encoder["default"].embedding.weight.copy_(enc.table())
    positions = "" if target.model.family.causal else " and `position_ids=arange(T)`"
    notes = ["peft 0.21's PeftModel.forward refuses prefix tuning with transformers 5 (it looks for a "
             "`past_key_values` argument, renamed `cache`); run the base model with "
             f"`cache=model.get_prompt(B)`, an attention mask extended by the prefix length{positions} "
             "(autopeft.exporting.hf_export.peft_logits) to get autopeft's logits."]
    if enc.projection:
        notes.append("The prefix MLP is folded into its table (Li & Liang 2021, sec. 4.3), as peft saves it.")
    return pc, fill, notes


#: The peft form of prefix tuning and P-Tuning v2.
PREFIX_PEFT = PeftMapping(prefix_peft, prefix_peft_check, label="prefix tuning")


@register("prefix_tuning", PrefixTuningConfig, paper="arXiv:2101.00190", peft=PREFIX_PEFT, needs=("prefix",),
          why_not_merge=WHY_PREFIX_NOT_MERGED)
def apply_prefix_tuning(model, cfg: PrefixTuningConfig) -> None:
    """Prefix tuning with the MLP reparametrisation (``prefix_projection: false`` trains the table)."""
    attach_prefixes(model, cfg, cfg.prefix_projection, f"prefix_tuning_{len(model.components)}")
