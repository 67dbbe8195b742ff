"""Run one trial: build the model from a recipe, train at the recipe's fidelity, evaluate, account.

The loop is deliberately small and deterministic on CPU (seeded shuffling with a private generator,
seeded initialisation, evaluation without randomness), so ``autopeft train`` reproduces a search
trial's score. Methods that act during training plug in through ``ComposedModel.regularization`` (extra
loss) and ``ComposedModel.after_step`` (e.g. AdaLoRA's rank allocation): no user call is needed.

Peak training memory (bytes):
* on CUDA, ``torch.cuda.max_memory_allocated`` over the training steps;
* on CPU, a deterministic account: parameter bytes as stored + gradient bytes + optimiser-state
  bytes + the peak, over steps, of the bytes of distinct tensors saved for backward (measured with
  ``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autopeft.backbones.precision import cast_for_training, compute_dtype, grad_scaler, resolve_precision
from autopeft.composition.model import ComposedModel, count_parameters
from autopeft.composition.recipe import ADAPTER_FILE, Recipe, build_model, recipe_as_built
from autopeft.data.tasks import Split, Task, get_task, load_split


@dataclass
class TrialResult:
    """What one trial measured.

    Attributes:
        score: the task's primary metric on the split the trial is scored on (e.g. accuracy in [0, 1]):
            the dev split when the recipe sets ``dev`` (every search), else the validation split.
        metrics: every metric of the task on that split.
        score_low / score_high: the 95% bootstrap interval of ``score`` (:mod:`autopeft.data.uncertainty`).
        eval_split / eval_examples: ``dev`` or ``validation``, and its size.
        trainable_params / head_params / backbone_params / trainable_percent: see ``ParameterCount``.
        peak_memory_bytes: peak training memory (see the module docstring), bytes.
        examples_seen / steps: the fidelity actually trained.
        train_time_s / wall_time_s: seconds in training steps / in the whole trial.
        setup_time_s / eval_time_s: seconds of the trial's wall time before its first step (data, model
            build, optimiser) / in scoring its rungs; the rest of ``wall_time_s`` is training and saving.
        test_score / test_low / test_high / test_metrics / test_examples: the untouched test split
            (the task's validation split), scored once after training when asked
            (``run_trial(test=True)``, as ``autopeft train`` does for a recipe with ``dev``); ``None``
            otherwise, and always inside a search.
        threads / interop_threads: PyTorch's intra-op / inter-op threads the trial computed on
            (:mod:`autopeft.backbones.threads`: the CPUs it was given).
        precision: the compute precision the trial ran in (``fp32``, ``bf16`` or ``fp16``: the
            recipe's ``training.precision`` resolved for the device, :mod:`autopeft.backbones.precision`).
    """

    score: float
    metrics: dict[str, float]
    trainable_params: int
    head_params: int
    backbone_params: int
    trainable_percent: float
    peak_memory_bytes: int
    examples_seen: int
    steps: int
    train_time_s: float
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    score_low: float | None = None
    score_high: float | None = None
    eval_split: str = "validation"
    eval_examples: int = 0
    test_score: float | None = None
    test_low: float | None = None
    test_high: float | None = None
    test_metrics: dict[str, float] | None = None
    test_examples: int | None = None
    threads: int = 0
    interop_threads: int = 0
    precision: str = "fp32"
    setup_time_s: float = 0.0
    eval_time_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class _SavedTensorMeter:
    """Counts bytes of distinct tensors saved for backward during one forward pass."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.bytes = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            try:
                key = (t.untyped_storage().data_ptr(), t.device)
                size = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
                key, size = id(t), t.numel() * t.element_size()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += size
        # Not ``t`` itself: an op that saves its own output (tanh, sigmoid, ...) would then hold that
        # output, whose grad_fn is the op's node: a cycle through C++ that gc cannot see. Where the
        # output is never back-propagated (BERT's pooler under mean pooling) the graph, with the
        # trainable parameters it saved, then outlived the trial: +25 parameters and ~80 MiB a trial.
        return t.detach()

    def end_step(self) -> None:
        self.peak = max(self.peak, self.bytes)
        self.seen.clear()
        self.bytes = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


@torch.no_grad()
def predict_ids(model: ComposedModel, task: Task, batches: Batches, batch_size: int, limit: int | None = None) -> np.ndarray:
    """Predictions on ``batches.split`` (the first ``limit`` examples if given), in split order.

    Returns:
        (N,) int64 class ids (argmax of the logits), or float64 values for regression
        (``task.num_labels == 1``).
    """
    was_training = model.training
    model.eval()
    n = len(batches.split) if limit is None else min(limit, len(batches.split))
    order = np.argsort(-batches.lengths[:n], kind="stable")  # length-sorted: little padding
    pred = np.zeros(n, dtype=np.float64 if task.num_labels == 1 else np.int64)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        b = batches.batch(idx)
        b.pop("labels")
        logits = model(**b).logits.float()
        pred[idx] = (logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1)).cpu().numpy()
    model.train(was_training)
    return pred


def evaluate(model: ComposedModel, task: Task, batches: Batches, batch_size: int, limit: int | None = None) -> dict[str, float]:
    """All task metrics on ``batches.split`` (the first ``limit`` examples if given)."""
    pred = predict_ids(model, task, batches, batch_size, limit)
    return task.score(pred, batches.split.labels[:len(pred)])


@dataclass
class Scored:
    """A model's scores on one split: every metric, the primary one with its 95% bootstrap interval.

    Attributes:
        metrics: metric name -> value.
        score: the task's primary metric; ``low`` / ``high`` its interval; ``examples`` scored.
    """

    metrics: dict[str, float]
    score: float
    low: float
    high: float
    examples: int


def score_split(model: ComposedModel, task: Task, batches: Batches, batch_size: int, limit: int | None = None,
                seed: int = 0) -> Scored:
    """:func:`evaluate` plus the primary metric's 95% bootstrap interval (seeded,
    :func:`autopeft.data.uncertainty.bootstrap_ci`)."""
    from autopeft.data.uncertainty import bootstrap_ci

    pred = predict_ids(model, task, batches, batch_size, limit)
    gold = batches.split.labels[:len(pred)]
    metrics = task.score(pred, gold)
    low, high = bootstrap_ci(task.metrics[task.metric], pred, gold, seed=seed)
    return Scored(metrics, metrics[task.metric], low, high, len(pred))


def trial_splits(recipe: Recipe, data_dir: str | Path | None = None) -> tuple[Split, Split, str]:
    """``(train, eval, eval name)`` of a recipe: with ``recipe.dev``, train less the carved dev split
    and that dev split (``"dev"``); without, all of train and the validation split (``"validation"``).

    Raises:
        TaskError: missing data, or a dev split too large for train.
    """
    from autopeft.data.tasks import carve_dev

    task = get_task(recipe.task)
    train_split = load_split(task, "train", data_dir)
    if recipe.dev is not None:
        train_split, dev_split = carve_dev(train_split, recipe.dev, regression=task.num_labels == 1)
        return train_split, dev_split, "dev"
    return train_split, load_split(task, "validation", data_dir), "validation"


def score_test(model: ComposedModel, recipe: Recipe, data_dir: str | Path | None = None, device: str | None = None,
               tokenizer=None) -> Scored:
    """Score a trained model once on the recipe's untouched test split: the task's validation split
    (user data without one: its seeded ``held_out`` part). Evaluation only; seeded interval.

    Raises:
        TaskError: missing data.
    """
    from autopeft.backbones import load_tokenizer

    task = get_task(recipe.task)
    dev = pick_device(device)
    tokenizer = tokenizer or load_tokenizer(recipe.backbone)
    test_b = Batches(load_split(task, "validation", data_dir), tokenizer, recipe.training.max_seq_length, dev)
    return score_split(model, task, test_b, recipe.training.eval_batch_size, seed=recipe.training.seed)


#: Backbone size (parameters) from which ``training.gradient_checkpointing: null`` turns checkpointing on.
CHECKPOINTING_FROM = 1_000_000_000


def set_gradient_checkpointing(model: ComposedModel, recipe: Recipe) -> bool:
    """Turn on the backbone's gradient checkpointing when the recipe asks for it (``None``: when the
    backbone has over :data:`CHECKPOINTING_FROM` parameters); returns whether it is on.

    Non-reentrant checkpointing (``use_reentrant=False``): the layers' inputs need not require grad (a
    frozen embedding is fine), tensors a layer reads from outside it (prefix keys and values, gates)
    receive their gradients, and dropout draws the same masks in the recomputation, so the gradients
    equal those without checkpointing (tests/test_precision.py checks every family that trains
    through the backbone)."""
    want = recipe.training.gradient_checkpointing
    if want is None:
        want = model.backbone_params > CHECKPOINTING_FROM
    if want:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return bool(want)


def set_backbone_dropout(model: ComposedModel, p: float | None) -> int:
    """Set the probability of every dropout module of the frozen backbone (``training.backbone_dropout``)
    to ``p``: embeddings, attention probabilities, hidden states and the task head's, including those of
    backbone modules an autopeft wrapper holds (``base_layer`` / ``base``); the method modules' own
    dropout (``lora_dropout``, ...) is theirs to set. ``None`` changes nothing. transformers' attention
    reads its ``nn.Dropout``'s ``p`` at each call (``dropout=self.dropout.p``), so the change reaches the
    fused attention kernels too. Returns how many modules were set.

    Dropout: Srivastava et al. 2014 (JMLR 15, eq. 2-3); the lever's effect on SST-2 is measured in
    experiments/gap_to_full_ft.md."""
    if p is None:
        return 0
    from autopeft.composition.walk import backbone_modules, is_autopeft_module

    dropouts = [m for _, m in backbone_modules(model.backbone)
                if isinstance(m, torch.nn.Dropout) and not is_autopeft_module(m)]
    for m in dropouts:
        m.p = float(p)
    return len(dropouts)


def set_precision(model: ComposedModel, recipe: Recipe, device: torch.device | str) -> str:
    """Put ``model`` in the recipe's precision (``training.precision`` resolved for ``device``, and
    ``training.backbone_dtype``; :func:`autopeft.backbones.precision.cast_for_training`) and make its forward run
    under autocast in it, for training and every evaluation alike. On CUDA, float32 matmuls (what
    autocast leaves in float32, and all of an ``fp32`` trial) use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``). Returns the resolved precision (``fp32``,
    ``bf16`` or ``fp16``)."""
    precision = resolve_precision(recipe.training.precision, device)
    cast_for_training(model, precision, recipe.training.backbone_dtype)
    model.compute_dtype = compute_dtype(precision)
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
    return precision


def run_trial(recipe: Recipe, data_dir: str | Path | None = None, rungs: list[int] | None = None,
              report: Callable[[dict], None] | None = None, device: str | None = None,
              log: Callable[[str], None] | None = None,
              on_step: Callable[[int, float, float], None] | None = None, keep_dir: str | Path | None = None,
              test: bool = False) -> tuple[TrialResult, ComposedModel]:
    """Train and evaluate one recipe.

    The loop over rungs stays in one piece (the setup and the result's parts are helpers): each step
    and each rung's score, save and report read and advance the same counters (examples seen, steps,
    training time).

    Args:
        recipe: the trial.
        data_dir: local GLUE folder (else ``$AUTOPEFT_DATA_DIR``, else the hub).
        rungs: examples-seen milestones at which to evaluate and call ``report`` (the last
            milestone is always ``recipe.training.max_train_examples``). A milestone below the last
            scores ``training.rung_eval_examples`` seeded rows of the eval split when set; the last
            always scores the whole split.
        report: called with a metrics dict at every rung; it may raise to stop the trial (Ray Tune).
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        log: receives one-line progress messages.
        on_step: called after every optimiser step with (training examples seen, that step's
            training loss incl. regularisation, seconds of training steps so far: evaluation and setup
            excluded) — live progress (:class:`autopeft.searching.progress.TrialProgressWriter`).
        keep_dir: when the trial reaches ``recipe.training.max_train_examples``, its trained weights are
            saved there (:func:`save_trained`) *before* that rung is reported, so a search keeps
            every top-fidelity model even when the report ends the trial.
        test: after training, score the model once on the untouched test split (only meaningful
            with ``recipe.dev``: without it the test split is the split the trial was scored on).
            Never set inside a search: no search decision may read the test split.

    Returns:
        ``(result, model)``: the result at the last rung reached and the trained model.

    Raises:
        TaskError, BackboneError, CompositionError: bad recipe parts.
    """
    t_start = time.perf_counter()
    tr = recipe.training
    dev = pick_device(device)
    seed_everything(tr.seed)
    task = get_task(recipe.task)
    train_split, val_split, eval_name = trial_splits(recipe, data_dir)
    from autopeft.backbones import load_tokenizer

    tokenizer = load_tokenizer(recipe.backbone)
    model = build_model(recipe, device=str(dev)).to(dev)
    counts = count_parameters(model)
    precision = set_precision(model, recipe, dev)
    set_gradient_checkpointing(model, recipe)
    set_backbone_dropout(model, tr.backbone_dropout)
    scaler = grad_scaler(dev, precision)
    train_b = Batches(train_split, tokenizer, tr.max_seq_length, dev)
    val_b = Batches(val_split, tokenizer, tr.max_seq_length, dev)

    optimizer, scheduler = _optimizer_and_schedule(model, tr, dev, log)
    if tr.group_by_length:
        order = length_grouped_order(train_b.lengths, tr.max_train_examples, tr.batch_size, tr.seed)
    else:
        order = train_order(len(train_split), tr.max_train_examples, tr.seed)
    milestones = sorted({r for r in (rungs or []) if 0 < r < tr.max_train_examples} | {tr.max_train_examples})
    # the rungs below the top: a seeded sample of the eval split (None: the whole split, as the top)
    rung_b = _rung_batches(val_split, recipe, tokenizer, dev) if len(milestones) > 1 else None
    meter = _SavedTensorMeter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    history: list[dict] = []
    train_time = eval_time = 0.0
    seen = step = 0
    result: TrialResult | None = None
    setup_time = time.perf_counter() - t_start
    for milestone in milestones:
        t0 = time.perf_counter()
        while seen < milestone:
            idx = order[seen: seen + tr.batch_size]  # batches never split at rungs: same steps with or without them
            batch = train_b.batch(idx)
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                out = model(**batch)
                loss = out.loss
                reg = model.regularization()
                if reg is not None:
                    loss = loss + reg
            scaler.scale(loss).backward()
            meter.end_step()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(idx)
            model.after_step(step)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}")
            if on_step is not None:
                on_step(seen, loss_value, train_time + time.perf_counter() - t0)
        train_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        top = seen >= tr.max_train_examples  # a rung within a batch of the top ends there: scored as the top
        scored = score_split(model, task, val_b if top or rung_b is None else rung_b, tr.eval_batch_size,
                             tr.max_eval_examples, seed=tr.seed)
        eval_time += time.perf_counter() - t0
        peak = peak_memory_bytes(model, optimizer, meter, dev)
        result = _rung_result(scored, counts, peak, seen, step, train_time, time.perf_counter() - t_start, history,
                              eval_name, precision, setup_time, eval_time)
        row = {k: v for k, v in result.as_dict().items()
               if k not in ("metrics", "history") and not k.startswith("test_")} | scored.metrics
        history.append(row)
        if log:
            log(f"{seen} examples: {eval_name} {task.metric}={result.score:.4f} "
                f"[{result.score_low:.4f}, {result.score_high:.4f}] ({train_time:.0f}s training)")
        if keep_dir is not None and seen >= tr.max_train_examples:
            save_trained(model, recipe, result, keep_dir)
        if report is not None:
            report(row)
    assert result is not None
    if test and recipe.dev is not None:
        _add_test_score(result, model, recipe, data_dir, dev, tokenizer, task.metric, log)
    return result, model


