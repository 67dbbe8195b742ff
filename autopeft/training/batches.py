"""From a split to padded batches on a device: tokenise once (cached on disk, keyed by the tokenizer's
full state and the texts), order the training examples (seeded epochs, optionally grouped by length as
transformers' ``group_by_length`` does) and pad each batch to its longest example.

Used by :func:`autopeft.training.trainer.run_trial` for training and by
:mod:`autopeft.training.scoring` for every evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autopeft.data.tasks import Split


#: Environment variable naming the token cache folder (default ``~/.cache/autopeft/tokens``).
CACHE_ENV = "AUTOPEFT_CACHE_DIR"
#: Examples per length-sorted mega-batch, in batches (``group_by_length`` in transformers uses 50).
MEGABATCH_MULT = 50


@dataclass
class Encoded:
    """A tokenised split without padding: example ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    ``types`` holds the token type ids in the same layout (``None`` when the tokenizer has none).
    """

    ids: np.ndarray
    offsets: np.ndarray
    types: np.ndarray | None

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, (N,) int."""
        return np.diff(self.offsets)


def token_cache_dir() -> Path:
    """The on-disk token cache: ``$AUTOPEFT_CACHE_DIR`` or ``~/.cache/autopeft/tokens``."""
    import os

    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autopeft" / "tokens")


#: Tokenizer settings that name files or folders, not behaviour: left out of :func:`tokenizer_fingerprint`
#: (the same tokenizer in two folders tokenises alike).
_TOKENIZER_PATH_KEYS = frozenset({"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local",
                                  "local_files_only", "cache_dir", "_commit_hash", "token", "revision"})
