"""Run one trial: build the model from a recipe, train at the recipe's fidelity, evaluate, account.

The loop is deliberately small and deterministic on CPU (seeded shuffling with a private generator,
seeded initialisation, evaluation without randomness), so ``autopeft train`` reproduces a search
trial's score. Methods that act during training plug in through ``PeftModel.regularization`` (extra
loss) and ``PeftModel.after_step`` (e.g. AdaLoRA's rank allocation): no user call is needed.

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

from autopeft.model import PeftModel, count_parameters
from autopeft.recipe import Recipe, build_model
from autopeft.tasks import Split, Task, get_task, load_split

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrialResult:
    """What one trial measured.

    Attributes:
        score: the task's primary metric on the validation split (e.g. accuracy in [0, 1]).
        metrics: every metric of the task.
        trainable_params / head_params / backbone_params / trainable_percent: see ``ParameterCount``.
        peak_memory_bytes: peak training memory (see the module docstring), bytes.
        examples_seen / steps: the fidelity actually trained.
        train_time_s / wall_time_s: seconds in training steps / in the whole trial.
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
        return t

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


class Batches:
    """Tokenises examples of a split in batches: ``batch(indices)`` -> dict of (B, T) tensors + labels."""

    def __init__(self, split: Split, tokenizer, max_length: int, device: torch.device) -> None:
        self.split, self.tok, self.max_length, self.device = split, tokenizer, max_length, device

    def batch(self, idx) -> dict[str, torch.Tensor]:
        texts = [self.split.texts[i] for i in idx]
        columns = list(zip(*texts))
        enc = self.tok(*[list(c) for c in columns], truncation=True, max_length=self.max_length,
                       padding=True, return_tensors="pt")
        out = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out["labels"] = torch.as_tensor(self.split.labels[list(idx)]).to(self.device)
        return out


def train_order(n: int, total: int, seed: int) -> np.ndarray:
    """Indices of the first ``total`` training examples: epochs of seeded permutations of ``range(n)``."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(total / n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:total]


@torch.no_grad()
def evaluate(model: PeftModel, task: Task, batches: Batches, batch_size: int, limit: int | None = None) -> dict[str, float]:
    """All task metrics on ``batches.split`` (the first ``limit`` examples if given)."""
    was_training = model.training
    model.eval()
    n = len(batches.split) if limit is None else min(limit, len(batches.split))
    preds = []
    for start in range(0, n, batch_size):
        b = batches.batch(range(start, min(n, start + batch_size)))
        b.pop("labels")
        logits = model(**b).logits.float()
        preds.append(logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1))
    model.train(was_training)
    pred = torch.cat(preds).cpu().numpy()
    return task.score(pred, batches.split.labels[:n])


def run_trial(recipe: Recipe, data_dir: str | Path | None = None, rungs: list[int] | None = None,
              report: Callable[[dict], None] | None = None, device: str | None = None,
              log: Callable[[str], None] | None = None) -> tuple[TrialResult, PeftModel]:
    """Train and evaluate one recipe.

    Args:
        recipe: the trial.
        data_dir: local GLUE folder (else ``$AUTOPEFT_DATA_DIR``, else the hub).
        rungs: examples-seen milestones at which to evaluate and call ``report`` (the last
            milestone is always ``recipe.training.max_train_examples``).
        report: called with a metrics dict at every rung; it may raise to stop the trial (Ray Tune).
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        log: receives one-line progress messages.

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
    train_split = load_split(task, "train", data_dir)
    val_split = load_split(task, "validation", data_dir)
    from autopeft.backbones import load_tokenizer

    tokenizer = load_tokenizer(recipe.backbone)
    model = build_model(recipe, device=str(dev)).to(dev)
    counts = count_parameters(model)
    train_b = Batches(train_split, tokenizer, tr.max_seq_length, dev)
    val_b = Batches(val_split, tokenizer, tr.max_seq_length, dev)

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

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    order = train_order(len(train_split), tr.max_train_examples, tr.seed)
    milestones = sorted({r for r in (rungs or []) if 0 < r < tr.max_train_examples} | {tr.max_train_examples})
    meter = _SavedTensorMeter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    history: list[dict] = []
    train_time = 0.0
    seen = step = 0
    result: TrialResult | None = None
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
            loss.backward()
            meter.end_step()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(idx)
            model.after_step(step)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        train_time += time.perf_counter() - t0
        metrics = evaluate(model, task, val_b, tr.eval_batch_size, tr.max_eval_examples)
        peak = peak_memory_bytes(model, optimizer, meter, dev)
        result = TrialResult(
            score=metrics[task.metric], metrics=metrics, trainable_params=counts.trainable_params,
            head_params=counts.head_params, backbone_params=counts.backbone_params,
            trainable_percent=counts.trainable_percent, peak_memory_bytes=peak, examples_seen=seen,
            steps=step, train_time_s=train_time, wall_time_s=time.perf_counter() - t_start, history=history)
        row = {k: v for k, v in result.as_dict().items() if k not in ("metrics", "history")} | metrics
        history.append(row)
        if log:
            log(f"{seen} examples: {task.metric}={result.score:.4f} ({train_time:.0f}s training)")
        if report is not None:
            report(row)
    assert result is not None
    return result, model


def make_optimizer(model: PeftModel, groups: list[dict], weight_decay: float, device: torch.device,
                   log: Callable[[str], None] | None = None) -> torch.optim.Optimizer:
    """AdamW; a paged 32-bit AdamW (bitsandbytes) for NF4-quantised models on CUDA (QLoRA, arXiv:2305.14314 §3)."""
    quantised = getattr(model, "quantized", False) or any(c.method == "qlora" for c in model.components)
    if quantised and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit(groups, weight_decay=weight_decay)
        except (ImportError, RuntimeError) as exc:  # pragma: no cover - CUDA only
            if log:
                log(f"paged AdamW unavailable ({exc}); using torch AdamW")
    elif quantised and log:
        log("no CUDA: paged optimiser not available, using torch AdamW")
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def peak_memory_bytes(model: PeftModel, optimizer: torch.optim.Optimizer, meter: _SavedTensorMeter,
                      device: torch.device) -> int:
    """Peak training memory in bytes (see the module docstring)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    return int(params + grads + state + meter.peak)


def save_trained(model: PeftModel, recipe: Recipe, result: TrialResult | None, out_dir: str | Path) -> Path:
    """Write the trainable tensors (safetensors), the recipe and the metrics to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    save_file(tensors, str(out / ADAPTER_FILE))
    recipe.save(out / "recipe.yaml")
    if result is not None:
        (out / "metrics.json").write_text(json.dumps(result.as_dict(), indent=2))
    return out


def load_trained(path: str | Path, device: str = "cpu") -> PeftModel:
    """Rebuild a model saved by :func:`save_trained`: fresh backbone + recipe + saved tensors.

    Raises:
        FileNotFoundError: the folder lacks the recipe or the weights.
        RuntimeError: the saved tensors do not match the recipe's model.
    """
    from safetensors.torch import load_file

    from autopeft.recipe import load_recipe

    path = Path(path)
    recipe = load_recipe(path / "recipe.yaml")
    model = build_model(recipe, device=device)
    tensors = load_file(str(path / ADAPTER_FILE), device=device)
    expected = set(model.trainable_state_dict())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise RuntimeError(f"saved weights do not fit the recipe: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(tensors, strict=False)
    return model.to(device)
