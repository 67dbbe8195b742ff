"""Composition: one combined model from any set of method components (UniPELT style).

This is the one place where methods meet. :class:`ComposedModel` wraps a frozen Hugging Face
sequence-classification backbone and offers the method modules four attachment points:

* ``wrap_linear``  - replace a Linear sublayer (query/key/value/attention_output/ffn_in/ffn_out)
  with a wrapper holding it as ``base_layer`` (LoRA, AdaLoRA, QLoRA);
* ``add_adapter``  - a bottleneck module after a residual sublayer, ``serial`` (on the sublayer's
  output) or ``parallel`` (on the sublayer's input, added to its output) (Adapter, MAM, UniPELT);
* ``add_prefix``   - key/value vectors prepended in a layer's self-attention (Prefix Tuning,
  P-Tuning v2, MAM, UniPELT);
* ``add_input_prompt`` - virtual token embeddings inserted into the input sequence (P-Tuning);

plus optional per-component gates ``G = sigmoid(W_G x)`` averaged over the sequence, as in UniPELT
(Mao et al. 2022, arXiv:2110.07577, eq. 1-3) - one gate per gated component and layer, read from the
layer's input hidden states and shared by every module the component puts in that layer
(:meth:`ComposedModel.layer_gate`) - and hooks for methods that act during training
(``add_regularizer`` for extra loss terms, ``add_step_hook`` called after every optimiser step).

Every slot can be claimed once; a second claim by another component is a :class:`CompositionError`
at build time, naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.backbones.arch import Encoder
from autopeft.backbones.precision import autocast
from autopeft.errors import CompositionError  # noqa: F401  (re-exported: its old home)
# The gates, adapter hosts and prefix attention have modules of their own; their names stay here too.
from autopeft.composition.adapter_hosts import ADAPTER_HOSTS, SublayerModule, SublayerOutput, _AdapterHost  # noqa: F401
from autopeft.composition.gates import Gate, GateHandle, LayerGates  # noqa: F401
from autopeft.composition.prefix import PrefixAttention, _PrefixCache  # noqa: F401

#: Top-level modules of a ``*ForSequenceClassification`` that form the task head (trainable, outside
#: the budget): BERT/RoBERTa ``classifier``, decoders' ``score``, DistilBERT's ``pre_classifier``,
#: DeBERTa's ``pooler`` (a ContextPooler that pretrained checkpoints do not hold). BERT's own pooler
#: lives at ``bert.pooler`` and stays part of the backbone.
HEAD_MODULE_NAMES = ("classifier", "score", "pre_classifier", "pooler")
#: How the sequence becomes one vector for the task head (``Recipe.pooling``):
#: ``pooler`` the backbone's own head input (BERT: frozen ``tanh(W h_[CLS])``; RoBERTa/ELECTRA: their
#: head on the first token), ``cls`` the last hidden state of the first token, ``mean`` the masked mean
#: of the last hidden states (how sentence-transformers such as all-MiniLM-L6-v2 were trained:
#: Reimers & Gurevych 2019, arXiv:1908.10084, sec. 3).
#: ``last``: the last non-padding token (decoders; what their own head reads, so ``pooler`` means the
#: same there).
POOLINGS = ("pooler", "cls", "mean", "last")


@dataclass
class InputPrompt:
    """Virtual tokens for the input layer: ``module(B)`` gives (B, P, d); inserted after ``position`` tokens."""

    module: nn.Module
    position: int


class ComposedModel(nn.Module):
    """A frozen backbone plus any set of PEFT components; the task head stays trainable.

    (Named ``PeftModel`` before 2026-12: it was renamed so it cannot be mistaken for ``peft.PeftModel``,
    which the exported folders load into; the old name still imports, with a ``DeprecationWarning``.)

    Args:
        backbone: a Hugging Face ``*ForSequenceClassification`` of a family in
            :data:`autopeft.backbones.arch.FAMILIES` (BERT, RoBERTa, DistilBERT, DeBERTa-v2, GPT-2, Llama, ...).
        gating: default for components whose config leaves ``gated`` unset.
        pooling: one of :data:`POOLINGS`; the head's parameters are the same for each (the classifier
            stays trainable and outside the budget).

        read_folder: ``read_folder(path, with_tensors, kind) -> TrainedFolder``: how the model reads a
            trained folder a component names (AdapterFusion's stage-one adapters); handed in by the edge
            that builds it (:func:`autopeft.composition.recipe.build_model` passes :func:`autopeft.composition.recipe.read_trained_folder`).

    Raises:
        CompositionError: unknown ``pooling``.

    Attributes:
        backbone_params: parameters of the backbone without the task head, counted before any
            change (the denominator of ``trainable_percent``).
    """

    def __init__(self, backbone: nn.Module, gating: bool = False, pooling: str = "pooler",
                 read_folder: Callable[[str, bool, str], Any] | None = None) -> None:
        super().__init__()
        self._read_folder = read_folder
        if pooling not in POOLINGS:
            raise CompositionError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.backbone = backbone
        self.encoder = Encoder.of(backbone)
        if self.encoder.family.causal and pooling == "cls":
            raise CompositionError("pooling 'cls' reads the first token, which sees only itself in a causal "
                                   f"{self.encoder.family.name} model: use pooler (its last token) or mean")
        self._prefix_tokens = 0
        self.gating = gating
        #: autocast dtype of :meth:`forward` (``None``: no autocast); set by the trainer from the precision.
        self.compute_dtype: torch.dtype | None = None
        self.extras = nn.ModuleDict()  # model-level method modules (prefix encoders, prompt encoders, ...)
        self.backbone_params = sum(_numel(p) for n, p in backbone.named_parameters() if not _is_head(n))
        #: True when the backbone holds 4-bit NF4 weights (QLoRA); ``make_optimizer`` then pages on CUDA.
        self.quantized = bool(getattr(backbone, "autopeft_quantized", False))
        self._claims: dict[tuple, str] = {}
        self._owner = "user"
        self._input_prompts: list[InputPrompt] = []
        self._regularizers: list[Callable[[], torch.Tensor]] = []
        self._step_hooks: list[Callable[[int], None]] = []
        self.components: list[Any] = []
        for name, p in backbone.named_parameters():
            p.requires_grad_(_is_head(name))

    # ----- building -------------------------------------------------------------------------
    def add_component(self, config: Any) -> None:
        """Apply one method component (a ``MethodConfig``) to this model.

        Afterwards every module is in the model's mode (``self.training``), the new ones included.

        Raises:
            CompositionError: it claims a slot another component holds, or does not fit the model.
        """
        from autopeft.methods.base import get_method

        spec = get_method(config.method)
        self._owner = f"{config.method}#{len(self.components)}"
        device = next(self.backbone.parameters()).device
        try:
            with torch.device(device):  # new modules live where the backbone lives (meta when counting)
                spec.apply(self, config)
        finally:
            self._owner = "user"
        self.components.append(config)
        self.train(self.training)  # the new modules follow the model's mode: never half in training mode

    def claim(self, slot: tuple, shareable_with: Iterable[str] = ()) -> None:
        """Record that the current component owns ``slot``; a conflicting owner is an error."""
        holder = self._claims.get(slot)
        if holder is not None:
            method = holder.split("#")[0]
            if method not in shareable_with:
                raise CompositionError(
                    f"{self._owner.split('#')[0]} and {method} both claim {'/'.join(map(str, slot))}; "
                    "drop one of them or give them different target_modules/layers"
                )
        self._claims[slot] = self._owner

    def is_gated(self, config: Any) -> bool:
        return self.gating if getattr(config, "gated", None) is None else bool(config.gated)

    def gate_key(self, config: Any) -> str:
        """Name of the current component's gates in every layer's ``peft_gates``: ``<method>_<index>``.

        ``method`` is the sub-method's (``unipelt`` builds ``prefix_tuning_i``, ``lora_i``, ``adapter_i``).
        """
        return f"{config.method}_{len(self.components)}"

    def layer_gate(self, config: Any, layer: int, key: str | None = None) -> GateHandle | None:
        """The component's ONE gate in ``layer`` if it is gated (else ``None``), created on first use.

        UniPELT (Mao et al., arXiv:2110.07577, eq. 1-3): one gate ``G = sigmoid(W_G x)`` per gated
        component and layer, ``W_G`` (1, d) + bias, read from the layer's input ``x`` (B, T, d) and
        shared by every matrix/adapter the component puts in that layer (see :class:`LayerGates`).
        ``key`` defaults to :meth:`gate_key`. Cost: ``d + 1`` parameters per gated component and layer.
        """
        if not self.is_gated(config):
            return None
        key = key or self.gate_key(config)
        block = self.encoder.layers[layer]
        host = getattr(block, "peft_gates", None)
        if host is None:
            host = LayerGates()
            block.peft_gates = host
            block.register_forward_pre_hook(host.capture, with_kwargs=True)
            block.register_forward_hook(host.release, with_kwargs=True)
        if key not in host.gates:
            device = next(self.backbone.parameters()).device
            host.gates[key] = Gate(self.encoder.hidden_size).to(device)
        return GateHandle(host, key)

    def layers_of(self, config: Any) -> list[int]:
        try:
            return self.encoder.resolve_layers(getattr(config, "layers", "all"))
        except ValueError as exc:
            raise CompositionError(f"{config.method}: {exc}") from None

    @property
    def family(self):
        """The backbone's :class:`autopeft.backbones.arch.Family` (where each slot is)."""
        return self.encoder.family

    def linear(self, layer: int, target: str) -> nn.Module:
        """The current module in Linear slot ``target`` of ``layer`` (possibly already wrapped)."""
        return self.encoder.get(layer, self._linear_path(target))

    def _linear_path(self, target: str) -> str:
        try:
            return self.family.linear_path(target)
        except ValueError as exc:
            raise CompositionError(str(exc)) from None

    def wrap_linear(self, layer: int, target: str, factory: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace Linear ``target`` of ``layer`` by ``factory(base_linear)``; returns the wrapper.

        Targets that mean the same matrix on this family (GPT-2's fused ``qkv`` for ``query`` and
        ``value``) are wrapped once per component.
        """
        path = self._linear_path(target)
        slot = ("linear", layer, self.family.target(target))
        if self._claims.get(slot) == self._owner:
            return self.encoder.get(layer, path)
        self.claim(slot)
        wrapper = factory(self.encoder.get(layer, path))
        self.encoder.replace(layer, path, wrapper)
        return wrapper

    def _sublayer_spec(self, which: str):
        spec = self.family.sublayers.get(which)
        if spec is None:
            raise CompositionError(f"unknown sublayer {which!r}; valid: {', '.join(self.family.sublayers)}")
        return spec

    def sublayer_path(self, which: str) -> str:
        """Path below a layer of the adapter host of sublayer ``which`` (``attention`` or ``ffn``)."""
        return self._sublayer_spec(which).path

    def sublayer(self, layer: int, which: str) -> nn.Module:
        """The adapter host (:class:`SublayerOutput` or :class:`SublayerModule`) of sublayer ``which``
        (``attention`` or ``ffn``) in ``layer``, created on first use. A prefix wrapper on the same
        module stays inside the host, so adapters act on the attention's full output."""
        spec = self._sublayer_spec(which)
        module = self.encoder.get(layer, spec.path)
        if not isinstance(module, ADAPTER_HOSTS):
            module = (SublayerOutput if spec.kind == "output_block" else SublayerModule)(module)
            self.encoder.replace(layer, spec.path, module)
        return module

    def sublayer_norm(self, layer: int, which: str) -> nn.Module:
        """The LayerNorm (RMSNorm) of sublayer ``which`` in ``layer`` (Houlsby adapters train it)."""
        return self.encoder.get(layer, self._sublayer_spec(which).norm)

    def attention(self, layer: int) -> PrefixAttention:
        """The prefix host of ``layer``'s self-attention, created on first use (inside an adapter host).

        Raises:
            CompositionError: the family cannot take prefixes (DeBERTa's relative attention).
        """
        fam = self.family
        if fam.attention is None:
            raise CompositionError(f"prefixes are not supported on {fam.name} backbones")
        outer = self.encoder.get(layer, fam.attention)
        parent, module = None, outer
        while isinstance(module, ADAPTER_HOSTS):
            parent, module = module, module.base
        if isinstance(module, PrefixAttention):
            return module
        wrapper = PrefixAttention(module, fam.prefix_style, fam.qkv_names or ("query", "key", "value"), fam.out_proj)
        if parent is None:
            self.encoder.replace(layer, fam.attention, wrapper)
        else:
            parent.base = wrapper
        return wrapper

    def add_adapter(self, layer: int, which: str, placement: str, name: str, module: nn.Module,
                    shareable_with: Iterable[str] = ()) -> None:
        """Attach ``module`` as a ``serial`` or ``parallel`` adapter on sublayer ``which`` of ``layer``."""
        if placement not in ("serial", "parallel"):
            raise CompositionError(f"placement must be serial or parallel, got {placement!r}")
        self._sublayer_spec(which)
        self.claim(("adapter", layer, which, placement, name), shareable_with)
        getattr(self.sublayer(layer, which), placement)[name] = module

    def add_prefix(self, layer: int, source: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                   gate: Gate | None = None, num_tokens: int = 0) -> None:
        """Prepend ``source(B) -> (P_k, P_v)``, each (B, kv_heads, P, head_dim), to ``layer``'s attention.

        ``num_tokens`` (P) shifts the position ids of decoder families by P, as a P-token cache would.
        """
        self.claim(("prefix", layer))
        self.attention(layer).add_source(source, gate)
        self._prefix_tokens = max(self._prefix_tokens, int(num_tokens))

    def trained_folder(self, folder: str, with_tensors: bool = True, kind: str = "trained folder"):
        """A trained folder a component names (AdapterFusion's stage-one adapters), as an
        :class:`autopeft.methods.base.TrainedFolder`, read by the reader this model was built with;
        methods never read files or recipes themselves. ``kind`` names the folder in messages.

        Raises:
            CompositionError: no reader was handed in, the folder is not a trained folder, or its
                recipe does not load.
        """
        if self._read_folder is None:
            raise CompositionError(f"{folder}: this model cannot read {kind}s (build it with autopeft.composition.recipe.build_model)")
        return self._read_folder(folder, with_tensors, kind)

    def add_input_prompt(self, module: nn.Module, position: int = 0) -> None:
        """Insert ``module(B)`` -> (B, P, d) virtual token embeddings after ``position`` input tokens."""
        self.claim(("input_prompt",))
        self._input_prompts.append(InputPrompt(module, position))

    def add_regularizer(self, fn: Callable[[], torch.Tensor]) -> None:
        """Add a scalar loss term computed at every training step (e.g. AdaLoRA's orthogonality)."""
        self._regularizers.append(fn)

    def add_step_hook(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(global_step)`` after every optimiser step (e.g. AdaLoRA's rank allocation)."""
        self._step_hooks.append(fn)

    # ----- training-time hooks --------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        terms = [fn() for fn in self._regularizers]
        return torch.stack(terms).sum() if terms else None

    def after_step(self, step: int) -> None:
        for fn in self._step_hooks:
            fn(step)

    # ----- running ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kw: Any):
        """Run the backbone. ``input_ids`` (B, T) -> HF output with ``logits`` (B, num_labels).

        Decoder families pool the last non-padding token (right padding) for ``pooler``/``last``.
        With ``compute_dtype`` set (bf16/fp16, by the trainer from the recipe's precision) the pass and
        the loss run under ``torch.autocast`` in that dtype, wherever the model is called from.
        """
        if self.compute_dtype is None:
            return self._forward(input_ids, attention_mask, token_type_ids, labels, **kw)
        with autocast(input_ids.device, self.compute_dtype):
            return self._forward(input_ids, attention_mask, token_type_ids, labels, **kw)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None, labels: torch.Tensor | None, **kw: Any):
        fam = self.family
        if not fam.token_type_ids:
            token_type_ids = None
        inputs: dict[str, Any] = {"input_ids": input_ids}
        if self._input_prompts:
            inputs, attention_mask, token_type_ids = self._with_input_prompts(input_ids, attention_mask, token_type_ids)
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        p = self._prefix_tokens
        if fam.causal and p:
            t = (inputs.get("inputs_embeds") if "inputs_embeds" in inputs else input_ids).shape[1]
            kw.setdefault("position_ids", torch.arange(p, p + t, device=input_ids.device)[None])
        pooling = "last" if fam.causal and self.pooling == "pooler" else self.pooling
        if pooling == "pooler":
            return self.backbone(**inputs, attention_mask=attention_mask, labels=labels, **kw)
        hidden = self.backbone.base_model(**inputs, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, d)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        elif pooling == "last":
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (attention_mask.to(torch.long) * (positions + 1)).argmax(dim=1)  # index of the last 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
        else:
            m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        return self._head(pooled, labels)

    def _head(self, pooled: torch.Tensor, labels: torch.Tensor | None):
        """Task head on a pooled (B, d) vector -> ``SequenceClassifierOutput`` with logits (B, num_labels).

        The backbone's own head modules, in its own order: BERT ``dropout -> classifier``; RoBERTa/ELECTRA
        their head on ``features[:, 0]``; DistilBERT ``pre_classifier -> ReLU -> dropout -> classifier``;
        DeBERTa ``pooler (ContextPooler) -> dropout -> classifier``; decoders ``score``.
        """
        from transformers.modeling_outputs import SequenceClassifierOutput

        bb = self.backbone
        dropout = getattr(bb, "dropout", None)
        head = getattr(bb, "classifier", None) or getattr(bb, "score")
        if getattr(bb, "pre_classifier", None) is not None:  # DistilBERT
            pooled = F.relu(bb.pre_classifier(pooled))
        elif self.family.name == "deberta-v2" and getattr(bb, "pooler", None) is not None:
            pooled = bb.pooler(pooled[:, None, :])
        if isinstance(head, nn.Linear):  # BERT-style: dropout + Linear on the pooled vector
            logits = head(dropout(pooled) if isinstance(dropout, nn.Module) else pooled)
        else:  # RoBERTa/ELECTRA-style heads read features[:, 0, :]
            logits = head(pooled[:, None, :])
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _with_input_prompts(self, input_ids, attention_mask, token_type_ids):
        """Insert every input prompt's virtual tokens: returns ``({"inputs_embeds": (B, T+P, d)}, mask, types)``."""
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, d)
        bsz = embeds.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if token_type_ids is None and self.family.token_type_ids:
            token_type_ids = torch.zeros_like(input_ids)
        for prompt in self._input_prompts:
            p = prompt.module(bsz).to(embeds.dtype)  # (B, P, d)
            n, pos = p.shape[1], prompt.position
            embeds = torch.cat([embeds[:, :pos], p, embeds[:, pos:]], dim=1)
            ones = attention_mask.new_ones((bsz, n))
            attention_mask = torch.cat([attention_mask[:, :pos], ones, attention_mask[:, pos:]], dim=1)
            if token_type_ids is not None:
                zeros = token_type_ids.new_zeros((bsz, n))
                token_type_ids = torch.cat([token_type_ids[:, :pos], zeros, token_type_ids[:, pos:]], dim=1)
        return {"inputs_embeds": embeds}, attention_mask, token_type_ids

    # ----- accounting and persistence ---------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (method parameters, unfrozen backbone parameters, head), by name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def method_state_dict(self) -> dict[str, Any]:
        """State of the method modules that is not a trainable parameter, by ``state_dict`` name.

        Every persistent buffer and every ``get_extra_state`` entry of a module defined in
        ``autopeft.methods`` or ``autopeft.composition`` (never the backbone's own buffers): e.g. AdaLoRA's
        ``rank_mask`` and allocator step, AdapterDrop's inference ``n``. Together with
        :meth:`trainable_state_dict` this is everything that defines a trained adapter
        (:meth:`adapter_state_dict`).
        """
        out: dict[str, Any] = {}
        for prefix, module in self.named_modules():
            cls = type(module)
            if not cls.__module__.startswith(("autopeft.composition.", "autopeft.methods.")):
                continue
            dot = f"{prefix}." if prefix else ""
            for name, buf in module._buffers.items():
                if buf is not None and name not in module._non_persistent_buffers_set:
                    out[dot + name] = buf.detach()
            if cls.get_extra_state is not nn.Module.get_extra_state:
                out[dot + "_extra_state"] = module.get_extra_state()
        return out

    def adapter_state_dict(self) -> dict[str, Any]:
        """What :func:`autopeft.training.saved.save_trained` writes: :meth:`trainable_state_dict` plus
        :meth:`method_state_dict` (tensors by name; ``load_state_dict(..., strict=False)`` restores them)."""
        return {**self.trainable_state_dict(), **self.method_state_dict()}

    @staticmethod
    def is_head_parameter(name: str) -> bool:
        """Whether ``name`` (as in ``named_parameters()``) belongs to the task head."""
        return name.startswith("backbone.") and _is_head(name[len("backbone."):])

    def gate_values(self) -> dict[str, float]:
        """Last value of every gate, by module name (what UniPELT chose)."""
        return {n: m.last_value for n, m in self.named_modules() if isinstance(m, Gate) and m.last_value is not None}


def _numel(p: torch.Tensor) -> int:
    """Elements of ``p`` as a weight: a packed 4-bit tensor counts its unpacked shape."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def _is_head(name: str) -> bool:
    first = name.split(".")[0]
    return first in HEAD_MODULE_NAMES


@dataclass(frozen=True)
class ParameterCount:
    """Parameter accounting of a PEFT model.

    Attributes:
        trainable_params: trainable parameters excluding the task head (what the budget limits).
        backbone_params: parameters of the unmodified backbone excluding the head.
        head_params: trainable parameters of the task head (every method needs it).
        pooling: what the head reads (:data:`POOLINGS`).
        weight_bytes: bytes of the backbone's weights per storage dtype (``fp32``, ``bf16``, ``nf4``).
        trainable_percent: ``100 * trainable_params / backbone_params``.
    """

    trainable_params: int
    backbone_params: int
    head_params: int
    pooling: str = "pooler"
    #: Bytes of the backbone's weights stored in fp32 / bf16 / nf4 (:func:`autopeft.backbones.quantization.weight_bytes`);
    #: set by :func:`autopeft.api.count` (``autopeft count``).
    weight_bytes: dict[str, int] | None = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.backbone_params

    def as_dict(self) -> dict[str, float | int]:
        return {
            "trainable_params": self.trainable_params,
            "backbone_params": self.backbone_params,
            "trainable_percent": self.trainable_percent,
            "head_params": self.head_params,
            "pooling": self.pooling,
            **({"weight_bytes": self.weight_bytes} if self.weight_bytes is not None else {}),
        }


def count_parameters(model: ComposedModel) -> ParameterCount:
    """Count trainable parameters of ``model`` (units: parameters, not bytes).

    Parameters shared between modules count once. Works on meta-device models.
    """
    trainable = head = 0
    for name, p in model.named_parameters():  # named_parameters de-duplicates shared tensors
        if not p.requires_grad:
            continue
        if model.is_head_parameter(name):
            head += p.numel()
        else:
            trainable += p.numel()
    pooling = getattr(model, "pooling", "pooler")
    if pooling == "pooler" and model.family.causal:
        pooling = "last"  # what a decoder's own head reads
    return ParameterCount(trainable, model.backbone_params, head, pooling)


def __getattr__(name: str):
    """The old name of :class:`ComposedModel` (``PeftModel``), with a ``DeprecationWarning``.

    Raises:
        AttributeError: for any other missing name.
    """
    if name == "PeftModel":
        import warnings

        warnings.warn("autopeft.composition.model.PeftModel is now ComposedModel (peft's PeftModel is another class)",
                      DeprecationWarning, stacklevel=2)
        return ComposedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