def _rung_batches(val_split: Split, recipe: Recipe, tokenizer, dev: torch.device) -> "Batches | None":
    """The batches a rung below the top scores: ``training.rung_eval_examples`` seeded rows of the eval
    split (seeded by the dev split's seed, so every trial of a search reads the same rows), or ``None``
    when the whole split is read there too (unset, or not smaller than the split after ``max_eval_examples``)."""
    tr = recipe.training
    n = min(len(val_split), tr.max_eval_examples or len(val_split))
    if tr.rung_eval_examples is None or tr.rung_eval_examples >= n:
        return None
    first = val_split if n == len(val_split) else Split(val_split.texts[:n], np.asarray(val_split.labels)[:n])
    seed = recipe.dev.seed if recipe.dev is not None else 0
    return Batches(first.sample(tr.rung_eval_examples, seed), tokenizer, tr.max_seq_length, dev)


def _optimizer_and_schedule(model: ComposedModel, tr, dev: torch.device, log: Callable[[str], None] | None):
    """``(optimizer, scheduler)`` of a trial: the trainable parameters in two groups (the method's at
    ``learning_rate``, the head's at ``head_learning_rate``; :func:`make_optimizer`) and a linear warm-up
    then linear decay over ``schedule_examples``; sets ``model.total_steps`` to that horizon (methods
    with a training-time schedule read it: AdaLoRA's budget)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if model.is_head_parameter(n)]
    rest = [p for n, p in trainable if not model.is_head_parameter(n)]
    groups = [{"params": rest, "lr": tr.learning_rate}, {"params": head, "lr": tr.head_learning_rate or tr.learning_rate}]
    optimizer = make_optimizer(model, [g for g in groups if g["params"]], tr.weight_decay, dev, log)
    schedule_steps = math.ceil((tr.schedule_examples or tr.max_train_examples) / tr.batch_size)
    warmup = int(tr.warmup_ratio * schedule_steps)
    model.total_steps = schedule_steps  # horizon for methods with a training-time schedule (AdaLoRA's budget)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (schedule_steps - step) / max(1, schedule_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def _rung_result(scored, counts, peak: int, seen: int, step: int, train_time: float, wall_time: float,
                 history: list[dict], eval_name: str, precision: str = "fp32", setup_time: float = 0.0,
                 eval_time: float = 0.0) -> TrialResult:
    """The :class:`TrialResult` of a rung: its dev score, the parameter counts, peak memory and times."""
    return TrialResult(
        score=scored.score, metrics=scored.metrics, trainable_params=counts.trainable_params,
        head_params=counts.head_params, backbone_params=counts.backbone_params,
        trainable_percent=counts.trainable_percent, peak_memory_bytes=peak, examples_seen=seen,
        steps=step, train_time_s=train_time, wall_time_s=wall_time, history=history,
        score_low=scored.low, score_high=scored.high, eval_split=eval_name, eval_examples=scored.examples,
        threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(), precision=precision,
        setup_time_s=setup_time, eval_time_s=eval_time)


def _add_test_score(result: TrialResult, model: ComposedModel, recipe: Recipe, data_dir: str | Path | None,
                    dev: torch.device, tokenizer, metric: str, log: Callable[[str], None] | None) -> None:
    """Score the trained model once on the untouched test split, into ``result``'s ``test_*`` fields."""
    t = score_test(model, recipe, data_dir, str(dev), tokenizer)
    result.test_score, result.test_low, result.test_high = t.score, t.low, t.high
    result.test_metrics, result.test_examples = t.metrics, t.examples
    if log:
        log(f"test {metric}={t.score:.4f} [{t.low:.4f}, {t.high:.4f}] on {t.examples:,} examples "
            "(the task's validation split, read once, after training)")


