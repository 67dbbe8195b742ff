"""Run one trial: build the model from a recipe, train at the recipe's fidelity, evaluate, account.

The loop is deliberately small and deterministic on CPU (seeded shuffling with a private generator,
seeded initialisation, evaluation without randomness), so ``autopeft train`` reproduces a search
trial's score. Methods that act during training plug in through ``ComposedModel.regularization`` (extra
loss) and ``ComposedModel.after_step`` (e.g. AdaLoRA's rank allocation): no user call is needed.

Peak training memory (bytes):
* on CUDA, ``torch.cuda.max_memory_allocated`` over the training steps (the peak counter is read before
  each rung's evaluation and reset after it, so scoring never sets the peak);
* on CPU, a deterministic account: parameter bytes as stored + gradient bytes + optimiser-state
  bytes + the peak, over steps, of the bytes of distinct tensors saved for backward (measured with
  ``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autopeft.backbones.precision import grad_scaler
from autopeft.composition.model import ComposedModel, count_parameters
from autopeft.composition.recipe import ADAPTER_FILE, Recipe, build_model  # noqa: F401  (ADAPTER_FILE: importable from here, its old home)
from autopeft.data.tasks import Split, get_task
# The trainer's parts, each in its own module. Their names stay importable from here (their old home):
# user code and saved scripts that import them from ``autopeft.training.trainer`` keep working.
from autopeft.training.batches import (  # noqa: F401
    CACHE_ENV, MEGABATCH_MULT, TOKEN_CACHE_VERSION, Batches, Encoded, encode_split, length_grouped_order,
    padding_fraction, token_cache_dir, token_cache_key, tokenizer_fingerprint, train_order)
from autopeft.training.saved import is_trained_folder, load_trained, save_trained  # noqa: F401
from autopeft.training.scoring import (  # noqa: F401
    Scored, evaluate, predict_ids, score_split, score_test, trial_splits)
from autopeft.training.setup import (  # noqa: F401
    CHECKPOINTING_FROM, pick_device, set_backbone_dropout, set_gradient_checkpointing, set_precision)


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
            saved there (:func:`autopeft.training.saved.save_trained`) *before* that rung is reported, so a search keeps
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
    seen = step = cuda_peak = 0
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
        if dev.type == "cuda":
            cuda_peak = max(cuda_peak, int(torch.cuda.max_memory_allocated(dev)))
        t0 = time.perf_counter()
        top = seen >= tr.max_train_examples  # a rung within a batch of the top ends there: scored as the top
        scored = score_split(model, task, val_b if top or rung_b is None else rung_b, tr.eval_batch_size,
                             tr.max_eval_examples, seed=tr.seed)
        eval_time += time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)  # the evaluation's own peak is not training memory
        peak = peak_memory_bytes(model, optimizer, meter, dev, cuda_peak)
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
        OutputPathError: ``output_dir`` cannot be written (checked before training).
    """
    from autopeft._util import check_can_write
    from autopeft.composition.recipe import check_recipe, load_recipe
    from autopeft.errors import OutputPathError
    from autopeft.backbones.threads import limit_threads, threads_for

    if cpus is not None and cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {cpus}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_recipe(recipe, for_training=True)  # limits of the backbone/task/training: one line, before any data
    if output_dir is not None:
        check_can_write(output_dir, "output folder", OutputPathError)  # before training, not at the save
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
                      device: torch.device, cuda_peak: int | None = None) -> int:
    """Peak training memory in bytes (see the module docstring); on CUDA ``cuda_peak``, the largest
    ``torch.cuda.max_memory_allocated`` the training steps reached (``None``: the counter as it stands)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) if cuda_peak is None else cuda_peak)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    return int(params + grads + state + meter.peak)


