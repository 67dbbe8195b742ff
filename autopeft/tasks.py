"""GLUE task registry: columns, label counts, metrics, and data loading (local folder or the hub).

Local layout (as in ``shared/data/glue``): ``<data_dir>/<task>/{train,validation,test}.{tsv,parquet}``;
SST-2 as GLUE's original TSV, the others as Hugging Face ``glue`` parquet. The folder comes from
``--data-dir`` or ``AUTOPEFT_DATA_DIR``; without one, data is loaded from the Hugging Face hub
(``nyu-mll/glue``), which needs internet.

Metrics (Wang et al., GLUE, arXiv:1804.07461, table 1): accuracy; Matthews correlation for CoLA;
F1 and accuracy for MRPC; Pearson and Spearman correlation for STS-B. Scores are in [0, 1]
(correlations in [-1, 1]); the first metric listed is the one the search maximises.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DATA_DIR_ENV = "AUTOPEFT_DATA_DIR"


class TaskError(ValueError):
    """Unknown task or missing data."""


def _accuracy(pred, gold):
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def _mcc(pred, gold):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))


def _f1(pred, gold):
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred))


def _pearson(pred, gold):
    from scipy.stats import pearsonr

    return float(pearsonr(pred, gold)[0])


def _spearman(pred, gold):
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold)[0])


@dataclass(frozen=True)
class Task:
    """A GLUE task.

    Attributes:
        name: registry name (``sst2``).
        text_columns: one column (single sentence) or two (sentence pair).
        num_labels: classes; 1 means regression (STS-B).
        metrics: name -> ``fn(predictions, labels) -> float``; the first is the primary metric.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: dict[str, Callable] = field(hash=False)

    @property
    def metric(self) -> str:
        """Name of the primary metric (the one searches maximise)."""
        return next(iter(self.metrics))

    def score(self, predictions, labels) -> dict[str, float]:
        """All metrics of this task for ``predictions`` (class ids, or floats for regression)."""
        return {name: fn(predictions, labels) for name, fn in self.metrics.items()}


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", ("sentence",), 2, {"accuracy": _accuracy}),
        Task("cola", ("sentence",), 2, {"mcc": _mcc, "accuracy": _accuracy}),
        Task("mrpc", ("sentence1", "sentence2"), 2, {"f1": _f1, "accuracy": _accuracy}),
        Task("rte", ("sentence1", "sentence2"), 2, {"accuracy": _accuracy}),
        Task("stsb", ("sentence1", "sentence2"), 1, {"pearson": _pearson, "spearman": _spearman}),
        Task("wnli", ("sentence1", "sentence2"), 2, {"accuracy": _accuracy}),
        Task("qnli", ("question", "sentence"), 2, {"accuracy": _accuracy}),
    ]
}


def get_task(name: str) -> Task:
    """Look up a task.

    Raises:
        TaskError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower().replace("-", "")
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class Split:
    """One split: ``texts[i]`` is a tuple of 1 or 2 strings; ``labels[i]`` an int or float."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local GLUE folder: the argument, else ``$AUTOPEFT_DATA_DIR``, else ``None`` (use the hub).

    Raises:
        TaskError: the folder given does not exist.
    """
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        return None
    path = Path(data_dir).expanduser().resolve()  # absolute: Ray workers run in other folders
    if not path.is_dir():
        raise TaskError(f"data dir {str(path)!r} does not exist")
    return path


def load_split(task: Task, split: str, data_dir: str | Path | None = None) -> Split:
    """Load ``split`` (train/validation/test) of ``task`` from the local folder or the hub.

    Raises:
        TaskError: the local folder lacks the file, or the hub cannot be reached.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        return _from_hub(task, split)
    base = root / task.name / split
    tsv, parquet = base.with_suffix(".tsv"), base.with_suffix(".parquet")
    import pandas as pd

    if tsv.exists():
        df = pd.read_csv(tsv, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    elif parquet.exists():
        df = pd.read_parquet(parquet)
    else:
        raise TaskError(f"no {split} data for {task.name} in {root} (looked for {tsv.name} or {parquet.name})")
    return _to_split(task, df)


def _to_split(task: Task, df) -> Split:
    missing = [c for c in (*task.text_columns, "label") if c not in df.columns]
    if missing:
        raise TaskError(f"{task.name} data lacks columns {missing}")
    texts = list(zip(*(df[c].astype(str).tolist() for c in task.text_columns)))
    dtype = np.float32 if task.num_labels == 1 else np.int64
    return Split(texts, df["label"].to_numpy().astype(dtype))


def _from_hub(task: Task, split: str) -> Split:  # pragma: no cover - needs internet
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=split)
    except Exception as exc:
        raise TaskError(
            f"cannot load {task.name}/{split} from the Hugging Face hub ({type(exc).__name__}); "
            f"pass --data-dir or set {DATA_DIR_ENV} to a local GLUE folder") from None
    return _to_split(task, ds.to_pandas())
