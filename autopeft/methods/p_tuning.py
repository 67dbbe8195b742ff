"""P-Tuning: trainable continuous prompt embeddings at the input, produced by a prompt encoder.

Source: Liu et al., "GPT Understands, Too", arXiv:2103.10385, section 3 (P-tuning): the template
``{h_0..h_i, e(x), h_{i+1}..h_m, ...}`` replaces discrete prompt tokens by continuous embeddings
``h_i``, which are reparametrised by a prompt encoder to make them depend on each other
(section 3.2, "Optimization"):

    h_i = MLP([h->_i ; h<-_i]) = MLP([LSTM(h_{0:i}) ; LSTM(h_{i:m})])

i.e. a bidirectional LSTM over the learned prompt embeddings followed by a ReLU two-layer MLP.
Only the input layer changes; the transformer layers are untouched (compare P-Tuning v2,
:mod:`autopeft.methods.p_tuning_v2`, which puts prompts in every layer).

Layout (names and shapes) is that of Hugging Face peft's ``PromptEncoder`` so weights can be
copied across (``state_dict`` keys ``embedding.weight``, ``lstm_head.*``, ``mlp_head.*``):

* ``lstm``: ``Embedding(P, d)`` -> ``LSTM(d, h, num_layers=n, bidirectional=True)`` ->
  ``Linear(2h, 2h)`` -> ReLU -> ``Linear(2h, d)``;
* ``mlp``: ``Embedding(P, d)`` -> ``Linear(d, h)`` -> ReLU -> ``Linear(h, h)`` -> ReLU -> ``Linear(h, d)``
  (peft's "MLP" reparametrisation, recommended there; not in the paper).

Trainable parameters (``P`` virtual tokens, width ``d``, encoder width ``h``, ``n`` LSTM layers):

* ``lstm``: ``P d + 2 [4h(d + h) + 8h] + (n - 1) 2 [4h(2h + h) + 8h] + (4h^2 + 2h) + (2h d + d)``;
* ``mlp``:  ``P d + (d h + h) + (h^2 + h) + (h d + d)``.

The whole encoder trains; at inference only its output, a (P, d) table, is needed.

The prompt is one contiguous block inserted after the first ``position`` input tokens:
``position: 0`` prepends it before ``[CLS]`` as peft does; ``position: 1`` puts it right after
``[CLS]`` (the paper places prompt tokens around the input according to a template; a single
block is the common setting for classification). The inserted tokens get attention mask 1 and
token type 0; position ids run over the extended sequence, so ``T + P`` must not exceed the
backbone's ``max_position_embeddings``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from autopeft.backbones.arch import is_causal
from autopeft.methods.base import MethodConfig, PeftMapping, PeftTarget, register

_DEFAULT_LAYERS = 2


class PTuningConfig(MethodConfig):
    """P-Tuning hyperparameters.

    ``encoder_hidden_size`` (h) defaults to ``d // 2`` for ``lstm`` (so the bidirectional LSTM's
    output is ``d`` wide, as in the authors' code) and to ``d`` for ``mlp``.
    ``encoder_num_layers`` and ``encoder_dropout`` (between LSTM layers) apply to ``lstm`` only.

    Raises (at validation, as ``ValueError``): ``layers`` other than ``all`` (P-Tuning acts on the
    input only), ``gated: true`` (an input prompt has no hidden state to gate on), or
    ``encoder_num_layers`` / ``encoder_dropout`` set for ``mlp``.
    """

    method: str = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="prompt length P")
    encoder_reparameterization_type: Literal["lstm", "mlp"] = "lstm"
    encoder_hidden_size: int | None = Field(None, ge=1, description="prompt-encoder width h")
    encoder_num_layers: int = Field(_DEFAULT_LAYERS, ge=1, description="LSTM layers")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="dropout between LSTM layers")
    position: int = Field(0, ge=0, description="insert the prompt after this many input tokens")

    @field_validator("encoder_reparameterization_type", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v  # accept peft's spelling LSTM / MLP

    @model_validator(mode="after")
    def _check(self):
        if self.layers != "all":
            raise ValueError("p_tuning acts on the input embeddings only and takes no 'layers'; "
                             "use p_tuning_v2 for prompts in chosen layers")
        if self.gated:
            raise ValueError("p_tuning cannot be gated: its prompt is inserted before any hidden state exists")
        if self.encoder_reparameterization_type == "mlp" and (
                self.encoder_num_layers != _DEFAULT_LAYERS or self.encoder_dropout):
            raise ValueError("encoder_num_layers and encoder_dropout apply to the lstm prompt encoder only")
        return self

    def input_tokens(self) -> int:
        """The prompt's P virtual tokens take input positions (``T + P <= positions``)."""
        return self.num_virtual_tokens

    def check_fit(self, limits, recipe) -> None:
        """``position`` must lie inside the input (below ``training.max_seq_length``); the length
        limit ``max_seq_length + P <= positions`` is checked over all components by
        :func:`autopeft.composition.recipe.check_recipe`."""
        super().check_fit(limits, recipe)
        t = recipe.training.max_seq_length
        if self.position >= t:
            raise ValueError(f"position={self.position} is beyond the input: inputs have at most "
                             f"training.max_seq_length={t} tokens; use position < {t}")

    def hidden_size(self, d: int) -> int:
        """The encoder width h for a backbone of width ``d``."""
        if self.encoder_hidden_size is not None:
            return self.encoder_hidden_size
        return max(1, d // 2) if self.encoder_reparameterization_type == "lstm" else d


class PromptEncoder(nn.Module):
    """P-Tuning prompt encoder: ``forward(B)`` -> prompt embeddings (B, P, d).

    Args:
        num_virtual_tokens: P.
        token_dim: d, the backbone's embedding width.
        encoder_hidden_size: h.
        kind: ``lstm`` (paper, arXiv:2103.10385 section 3.2) or ``mlp`` (peft).
        num_layers, dropout: of the LSTM.

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder_hidden_size: int,
                 kind: str = "lstm", num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_virtual_tokens, self.token_dim, self.kind = num_virtual_tokens, token_dim, kind
        h = encoder_hidden_size
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=h, num_layers=num_layers,
                                     dropout=dropout if num_layers > 1 else 0.0, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))
        else:
            raise ValueError(f"unknown prompt encoder {kind!r}; valid: lstm, mlp")

    def prompts(self) -> torch.Tensor:
        """The prompt embeddings ``h_0..h_{P-1}``, shape (P, d)."""
        x = self.embedding.weight.unsqueeze(0)  # (1, P, d)
        if self.kind == "lstm":
            # outside autocast, in float32: oneDNN has no bf16 LSTM on CPUs (and the encoder is tiny)
            with torch.autocast(x.device.type, enabled=False):
                x = self.lstm_head(x.float())[0]  # (1, P, 2h): [forward state; backward state] per position
        return self.mlp_head(x)[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        # The prompt does not depend on the input: compute it once, share it over the batch.
        return self.prompts().unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, d)


def p_tuning_peft_check(cfg: PTuningConfig, backbone_config: Callable[[], Any]) -> str | None:
    """Why peft's ``PromptEncoderConfig`` cannot hold ``cfg`` exactly, or ``None``."""
    if is_causal(backbone_config()):
        return ("p_tuning on a decoder-only backbone: peft feeds the prompt as inputs_embeds, and transformers then "
                "cannot find the last real token of a padded sequence")
    if cfg.position != 0:
        return f"p_tuning inserts its prompt after {cfg.position} tokens, peft prepends it (position 0)"
    return None


def p_tuning_peft(cfg: PTuningConfig, target: PeftTarget) -> tuple:
    """peft's ``PromptEncoderConfig`` (the prompt at position 0, as peft prepends it); the encoder copied."""
    import peft

    enc = next(m for m in target.extras.values() if isinstance(m, PromptEncoder))
    d = target.model.encoder.hidden_size
    kind = cfg.encoder_reparameterization_type
    pc = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=cfg.num_virtual_tokens,
                                  encoder_hidden_size=cfg.hidden_size(d), encoder_reparameterization_type=kind.upper(),
                                  encoder_num_layers=cfg.encoder_num_layers, encoder_dropout=cfg.encoder_dropout)

    def fill(pm) -> None:
        pm.prompt_encoder["default"].load_state_dict(enc.state_dict())
    return pc, fill, []


@register("p_tuning", PTuningConfig, paper="arXiv:2103.10385",
          peft=PeftMapping(p_tuning_peft, p_tuning_peft_check, label="P-Tuning"),
          why_not_merge="an input prompt lengthens the sequence, no weight to fold it into")
def apply_p_tuning(model, cfg: PTuningConfig) -> None:
    """Add a :class:`PromptEncoder` whose output is inserted after ``cfg.position`` input tokens.

    A recipe-level ``gating: true`` leaves this component ungated (see :class:`PTuningConfig`).

    Raises:
        CompositionError: another component already inserts an input prompt.
    """
    d = model.encoder.hidden_size
    device = model.backbone.get_input_embeddings().weight.device  # "meta" when only counting
    with torch.device(device):
        enc = PromptEncoder(cfg.num_virtual_tokens, d, cfg.hidden_size(d), cfg.encoder_reparameterization_type,
                            cfg.encoder_num_layers, cfg.encoder_dropout)
    model.add_input_prompt(enc, cfg.position)  # claims the input-prompt slot first
    model.extras[f"p_tuning_{len(model.components)}"] = enc
