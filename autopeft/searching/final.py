"""After the search: the front's kept models scored once on the untouched test split, more seeds, a reference.

Every search decision (rung promotion, the sampler, the front, the pick) reads the **dev** split, carved
from train (:class:`autopeft.data.tasks.DevSplit`). Only when the search has ended does the driver read the
**test** split (the task's validation split; user data without one: its held-out part):

* :func:`score_front_on_test` loads each Pareto point's trained weights, kept by its trial under
  ``<search>/trained/<trial id>/`` (:func:`autopeft.training.trainer.run_trial`'s ``keep_dir``), and scores
  them once on test, with a 95% bootstrap interval (:mod:`autopeft.data.uncertainty`). No retraining: the
  model scored is the model the search trained, and the one ``autopeft export`` exports.
* :func:`confirm_seeds` (``--confirm-seeds K``) retrains each front point with K more training seeds
  at the top fidelity (the dev split unchanged) and reports mean and standard deviation of the test
  scores over the K + 1 seeds: the spread a seed change alone causes.
* :func:`train_reference` (``--reference full``) trains full fine-tuning of the same backbone at the
  same fidelity, on the same train/dev split, and scores it on test: the bar the front is read against.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from autopeft.errors import one_line
from autopeft._util import is_finite
from autopeft.searching.runs import TRAINED_SUBDIR, kept_dir  # noqa: F401  (their old home)

#: ``--reference`` kinds.
REFERENCES = ("full",)
#: Learning rate of the full fine-tuning reference (BERT's fine-tuning range, Devlin et al.
#: arXiv:1810.04805 sec. A.3; on MiniLM-L6 SST-2 it reached 89.2% after 33,696 examples).
FULL_FT_LEARNING_RATE = 5e-5


def _test_fields(scored) -> dict[str, Any]:
    return {"test_score": scored.score, "test_low": scored.low, "test_high": scored.high,
            "test_metrics": scored.metrics, "test_examples": scored.examples}


def score_front_on_test(front: list[dict], search_dir: str | Path, data_dir: str | None,
                        log: Callable[[str], None] | None = None) -> list[dict]:
    """Add ``test_score``, ``test_low``/``test_high`` (95% interval), ``test_metrics`` and
    ``test_examples`` to each Pareto row, scoring its kept model once on the test split.

    A row whose trial kept no weights (a cluster node without shared storage), or whose scoring
    raised, gets ``test_score`` ``None`` and a ``test_note`` saying why; nothing is retrained, and the
    front's other rows are still scored.

    Returns:
        ``front``, the same list, its rows updated.
    """
    from autopeft.composition.recipe import Recipe
    from autopeft.training.saved import is_trained_folder, load_trained
    from autopeft.training.scoring import score_test

    for row in front:
        folder = kept_dir(search_dir, row["trial_id"])
        if not is_trained_folder(folder):
            row.update(test_score=None, test_note=f"no kept weights in {folder}")
            continue
        try:
            recipe = Recipe.model_validate(row["recipe"])
            row.update(_test_fields(score_test(load_trained(folder), recipe, data_dir)))
        except Exception as exc:  # recorded on its row; the other points are still scored
            row.update(test_score=None, test_note=f"test scoring failed: {one_line(exc)}")
            if log:
                log(f"test: {row['trial_id']} {row['test_note']}")
            continue
        if log:
            log(f"test: {row['trial_id']} {row['test_score']:.4f} [{row['test_low']:.4f}, {row['test_high']:.4f}] "
                f"(dev {row['score']:.4f})")
    return front


def confirm_seeds(front: list[dict], k: int, data_dir: str | None, device: str | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Retrain each front point with ``k`` more training seeds (the recipe's seed + 1 ... + k) at its
    fidelity and add ``confirm``: ``{"seeds", "dev_scores", "test_scores", "test_mean", "test_std",
    "dev_mean", "dev_std"}`` over the original seed and the ``k`` new ones (std: sample standard
    deviation, ``nan`` for one seed; means and deviations over the seeds that gave a finite score). The
    dev split stays the search's. A seed whose run raises is recorded (``None`` scores, its one-line
    error under ``confirm["failed"][seed]``); the other seeds and points still run.

    Raises:
        ValueError: ``k`` < 0.
    """
    from autopeft.composition.recipe import Recipe
    from autopeft.training.trainer import run_trial

    if k < 0:
        raise ValueError(f"confirm seeds must be >= 0, got {k}")
    if k == 0:
        return front
    for row in front:
        recipe = Recipe.model_validate(row["recipe"])
        seeds, dev, test = [recipe.training.seed], [row["score"]], [row.get("test_score")]
        failed = {}
        for j in range(1, k + 1):
            seed = recipe.training.seed + j
            again = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": seed})})
            seeds.append(seed)
            try:
                result, _ = run_trial(again, data_dir, device=device, test=True)
            except Exception as exc:  # recorded; the other seeds and points still run
                failed[seed] = one_line(exc)
                dev.append(None)
                test.append(None)
                if log:
                    log(f"confirm: {row['trial_id']} seed {seed} failed: {failed[seed]}")
                continue
            dev.append(result.score)
            test.append(result.test_score)
            if log:
                log(f"confirm: {row['trial_id']} seed {seed}: dev {result.score:.4f}, test {result.test_score:.4f}")
        dev_ok, test_ok = _finite(dev), _finite(test)
        row["confirm"] = {"seeds": seeds, "dev_scores": dev, "test_scores": test,
                          "dev_mean": statistics.fmean(dev_ok) if dev_ok else None,
                          "dev_std": _std(dev_ok) if dev_ok else None,
                          "test_mean": statistics.fmean(test_ok) if test_ok else None,
                          "test_std": _std(test_ok) if test_ok else None,
                          **({"failed": failed} if failed else {})}
    return front


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def _finite(xs: list) -> list[float]:
    return [x for x in xs if is_finite(x)]



