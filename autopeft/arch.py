"""Where the method modules attach inside a BERT-family encoder.

One table maps autopeft's sublayer names to module paths, so no method module ever spells out an
architecture. BERT, RoBERTa, XLM-RoBERTa, ELECTRA and their descendants share this layout::

    encoder.layer[i]
      attention.self.{query,key,value}   (B, T, d) -> (B, T, d)
      attention.output.{dense,dropout,LayerNorm}   LN(dropout(dense(h)) + x)
      intermediate.dense                 (B, T, d) -> (B, T, d_ff)
      output.{dense,dropout,LayerNorm}   LN(dropout(dense(h)) + x)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Canonical target names for Linear sublayers, with the path below ``encoder.layer[i]``.
LINEAR_TARGETS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
#: Accepted spellings for the canonical names (peft's and the papers' shorthands).
TARGET_ALIASES: dict[str, str] = {
    "q": "query", "k": "key", "v": "value", "o": "attention_output", "wq": "query", "wk": "key",
    "wv": "value", "wo": "attention_output", "intermediate": "ffn_in", "output": "ffn_out",
    "attn_out": "attention_output", "ffn_up": "ffn_in", "ffn_down": "ffn_out",
}
#: The two residual sublayers where adapters attach.
SUBLAYERS: dict[str, str] = {"attention": "attention.output", "ffn": "output"}
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text")


class ArchitectureError(ValueError):
    """The backbone is not a BERT-family encoder that autopeft knows how to modify."""


def canonical_target(name: str) -> str:
    """Return the canonical Linear target for ``name`` (e.g. ``"q"`` -> ``"query"``).

    Raises:
        ValueError: the name is not a known target; the message lists the valid ones.
    """
    key = name.strip().lower()
    key = TARGET_ALIASES.get(key, key)
    if key not in LINEAR_TARGETS:
        raise ValueError(f"unknown target module {name!r}; valid: {', '.join(LINEAR_TARGETS)}")
    return key


def canonical_targets(names: list[str]) -> list[str]:
    """Canonical names of a non-empty list of Linear targets.

    Raises:
        ValueError: the list is empty or names an unknown target.
    """
    if not names:
        raise ValueError(f"target_modules must name at least one of {', '.join(LINEAR_TARGETS)}")
    return [canonical_target(t) for t in names]


def _child(module: nn.Module, name: str) -> nn.Module:
    # Composition wrappers (autopeft.model) keep the original module as ``base``: look through them.
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


@dataclass(frozen=True)
class Encoder:
    """Handle on the transformer layers of a sequence-classification model.

    Attributes:
        model: the Hugging Face ``*ForSequenceClassification`` model.
        layers: its ``encoder.layer`` ModuleList (L layers).
        hidden_size: d, the model width.
        num_heads: attention heads; ``head_dim = d / num_heads``.
    """

    model: nn.Module
    layers: nn.ModuleList
    hidden_size: int
    num_heads: int

    @classmethod
    def of(cls, model: nn.Module) -> "Encoder":
        """Find the encoder of ``model``.

        Raises:
            ArchitectureError: ``model`` has no BERT-style ``encoder.layer``.
        """
        base = getattr(model, "base_model", model)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ArchitectureError(
                f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        cfg = model.config
        return cls(model, layers, cfg.hidden_size, cfg.num_attention_heads)

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