#: Changes when the token cache's key or file layout does: files of an older layout are never read.
TOKEN_CACHE_VERSION = 2


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in ``tokenizer`` that decides the ids it gives a text: its class, the
    transformers / tokenizers versions, the backend's full serialised state (normaliser with its
    lower-casing, pre-tokeniser, vocabulary, post-processor, added tokens) or, for a tokenizer
    without one, its vocabulary, and its settings (``do_lower_case``, special tokens, truncation
    side, ...). File paths are left out, and so are the backend's truncation and padding, which
    every call sets (:func:`encode_split` keys its own call settings separately)."""
    import hashlib

    import transformers

    state: dict = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
                   "transformers": transformers.__version__}
    try:
        import tokenizers

        state["tokenizers"] = tokenizers.__version__
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        doc = json.loads(backend.to_str())
        doc.pop("truncation", None)
        doc.pop("padding", None)
        state["backend"] = doc
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items())
    state["settings"] = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _TOKENIZER_PATH_KEYS}
    state["added"] = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    state["special"] = getattr(tokenizer, "special_tokens_map", {})
    state["sides"] = [getattr(tokenizer, "truncation_side", None), getattr(tokenizer, "padding_side", None)]
    state["model_max_length"] = getattr(tokenizer, "model_max_length", None)
    state["lowercase"] = getattr(tokenizer, "do_lower_case", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def token_cache_key(split: Split, tokenizer, max_length: int) -> str:
    """The token cache's key of one :func:`encode_split` call: :func:`tokenizer_fingerprint`, the
    call's settings (truncation to ``max_length``, longest first; special tokens added; single texts
    or pairs) and the texts, each part length-prefixed so that no two inputs share a key."""
    import hashlib

    arity = len(split.texts[0]) if split.texts else 0
    h = hashlib.sha256()
    call = {"version": TOKEN_CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": int(max_length),
            "truncation": "longest_first", "add_special_tokens": True, "padding": False, "arity": arity,
            "n": len(split.texts)}
    h.update(json.dumps(call, sort_keys=True).encode())
    for t in split.texts:
        if len(t) != arity:
            raise ValueError(f"texts of one split must all be single texts or all pairs; got {arity} and {len(t)} parts")
        for part in t:
            b = part.encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def encode_split(split: Split, tokenizer, max_length: int, cache: bool = True) -> Encoded:
    """Tokenise every example of ``split`` once (truncated to ``max_length``, no padding).

    The result is cached on disk under :func:`token_cache_dir`, keyed by :func:`token_cache_key`
    (the tokenizer's full state, the call's settings and the texts), so every trial of a search (and
    every later search) on the same data reads it back instead of tokenising again, and a changed
    tokenizer (e.g. a folder's tokenizer made cased) never reads another's tokens. Writes are
    atomic (temp file + rename), so trials running side by side never read a half-written file.
    """
    import os

    path = token_cache_dir() / f"{token_cache_key(split, tokenizer, max_length)}.npz"
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                return Encoded(z["ids"], z["offsets"], z["types"] if "types" in z.files else None)
        except (OSError, ValueError, KeyError):  # a damaged cache file: tokenise again
            pass
    columns = [list(c) for c in zip(*split.texts)] if split.texts else [[]]
    enc = tokenizer(*columns, truncation=True, max_length=max_length, padding=False)
    lengths = np.array([len(x) for x in enc["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for x in enc["input_ids"] for t in x), dtype=np.int32, count=int(offsets[-1]))
    types = None
    if "token_type_ids" in enc:
        types = np.fromiter((t for x in enc["token_type_ids"] for t in x), dtype=np.int8, count=int(offsets[-1]))
    out = Encoded(ids, offsets, types)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            arrays = {"ids": ids, "offsets": offsets} | ({"types": types} if types is not None else {})
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:  # a read-only home: work without the cache
            pass
    return out


class Batches:
    """Padded batches of a tokenised split: ``batch(indices)`` -> dict of (B, T) tensors + ``labels`` (B,).

    ``T`` is the longest example of the batch (dynamic padding), so batches of similar lengths
    (see :func:`length_grouped_order`) carry little padding.
    """

    def __init__(self, split: Split, tokenizer, max_length: int, device: torch.device) -> None:
        self.split, self.tok, self.max_length, self.device = split, tokenizer, max_length, device
        self.encoded = encode_split(split, tokenizer, max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def lengths(self) -> np.ndarray:
        return self.encoded.lengths

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = np.asarray(list(idx), dtype=np.int64)
        e = self.encoded
        lens = e.lengths[idx]
        t = int(lens.max()) if len(idx) else 0
        ids = np.full((len(idx), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), t), dtype=np.int64)
        types = np.zeros((len(idx), t), dtype=np.int64) if e.types is not None else None
        for row, (i, n) in enumerate(zip(idx, lens)):
            a = e.offsets[i]
            ids[row, :n] = e.ids[a:a + n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.types[a:a + n]
        out = {"input_ids": torch.from_numpy(ids).to(self.device), "attention_mask": torch.from_numpy(mask).to(self.device)}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types).to(self.device)
        out["labels"] = torch.as_tensor(self.split.labels[idx]).to(self.device)
        return out


def train_order(n: int, total: int, seed: int) -> np.ndarray:
    """Indices of the first ``total`` training examples: epochs of seeded permutations of ``range(n)``."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(total / n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:total]


def length_grouped_order(lengths: np.ndarray, total: int, batch_size: int, seed: int,
                         megabatch_mult: int = MEGABATCH_MULT) -> np.ndarray:
    """Indices of the first ``total`` training examples, with batches of similar lengths.

    Per epoch: a seeded permutation, cut into mega-batches of ``batch_size * megabatch_mult``
    examples, each sorted by length and cut into batches; then the batches of the epoch are
    shuffled (seeded). As ``group_by_length`` in transformers' Trainer, but with the batch order
    shuffled so long and short batches alternate. Consecutive ``batch_size`` slices of the result
    are the batches. Every example is seen once per epoch.
    """
    rng = np.random.default_rng(seed)
    n = len(lengths)
    mb = max(batch_size, batch_size * megabatch_mult)
    out: list[np.ndarray] = []
    seen = 0
    while seen < total:
        perm = rng.permutation(n)
        batches = []
        for a in range(0, n, mb):
            chunk = perm[a:a + mb]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        rest = [b for b in batches if len(b) < batch_size]
        order = rng.permutation(len(full))
        epoch = np.concatenate([full[i] for i in order] + rest) if full or rest else np.array([], dtype=np.int64)
        out.append(epoch)
        seen += len(epoch)
    return np.concatenate(out)[:total]


def padding_fraction(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Share of padded token slots over the batches of ``order`` (0 = no padding)."""
    real = padded = 0
    for a in range(0, len(order), batch_size):
        lens = lengths[order[a:a + batch_size]]
        real += int(lens.sum())
        padded += int(lens.max()) * len(lens)
    return 1.0 - real / max(1, padded)