def train_and_save(recipe: Recipe | str | Path, data_dir: str | Path | None = None,
                   output_dir: str | Path | None = None, device: str | None = None,
                   log: Callable[[str], None] | None = print, cpus: int | None = None) -> TrialResult:
    """:func:`autopeft.api.train` (which see): check the recipe, train it on ``cpus`` threads, score it
    (dev and test for a search's recipe), save the weights to ``output_dir`` when given.

    Raises:
        ValueError: ``cpus`` below 1. RecipeError, TaskError, BackboneError, CompositionError: bad input.
    """
    from autopeft.composition.recipe import check_recipe, load_recipe
    from autopeft.backbones.threads import limit_threads, threads_for

    if cpus is not None and cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {cpus}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_recipe(recipe, for_training=True)  # limits of the backbone/task/training: one line, before any data
    limit_threads(threads_for(cpus))
    result, model = run_trial(recipe, data_dir, device=device, log=log, test=True)
    if output_dir is not None:
        save_trained(model, recipe, result, output_dir)
    return result


def make_optimizer(model: ComposedModel, groups: list[dict], weight_decay: float, device: torch.device,
                   log: Callable[[str], None] | None = None) -> torch.optim.Optimizer:
    """AdamW; a paged 32-bit AdamW (bitsandbytes) for NF4-quantised models on CUDA (QLoRA, arXiv:2305.14314 §3).

    Either way, ``optimizer.step()`` raises :class:`autopeft.methods.lora.MergedAdapterError` while a
    LoRA-style wrapper of ``model`` is merged (:func:`autopeft.methods.lora.merged_step_guard`).
    """
    from autopeft.methods.base import spec_of
    from autopeft.methods.lora import merged_step_guard

    quantised = getattr(model, "quantized", False) or any(spec_of(c).quantized_base for c in model.components)
    if quantised and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            paged = bnb.optim.PagedAdamW32bit(groups, weight_decay=weight_decay)
            paged.register_step_pre_hook(merged_step_guard(model))
            return paged
        except (ImportError, RuntimeError) as exc:  # pragma: no cover - CUDA only
            if log:
                log(f"paged AdamW unavailable ({exc}); using torch AdamW")
    elif quantised and log:
        log("no CUDA: paged optimiser not available, using torch AdamW")
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    optimizer.register_step_pre_hook(merged_step_guard(model))
    return optimizer


