"""Score a model on a split: predictions in split order, every task metric, and the primary metric's
seeded 95% bootstrap interval; the splits a recipe trains and is scored on (``dev`` carved from train
in a search, else the task's validation split) and the one scoring of a model on the untouched test
split.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autopeft.composition.model import ComposedModel
from autopeft.composition.recipe import Recipe
from autopeft.data.tasks import Split, Task, get_task, load_split
from autopeft.training.batches import Batches
from autopeft.training.setup import pick_device


@torch.no_grad()
def predict_ids(model: ComposedModel, task: Task, batches: Batches, batch_size: int, limit: int | None = None) -> np.ndarray:
    """Predictions on ``batches.split`` (the first ``limit`` examples if given), in split order.

    Returns:
        (N,) int64 class ids (argmax of the logits), or float64 values for regression
        (``task.num_labels == 1``).

    Raises:
        ValueError: ``batch_size`` is not a whole number >= 1 (was: a negative one scored nothing and
            returned class 0 for every example).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
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
