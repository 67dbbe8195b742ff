"""Where the method modules attach, per architecture family: one table per family.

No method module spells out an architecture: each asks :class:`Encoder` (through
:class:`autopeft.composition.model.ComposedModel`) for a canonical slot, and the family table below says where that
slot is. Canonical Linear targets (with the usual aliases, e.g. peft's ``q_proj``)::

    query key value qkv attention_output ffn_gate ffn_in ffn_out

Families (``FAMILIES``; detected from ``config.model_type``):

* ``bert`` - BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT, data2vec-text (post-LN encoders)::

    encoder.layer[i]
      attention.self.{query,key,value}             (B, T, d) -> (B, T, d)
      attention.output.{dense,dropout,LayerNorm}   LN(dropout(dense(h)) + x)
      intermediate.dense                           (B, T, d) -> (B, T, d_ff)
      output.{dense,dropout,LayerNorm}             LN(dropout(dense(h)) + x)

* ``distilbert`` - ``transformer.layer[i]``: ``attention.{q_lin,k_lin,v_lin,out_lin}``,
  ``sa_layer_norm``, ``ffn.{lin1,lin2}``, ``output_layer_norm`` (post-LN; the residual is added
  in the block, so adapters wrap the ``attention`` and ``ffn`` modules' outputs).
* ``deberta-v2`` - DeBERTa-v2/v3 (He et al., arXiv:2111.09543): the BERT layout with
  ``attention.self.{query_proj,key_proj,value_proj}``. Its disentangled attention scores every key
  by its relative position to the query (arXiv:2006.03654, eq. 2-4); prefix keys have no
  position, so prefix-based methods are not offered on it.
* ``gpt2`` - ``transformer.h[i]``: ``ln_1``, ``attn.{c_attn (fused q|k|v), c_proj}``, ``ln_2``,
  ``mlp.{c_fc,c_proj}`` (pre-LN, causal). GPT-2's ``Conv1D`` layers are turned into equivalent
  ``nn.Linear`` (weight transposed, same function) when the encoder is first opened, so LoRA,
  quantisation and BitFit see ordinary Linears; ``query``/``key``/``value`` on GPT-2 mean the fused
  ``qkv`` matrix (as peft users target ``c_attn``).
* ``llama`` - Llama, Mistral, Qwen2 (pre-RMSNorm, causal, rotary, grouped-query attention):
  ``model.layers[i]``: ``input_layernorm``, ``self_attn.{q_proj,k_proj,v_proj,o_proj}``,
  ``post_attention_layernorm``, ``mlp.{gate_proj,up_proj,down_proj}``.

Decoder-only families classify from the last non-padding token (as transformers'
``*ForSequenceClassification`` do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autopeft.errors import AutopeftError

#: Canonical Linear targets of the BERT family, with the path below ``encoder.layer[i]`` (kept as the
#: default target list of methods that wrap "every" Linear, e.g. AdaLoRA and QLoRA).
LINEAR_TARGETS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
#: Every canonical target of any family.
ALL_TARGETS: tuple[str, ...] = ("query", "key", "value", "qkv", "attention_output", "ffn_gate", "ffn_in", "ffn_out")
#: Accepted spellings for the canonical names (peft's, the papers' and the families' own names).
TARGET_ALIASES: dict[str, str] = {
    "q": "query", "k": "key", "v": "value", "o": "attention_output", "wq": "query", "wk": "key",
    "wv": "value", "wo": "attention_output", "intermediate": "ffn_in", "output": "ffn_out",
    "attn_out": "attention_output", "ffn_up": "ffn_in", "ffn_down": "ffn_out",
    "q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_in", "down_proj": "ffn_out",
    "query_proj": "query", "key_proj": "key", "value_proj": "value",
    "q_lin": "query", "k_lin": "key", "v_lin": "value", "out_lin": "attention_output",
    "lin1": "ffn_in", "lin2": "ffn_out", "c_attn": "qkv", "c_fc": "ffn_in",
}


@dataclass(frozen=True)
class Sublayer:
    """Where adapters of one residual sublayer (``attention`` or ``ffn``) attach.

    Attributes:
        path: module below the layer that hosts the adapters.
        kind: ``output_block`` - a BERT-style ``*Output`` block ``LN(dropout(dense(h)) + x)`` called
            as ``block(h, x)`` (adapters act before the residual add and LayerNorm); ``module`` - the
            sublayer itself (attention or FFN), whose output gets the adapters before the block adds
            the residual (parallel adapters read the module's input).
        norm: the normalisation module of this sublayer (trained by Houlsby adapters).
    """

    path: str
    kind: str
    norm: str


@dataclass(frozen=True)
class Family:
    """One architecture family: where every method attaches (see the module docstring).

    Attributes:
        name: family name. model_types: transformers ``model_type`` values it covers.
        layers: path of the layer ``ModuleList`` below the base model.
        linear: canonical target -> path below a layer.
        fallback: canonical target -> the target that stands for it here (GPT-2: ``query`` -> ``qkv``).
        sublayers: ``attention``/``ffn`` -> :class:`Sublayer`.
        attention: module below a layer that hosts prefixes (``None``: prefixes unsupported).
        prefix_style: ``recompute`` (autopeft recomputes the attention with the prefix keys, from the
            module's ``qkv_names`` Linears and, if set, its ``out_proj``) or ``cache`` (the module's own
            forward runs; the prefix enters through its key/value cache, as in peft).
        causal: decoder-only (last-token pooling; prefixes shift position ids).
        token_type_ids: the model takes token type ids.
        unsupported: a backbone feature a method may need (``prefix``: attention keys/values a prefix can
            extend; ``bias``: bias terms) -> why this family lacks it (one line). Which methods need
            what is the methods' own fact (``MethodSpec.needs``).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    linear: dict[str, str]
    sublayers: dict[str, Sublayer]
    attention: str | None
    prefix_style: str | None = None
    qkv_names: tuple[str, str, str] | None = None
    out_proj: str | None = None
    causal: bool = False
    token_type_ids: bool = True
    fallback: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    def target(self, name: str) -> str:
        """The canonical target that ``name`` means on this family.

        Raises:
            ValueError: the family has no such Linear; the message lists the ones it has.
        """
        key = canonical_target(name)
        key = self.fallback.get(key, key)
        if key not in self.linear:
            raise ValueError(f"target module {name!r} does not exist on {self.name} backbones; "
                             f"valid: {', '.join(self.linear)}")
        return key

    def linear_path(self, name: str) -> str:
        """Path below a layer of Linear target ``name`` (see :meth:`target`)."""
        return self.linear[self.target(name)]

    def missing_features(self, config: Any = None) -> dict[str, str]:
        """Features methods may need (:attr:`unsupported`'s keys) that this family (given ``config``)
        lacks, with the one-line reason."""
        out = dict(self.unsupported)
        if config is not None and self.name == "llama" and not _has_biases(config):
            out["bias"] = "no bias terms to train (attention_bias and mlp_bias are false)"
        return out


def _has_biases(config: Any) -> bool:
    mt = getattr(config, "model_type", "")
    return mt == "qwen2" or bool(getattr(config, "attention_bias", False)) or bool(getattr(config, "mlp_bias", False))


_PREFIX_ON_RELATIVE = ("DeBERTa's disentangled attention scores each key by its relative position to the query "
                       "(arXiv:2006.03654, eq. 2-4); prefix keys have no position, so prefixes cannot be added faithfully")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text"), "encoder.layer",
           dict(LINEAR_TARGETS),
           {"attention": Sublayer("attention.output", "output_block", "attention.output.LayerNorm"),
            "ffn": Sublayer("output", "output_block", "output.LayerNorm")},
           attention="attention.self", prefix_style="recompute", qkv_names=("query", "key", "value")),
    Family("distilbert", ("distilbert",), "transformer.layer",
           {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
            "attention_output": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
           {"attention": Sublayer("attention", "module", "sa_layer_norm"),
            "ffn": Sublayer("ffn", "module", "output_layer_norm")},
           attention="attention", prefix_style="recompute", qkv_names=("q_lin", "k_lin", "v_lin"), out_proj="out_lin",
           token_type_ids=False),
    Family("deberta-v2", ("deberta-v2",), "encoder.layer",
           {"query": "attention.self.query_proj", "key": "attention.self.key_proj",
            "value": "attention.self.value_proj", "attention_output": "attention.output.dense",
            "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
           {"attention": Sublayer("attention.output", "output_block", "attention.output.LayerNorm"),
            "ffn": Sublayer("output", "output_block", "output.LayerNorm")},
           attention=None,
           unsupported={"prefix": _PREFIX_ON_RELATIVE}),
    Family("gpt2", ("gpt2",), "h",
           {"qkv": "attn.c_attn", "attention_output": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj"},
           {"attention": Sublayer("attn", "module", "ln_1"), "ffn": Sublayer("mlp", "module", "ln_2")},
           attention="attn", prefix_style="cache", causal=True, token_type_ids=False,
           fallback={"query": "qkv", "key": "qkv", "value": "qkv"}),
    Family("llama", ("llama", "mistral", "qwen2"), "layers",
           {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
            "attention_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_in": "mlp.up_proj",
            "ffn_out": "mlp.down_proj"},
           {"attention": Sublayer("self_attn", "module", "input_layernorm"),
            "ffn": Sublayer("mlp", "module", "post_attention_layernorm")},
           attention="self_attn", prefix_style="cache", causal=True, token_type_ids=False),
]}
SUPPORTED_MODEL_TYPES = tuple(mt for f in FAMILIES.values() for mt in f.model_types)


def family_of(config_or_type: Any) -> Family:
    """The :class:`Family` of a transformers config (or a ``model_type`` string).

    Raises:
        ArchitectureError: the model type is not in any family; the message lists the supported ones.
    """
    mt = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    raise ArchitectureError(f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def is_causal(config: Any) -> bool:
    """Whether a transformers config is of a decoder-only family (``False`` for an unknown model type)."""
    try:
        return bool(family_of(config).causal)
    except ValueError:
        return False


class ArchitectureError(AutopeftError, ValueError):
    """The backbone is not of a family autopeft knows how to modify (:data:`FAMILIES`)."""


def canonical_target(name: str) -> str:
    """Return the canonical Linear target for ``name`` (e.g. ``"q"`` -> ``"query"``).

    Raises:
        ValueError: the name is not a known target; the message lists the valid ones.
    """
    key = name.strip().lower()
    key = TARGET_ALIASES.get(key, key)
    if key not in ALL_TARGETS:
        import difflib

        close = difflib.get_close_matches(key, [*ALL_TARGETS, *TARGET_ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown target module {name!r}{hint}; valid: {', '.join(ALL_TARGETS)}, or the model's own "
                         f"names ({', '.join(k for k in TARGET_ALIASES if '_' in k and not k.startswith(('attn_', 'ffn_')))})")
    return key


def canonical_targets(names: list[str]) -> list[str]:
    """Canonical names of a non-empty list of Linear targets.

    Raises:
        ValueError: the list is empty or names an unknown target.
    """
    if not names:
        raise ValueError(f"target_modules must name at least one of {', '.join(ALL_TARGETS)}")
    return [canonical_target(t) for t in names]


def _child(module: nn.Module, name: str) -> nn.Module:
    # Composition wrappers (autopeft.composition.model) keep the original module as ``base``: look through them.
    while not hasattr(module, name) and hasattr(module, "base"):
        module = module.base
    return module


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(_child(root, part), part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        root = getattr(_child(root, part), part)
    setattr(_child(root, leaf), leaf, module)


def _conv1d_to_linear(root: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` below ``root`` by the equivalent ``nn.Linear``.

    ``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` (nx, nf); the Linear gets ``W.T`` (nf, nx),
    the same parameter names, the same function. Returns how many were replaced.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return 0
    done = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                nx, nf = child.weight.shape
                lin = nn.Linear(nx, nf, device=child.weight.device, dtype=child.weight.dtype)
                lin.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=child.weight.requires_grad)
                lin.bias = nn.Parameter(child.bias.detach(), requires_grad=child.bias.requires_grad)
                lin.train(child.training)
                setattr(module, child_name, lin)
                done += 1
    return done


@dataclass(frozen=True)
class Encoder:
    """Handle on the transformer layers of a sequence-classification model.

    Attributes:
        model: the Hugging Face ``*ForSequenceClassification`` model.
        layers: its layer ModuleList (L layers; ``encoder.layer``, ``model.layers``, ``transformer.h`` ...).
        hidden_size: d, the model width.
        num_heads: attention (query) heads.
        family: the :class:`Family` table of this architecture.
        num_kv_heads: key/value heads (grouped-query attention; = ``num_heads`` otherwise).
        head_dim: width of one head.
    """

    model: nn.Module
    layers: nn.ModuleList
    hidden_size: int
    num_heads: int
    family: Family = FAMILIES["bert"]
    num_kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> "Encoder":
        """Find the layers of ``model`` from its family table. GPT-2's ``Conv1D`` layers are turned
        into ``nn.Linear`` here, once (same function; see the module docstring).

        Raises:
            ArchitectureError: the model type is not in :data:`FAMILIES`, or its layers are missing.
        """
        cfg = getattr(model, "config", None)
        mt = getattr(cfg, "model_type", type(model).__name__)
        fam = family_of(mt)
        base = getattr(model, "base_model", model)
        layers = base
        for part in fam.layers.split("."):
            layers = getattr(layers, part, None)
        if not isinstance(layers, nn.ModuleList):
            raise ArchitectureError(f"model type {mt!r}: no layer list at {fam.layers!r} below the base model")
        if fam.name == "gpt2":
            _conv1d_to_linear(layers)
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        return cls(model, layers, int(cfg.hidden_size), heads, fam, kv, head_dim)

    @property
    def kv_width(self) -> int:
        """Width of the keys (and values) of one layer: ``num_kv_heads * head_dim`` (= d without GQA)."""
        return self.num_kv_heads * self.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get(self, layer: int, path: str) -> nn.Module:
        """Module at ``path`` below ``encoder.layer[layer]``."""
        return _get(self.layers[layer], path)

    def replace(self, layer: int, path: str, module: nn.Module) -> None:
        """Put ``module`` at ``path`` below ``encoder.layer[layer]``."""
        _set(self.layers[layer], path, module)

    def resolve_layers(self, layers: list[int] | str | None) -> list[int]:
        """Turn a ``layers`` setting into sorted layer indices.

        Accepts ``None``/``"all"``, ``"upper_half"``, ``"lower_half"``, or a list of ints (negative
        indices count from the top).

        Raises:
            ValueError: an index is out of range or the name is unknown.
        """
        return resolve_layers(layers, self.num_layers)


def resolve_layers(layers: list[int] | str | None, n: int) -> list[int]:
    """Sorted layer indices of a ``layers`` setting for an ``n``-layer model (see
    :meth:`Encoder.resolve_layers`); also used without a model, from a config's layer count.

    Raises:
        ValueError: an index is out of range or the name is unknown.
    """
    if layers is None or layers == "all":
        return list(range(n))
    if layers == "upper_half":
        return list(range(n // 2, n))
    if layers == "lower_half":
        return list(range(n // 2))
    if isinstance(layers, str):
        raise ValueError(f"unknown layers {layers!r}; use all, upper_half, lower_half or a list")
    out = set()
    for i in layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"layer index {i} out of range for a {n}-layer model")
        out.add(j)
    return sorted(out)