def peak_memory_bytes(model: ComposedModel, optimizer: torch.optim.Optimizer, meter: _SavedTensorMeter,
                      device: torch.device) -> int:
    """Peak training memory in bytes (see the module docstring)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    return int(params + grads + state + meter.peak)


def save_trained(model: ComposedModel, recipe: Recipe, result: TrialResult | None, out_dir: str | Path) -> Path:
    """Write everything that defines the trained adapter to ``out_dir``; returns ``out_dir``.

    * ``adapter_model.safetensors``: :meth:`ComposedModel.adapter_state_dict` - every trainable tensor
      plus the method modules' persistent state (AdaLoRA's rank masks and allocator step,
      AdapterDrop's inference ``n``, ...);
    * ``recipe.yaml``: the recipe of the model as it is now - after
      :func:`autopeft.methods.adapter_fusion.prune_fusion_adapters` it lists only the kept adapters;
    * ``metrics.json`` when ``result`` is given.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, str(out / ADAPTER_FILE))
    recipe = recipe_as_built(model, recipe)
    recipe.save(out / "recipe.yaml")
    if result is not None:
        (out / "metrics.json").write_text(json.dumps(result.as_dict(), indent=2))
    return out


def is_trained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_trained` (``recipe.yaml`` + weights)."""
    p = Path(path)
    return (p / "recipe.yaml").is_file() and (p / ADAPTER_FILE).is_file()


def load_trained(path: str | Path, device: str = "cpu", precision: str | None = None) -> ComposedModel:
    """Rebuild a model saved by :func:`save_trained`: fresh backbone + recipe + saved tensors.

    ``precision``: ``None`` (default) rebuilds it in the precision it was trained in (a bf16 model
    computes in bf16, so it scores as it scored in training); ``fp32`` gives float32 weights and compute
    (what an export writes).

    Restores the trainable tensors and the method modules' saved state (rank masks, ...; files
    written before that state was saved load too, with the state at its initial value), adapts the
    structure the saved tensors imply (a prefix encoder saved after ``freeze_to_table``), and returns
    the model in eval mode - every module, so two calls on the same input give the same output;
    call ``.train()`` to train it further.

    Raises:
        FileNotFoundError: the folder lacks the recipe or the weights.
        RuntimeError: the saved tensors do not match the recipe's model.
    """
    from safetensors.torch import load_file

    from autopeft.composition.recipe import load_recipe

    path = Path(path)
    recipe = load_recipe(path / "recipe.yaml")
    model = build_model(recipe, device=device)
    tensors = load_file(str(path / ADAPTER_FILE), device=device)
    for prefix, module in model.named_modules():
        adapt = getattr(module, "adapt_to_saved", None)
        if callable(adapt):
            adapt(f"{prefix}." if prefix else "", tensors)
    required = set(model.trainable_state_dict())
    allowed = required | set(model.method_state_dict())
    if not required <= set(tensors) <= allowed:
        missing, extra = sorted(required - set(tensors)), sorted(set(tensors) - allowed)
        raise RuntimeError(f"saved weights do not fit the recipe: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(tensors, strict=False)
    if precision is not None:
        recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
            update={"precision": precision, "backbone_dtype": "auto"})})
    set_precision(model, recipe, device)  # by default scored as it was trained (bf16 models in bf16)
    return model.to(device).eval()