def reference_recipe(kind: str, base: dict[str, Any]) -> dict[str, Any]:
    """The recipe mapping of a ``--reference`` run: ``full`` = full fine-tuning of the search's backbone,
    mean pooling, lr :data:`FULL_FT_LEARNING_RATE`, the search's task, dev split, fidelity and seed.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in REFERENCES:
        raise ValueError(f"unknown reference {kind!r}; valid: {', '.join(REFERENCES)}")
    training = {**base.get("training", {}), "learning_rate": FULL_FT_LEARNING_RATE}
    training.pop("head_learning_rate", None)
    return {**{k: v for k, v in base.items() if k != "training"}, "components": [{"method": "full_finetuning"}],
            "pooling": "mean", "training": training}


def train_reference(kind: str, base: dict[str, Any], data_dir: str | None, device: str | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the ``--reference`` run (:func:`reference_recipe`) and score it on dev and, once, on test.

    Returns:
        ``{"kind", "recipe", "status": "finished", "score", "score_low", "score_high", "test_score",
        "test_low", "test_high", "test_metrics", "trainable_params", "examples_seen", "train_time_s"}``;
        when the run raises: ``{"kind", "recipe", "status": "failed", "error"}`` (the search's results
        are kept either way).
    """
    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.training.trainer import run_trial

    recipe = recipe_from_dict(reference_recipe(kind, base))
    if log:
        log(f"reference: training {kind} fine-tuning at {recipe.training.max_train_examples:,} examples")
    try:
        result, _ = run_trial(recipe, data_dir, device=device, test=True)
    except Exception as exc:
        if log:
            log(f"reference {kind} failed: {one_line(exc)}")
        return {"kind": kind, "recipe": recipe.model_dump(mode="json"), "status": "failed", "error": one_line(exc)}
    out = {"kind": kind, "recipe": recipe.model_dump(mode="json"), "status": "finished", "score": result.score,
           "score_low": result.score_low, "score_high": result.score_high, "test_score": result.test_score,
           "test_low": result.test_low, "test_high": result.test_high, "test_metrics": result.test_metrics,
           "trainable_params": result.trainable_params, "examples_seen": result.examples_seen,
           "train_time_s": result.train_time_s}
    if log:
        log(f"reference {kind}: dev {result.score:.4f}, test {result.test_score:.4f} "
            f"[{result.test_low:.4f}, {result.test_high:.4f}]")
    return out
