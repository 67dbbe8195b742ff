"""LoRA: low-rank update of frozen Linear weights, mergeable for zero inference cost.

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, eq. (3):
``h = W0 x + (alpha / r) * B A x`` with ``A`` (r, d_in) random (Kaiming-uniform, as peft does) and
``B`` (d_out, r) zero at the start, so training starts from the pretrained function. Merging writes
``W0 + (alpha / r) B A`` into the base weight; unmerging subtracts it again (Hu et al. section 4.2).

Merged weights are for inference only. A merged wrapper (LoRA, QLoRA, UniPELT's LoRA, AdaLoRA: every
:class:`LinearWrapper`) refuses to train: a forward pass in training mode with gradients enabled
raises :class:`MergedAdapterError` (the LoRA branch is folded into the frozen base weight, so nothing
would be trained), and so does an optimiser step on an optimiser from
:func:`autopeft.training.trainer.make_optimizer` (:func:`merged_step_guard`; a step would move ``A``/``B``
away from what was merged, and the next unmerge would subtract the wrong update). Call
:func:`unmerge_lora` before training again.

Trainable parameters per wrapped Linear: ``r * (d_in + d_out)``; gated, + ``d + 1`` per selected
layer: one gate per layer shared by the layer's wrapped Linears, read from the layer's input
(:meth:`autopeft.composition.model.ComposedModel.layer_gate`; UniPELT, arXiv:2110.07577, eq. 1-3).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from autopeft.methods.base import MethodConfig, PeftMapping, PeftTarget, TargetModules, register
from autopeft.errors import AutopeftError


class LoraConfig(MethodConfig):
    """LoRA hyperparameters. Defaults follow the survey's prior: r=8 on W_q and W_v."""

    method: str = "lora"
    r: int = Field(8, ge=1, description="rank of the update B A")
    lora_alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by lora_alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: TargetModules = Field(default_factory=lambda: ["query", "value"])

    def check_fit(self, limits, recipe) -> None:
        """``r`` must not exceed ``min(d_in, d_out)`` of any wrapped matrix (a larger rank adds
        parameters but no rank: ``B A`` has rank at most ``min(d_in, d_out)``)."""
        super().check_fit(limits, recipe)
        check_rank(limits, "r", self.r, self.target_modules)


def check_rank(limits, name: str, r: int, targets) -> None:
    """Raise ``ValueError`` if rank ``r`` (field ``name``) exceeds ``min(d_in, d_out)`` of a target."""
    for target in targets:
        d_in, d_out = limits.linear_shape(target)
        if r > min(d_in, d_out):
            raise ValueError(f"{name}={r} exceeds the rank {min(d_in, d_out)} of the {target} matrix "
                             f"({d_in} x {d_out}) on this backbone: use {name} <= {min(d_in, d_out)}")


class MergedAdapterError(AutopeftError, RuntimeError):
    """A merged adapter was asked to train (see the module docstring): a bug in the caller, not bad input."""

    user_error = False


class NonFiniteMergeError(RuntimeError):
    """``W0 + Delta W`` has a NaN or an infinity (:meth:`LinearWrapper.merged_weight`)."""


class LinearWrapper(nn.Module):
    """Base of the modules that wrap a Linear sublayer, kept as ``base_layer`` (LoRA, AdaLoRA, QLoRA).

    Subclasses give :meth:`delta_weight` (the update ``Delta W``, (d_out, d_in)) and start their
    ``forward`` with ``if self.skip_delta(): return self.base_layer(x)``; merging, unmerging and the
    merged-state guard live here, so every wrapper shares them.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.gate = None

    def delta_weight(self) -> torch.Tensor:
        """The update ``Delta W`` added to ``base_layer.weight`` by :meth:`merge`, (d_out, d_in)."""
        raise NotImplementedError

    def skip_delta(self) -> bool:
        """``True`` when the update is merged (the base layer alone computes ``W0 + Delta W``).

        Raises:
            MergedAdapterError: merged, and called in training mode with gradients enabled.
        """
        if not self.merged:
            return False
        if self.training and torch.is_grad_enabled():
            raise MergedAdapterError(
                f"{type(self).__name__} ({self.in_features}->{self.out_features}) is merged into its base weight and "
                "cannot train: call autopeft.methods.lora.unmerge_lora(model) first (or model.eval() for inference)")
        return True

    def merge(self) -> None:
        """Write the update into ``base_layer.weight`` (``W += Delta W``); for inference only.

        Raises:
            RuntimeError: gated (the gate depends on the input), quantised base, or a non-finite result.
        """
        if self.merged:
            return
        self._check_mergeable()
        try:
            merged = self.merged_weight()
        except NonFiniteMergeError as exc:
            raise NonFiniteMergeError(f"{exc}; the adapter is left unmerged") from None
        self.base_layer.weight.data = merged
        self.merged = True

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W0 + Delta W`` (d_out, d_in), detached, added in float32 and cast once to ``dtype`` (default:
        the base weight's); the base layer is left as it is (already merged: its weight is the sum).
        The one merge formula: :meth:`merge` writes it in place, the merged export
        (:mod:`autopeft.exporting.hf_export`) into a fresh backbone. Hu et al., arXiv:2106.09685, section 4.2.

        Raises:
            NonFiniteMergeError: the result is not finite.
        """
        w = self.base_layer.weight.detach()
        dtype = dtype or w.dtype
        if self.merged:
            return w.to(dtype)
        merged = (w.float() + self.delta_weight().detach().float()).to(dtype)
        if not torch.isfinite(merged).all():
            raise NonFiniteMergeError(f"merging {type(self).__name__} gave non-finite weights")
        return merged

    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W -= Delta W``)."""
        if not self.merged:
            return
        self.base_layer.weight.data -= self.delta_weight().detach().to(self.base_layer.weight.dtype)
        self.merged = False

    def _check_mergeable(self) -> None:
        if self.gate is not None:
            raise RuntimeError(f"a gated {type(self).__name__} cannot be merged: its gate depends on the input")
        if not isinstance(self.base_layer, nn.Linear) or not self.base_layer.weight.dtype.is_floating_point:
            raise RuntimeError(f"cannot merge into a {type(self.base_layer).__name__} base layer "
                               f"({self.base_layer.weight.dtype} weights): dequantise it first")

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def factory_kwargs(self) -> dict:
        """``device`` (and ``dtype`` unless the base is quantised) for new tensors beside the base weight."""
        w = self.base_layer.weight
        return {"device": w.device, **({"dtype": w.dtype} if w.dtype.is_floating_point else {})}


class LoraLinear(LinearWrapper):
    """``y = base_layer(x) + g(x) * (alpha/r) * lora_B(lora_A(dropout(x)))``.

    Shapes: ``x`` (..., d_in) -> (..., d_out). ``g`` is an optional UniPELT gate (B, 1, 1).
    Holds the wrapped Linear as ``base_layer`` (a plain or quantised Linear).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 gate: nn.Module | None = None) -> None:
        super().__init__(base_layer)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        factory = self.factory_kwargs()
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        self.gate = gate
        if base_layer.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) B A``, shape (d_out, d_in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.skip_delta():
            return out
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        if self.gate is not None:
            delta = delta * self.gate(x)
        return out + delta.to(out.dtype)


def lora_peft(cfg: LoraConfig, target: PeftTarget) -> tuple:
    """peft's ``LoraConfig`` over the wrapped modules' full paths; ``A`` and ``B`` copied as they are."""
    import peft

    pc = peft.LoraConfig(task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                         target_modules=sorted(target.wrappers), bias=target.bias)

    def fill(pm) -> None:
        from peft.tuners.lora import LoraLayer

        for name, layer in pm.named_modules():
            if isinstance(layer, LoraLayer):
                ours = target.wrappers.get(name.removeprefix("base_model.model."))
                layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
                layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return pc, fill, []


@register("lora", LoraConfig, paper="arXiv:2106.09685", merges=True,
          peft=PeftMapping(lora_peft, carries_bias=True, label="LoRA"))
def apply_lora(model, cfg: LoraConfig) -> None:
    """Wrap every ``target_modules`` Linear of every selected layer in a :class:`LoraLinear`."""
    for layer in model.layers_of(cfg):
        for target in cfg.target_modules:
            model.wrap_linear(layer, target, lambda base: LoraLinear(
                base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, model.layer_gate(cfg, layer)))


def merge_lora(model) -> int:
    """Merge every :class:`LinearWrapper` of ``model`` (LoRA, QLoRA, UniPELT's LoRA, AdaLoRA) for inference.

    ``W <- W0 + Delta W`` (Hu et al., arXiv:2106.09685, section 4.2): no extra latency. The merged
    model cannot train (:class:`MergedAdapterError`) until :func:`unmerge_lora`. Returns how many
    wrappers were merged.

    Raises:
        RuntimeError: a wrapper is gated or sits on a quantised base layer (see ``LinearWrapper.merge``).
    """
    wrappers = [m for m in model.modules() if isinstance(m, LinearWrapper)]
    for m in wrappers:
        m.merge()
    return len(wrappers)


def unmerge_lora(model) -> int:
    """Unmerge every merged :class:`LinearWrapper` of ``model``; returns how many."""
    wrappers = [m for m in model.modules() if isinstance(m, LinearWrapper) and m.merged]
    for m in wrappers:
        m.unmerge()
    return len(wrappers)


def merged_step_guard(model):
    """An optimiser step pre-hook (``optimizer.register_step_pre_hook``) that refuses to step a model
    with merged wrappers.

    Raises (when the optimiser steps):
        MergedAdapterError: a :class:`LinearWrapper` of ``model`` is merged; names the first one.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWrapper)]

    def hook(optimizer, args, kwargs) -> None:
        for name, m in wrappers:
            if m.merged:
                raise MergedAdapterError(f"{name} is merged into its base weight: call "
                                         "autopeft.methods.lora.unmerge_lora(model) before an optimiser step")

    return hook
