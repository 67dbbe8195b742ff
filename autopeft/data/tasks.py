"""Task registry: columns, label counts, metrics, and data loading (local folder or the hub).

Built-in tasks: the GLUE tasks (``sst2``, ``cola``, ``mrpc``, ``rte``, ``stsb``, ``wnli``, ``qnli``,
``qqp``, ``mnli`` with the matched validation split and ``mnli-mm`` with the mismatched one) and the
SuperGLUE classification tasks ``superglue-boolq``, ``superglue-cb`` and ``superglue-rte`` (aliases
``boolq``, ``cb``; plain ``rte`` is GLUE's).

Local layout (as in ``shared/data/glue``): ``<data_dir>/<folder>/<split>.{tsv,parquet}`` with the
folder the task name (``mnli`` for both MNLI tasks) and the split named as on the hub
(``validation_matched``); SST-2 as GLUE's original TSV, the others as Hugging Face parquet. The
folder comes from ``--data-dir`` or ``AUTOPEFT_DATA_DIR``; without one, data is loaded from the
Hugging Face hub (``nyu-mll/glue``; SuperGLUE from ``aps/super_glue``'s parquet conversion), which
needs internet.

User data (a CSV / TSV / JSON Lines / Parquet file or folder, or ``hf:org/name``) is a
:class:`TaskSpec` in the recipe instead of a name; :mod:`autopeft.data.userdata` reads it.

Metrics (Wang et al., GLUE, arXiv:1804.07461, table 1; Wang et al., SuperGLUE, arXiv:1905.00537,
table 1): accuracy; Matthews correlation for CoLA; F1 and accuracy for MRPC and QQP; Pearson and
Spearman correlation for STS-B; accuracy and macro-F1 for CB. Scores are in [0, 1] (correlations
in [-1, 1]); the first metric listed is the one the search maximises.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# TaskError, Split and cell_texts live below this module (autopeft.data.userfiles reads user data with them);
# re-exported here, their old home.
from autopeft.errors import TaskError  # noqa: F401
from autopeft.data.splits import Split, cell_texts  # noqa: F401
from autopeft.data.userfiles import load_user_split

DATA_DIR_ENV = "AUTOPEFT_DATA_DIR"


def _accuracy(pred, gold):
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def _mcc(pred, gold):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))


def _f1(pred, gold):
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred))


def _f1_macro(pred, gold):
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, average="macro"))


def _pearson(pred, gold):
    from scipy.stats import pearsonr

    return float(pearsonr(pred, gold)[0])


def _spearman(pred, gold):
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold)[0])


#: Every metric by name: ``fn(predictions, labels) -> float``.
METRICS: dict[str, Callable] = {"accuracy": _accuracy, "f1": _f1, "f1_macro": _f1_macro, "mcc": _mcc,
                                "pearson": _pearson, "spearman": _spearman}
#: The metrics of user classification data (accuracy first) and of user regression data.
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


class HeldOut(BaseModel):
    """How a validation split was cut from train when the data has none: a seeded ``fraction``,
    stratified by label for classification (``sklearn.model_selection.train_test_split``)."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    stratified: bool = True


class DevSplit(BaseModel):
    """The ``dev`` split a search selects on, carved from train: ``examples`` rows, seeded, stratified
    by label for classification (``sklearn.model_selection.train_test_split``). Training then uses the
    rest of train; the task's validation split (or, for user data with only a train file, the seeded
    ``held_out`` part of it) is the ``test`` split, which no search decision reads.

    Attributes:
        examples: rows of train set aside as dev (at most half of train).
        seed: seeds the carving (the same rows on every node and in ``autopeft train``).
        stratified: keep the label proportions of train (classification only).
    """

    model_config = ConfigDict(extra="forbid")

    examples: int = Field(ge=1)
    seed: int = 0
    stratified: bool = True


#: Default dev size: this share of train, at most :data:`DEV_MAX_EXAMPLES` and at least
#: :data:`DEV_MIN_EXAMPLES` rows (never more than half of train). Why these numbers:
#: ``experiments/gap_to_full_ft.md`` (a dev of 2,000 SST-2 examples has a standard error of 0.7
#: points at 88% accuracy, against 1.1 for the 872 of validation, and one evaluation of it costs a few
#: seconds on 2 cores; a search's top rung reads all of it, its lower rungs a seeded 500 of it:
#: :data:`autopeft.api.RUNG_EVAL_EXAMPLES`).
DEV_FRACTION = 0.1
DEV_MAX_EXAMPLES = 2000
DEV_MIN_EXAMPLES = 100


def metric_name(task) -> str:
    """The selection metric's name of ``task`` (a built-in name or a user-data spec, as ``search.json``
    records it): ``accuracy``, ``pearson``, ``mcc``, ...; ``score`` when it cannot be told (an unknown
    task or a malformed spec). For messages: never raises."""
    from autopeft.errors import AutopeftError

    try:
        return get_task(task).metric
    except (AutopeftError, AttributeError, KeyError, TypeError, ValueError):
        return "score"


def default_dev_examples(n_train: int) -> int:
    """Rows of train to carve as dev: ``clip(round(0.1 n), 100, 2000)``, at most ``n // 2``.

    Raises:
        TaskError: train has fewer than 4 rows (nothing left to carve a dev split from).
    """
    if n_train < 4:
        raise TaskError(f"train has {n_train} rows: too few to carve a dev split for the search from")
    return int(min(n_train // 2, max(DEV_MIN_EXAMPLES, min(DEV_MAX_EXAMPLES, round(DEV_FRACTION * n_train)))))


def carve_dev(split: "Split", dev: DevSplit, regression: bool = False) -> "tuple[Split, Split]":
    """``(train without dev, dev)`` of ``split``: ``dev.examples`` seeded rows, stratified by label for
    classification when every class has at least two rows (else plain seeded). Both keep the rows'
    original order.

    Raises:
        TaskError: ``dev.examples`` leaves fewer than one training row.
    """
    from sklearn.model_selection import train_test_split

    n = len(split)
    if dev.examples >= n:
        raise TaskError(f"a dev split of {dev.examples:,} rows leaves nothing to train on: train has {n:,}")
    labels = np.asarray(split.labels)
    stratify = None
    if dev.stratified and not regression:
        _, counts = np.unique(labels, return_counts=True)
        n_classes = len(counts)
        if counts.min() >= 2 and n_classes <= dev.examples and n_classes <= n - dev.examples:
            stratify = labels
    tr, dv = train_test_split(np.arange(n), test_size=dev.examples, random_state=dev.seed, shuffle=True,
                              stratify=stratify)
    tr, dv = np.sort(tr), np.sort(dv)
    return (Split([split.texts[i] for i in tr], labels[tr]), Split([split.texts[i] for i in dv], labels[dv]))


class TaskSpec(BaseModel):
    """A task in a recipe when a name is not enough: user data, or a built-in task with ``metric`` set.

    Attributes:
        name: a built-in task name (``source`` empty), or a display name of user data.
        source: user data: an absolute path of a CSV / TSV / JSON Lines / Parquet file or of a folder
            of ``train.*`` and optional ``validation.*`` files, or ``hf:<dataset id>[:<config>]``.
        text_columns: one column (single text) or two (text pair) of the data.
        label_column: the label column of the data.
        labels: the original class labels in id order (sorted), id ``i`` is ``labels[i]``; empty for
            regression.
        regression: float labels, one output.
        metric: the metric searches maximise (default: the task's first).
        held_out: set when validation is cut from train (the data has no validation split).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    labels: list[bool | int | str] | None = None
    regression: bool = False
    metric: str | None = None
    held_out: HeldOut | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        if self.source is None:
            extra = [k for k in ("text_columns", "label_column", "labels", "held_out") if getattr(self, k)]
            if extra or self.regression:
                raise ValueError(f"task {self.name!r}: {', '.join(extra or ['regression'])} need a data source "
                                 "(source: a file, folder or hf:name)")
            return self
        if not self.text_columns or len(self.text_columns) > 2:
            raise ValueError(f"task {self.name!r}: text_columns must name one or two columns, got {self.text_columns}")
        if not self.label_column:
            raise ValueError(f"task {self.name!r}: label_column is missing")
        if self.regression == bool(self.labels):
            raise ValueError(f"task {self.name!r}: give either labels (classification) or regression: true")
        if self.labels is not None and len(self.labels) != len(set(self.labels)):
            raise ValueError(f"task {self.name!r}: labels must be distinct, got {self.labels}")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler):  # recipes show only what is set
        return {k: v for k, v in handler(self).items() if v is not None and not (k == "regression" and not v)}


@dataclass(frozen=True)
class Task:
    """A task: what the model reads, what it predicts, how it is scored, where its data is.

    Attributes:
        name: registry name (``sst2``), or a display name of user data.
        text_columns: one column (single sentence) or two (sentence pair).
        num_labels: classes; 1 means regression (STS-B).
        metrics: name -> ``fn(predictions, labels) -> float``; the first is the primary metric.
        hub: ``(path, config, revision)`` of the Hugging Face dataset (built-in tasks).
        folder: the task's folder in a local data dir (default: ``name``).
        splits: split name -> the name in the data (``validation`` -> ``validation_matched``).
        label_names: the original labels in id order (user classification data); ``None``: the
            data's labels are the ids.
        spec: the :class:`TaskSpec` of user data (``None`` for built-in tasks).
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: dict[str, Callable] = field(hash=False)
    hub: tuple[str, str | None, str | None] = ("nyu-mll/glue", None, None)
    folder: str | None = None
    splits: dict[str, str] = field(default_factory=dict, hash=False)
    label_names: tuple[Any, ...] | None = None
    spec: TaskSpec | None = field(default=None, hash=False, compare=False)

    @property
    def metric(self) -> str:
        """Name of the primary metric (the one searches maximise)."""
        return next(iter(self.metrics))

    def score(self, predictions, labels) -> dict[str, float]:
        """All metrics of this task for ``predictions`` (class ids, or floats for regression)."""
        return {name: fn(predictions, labels) for name, fn in self.metrics.items()}


_SUPERGLUE = "aps/super_glue"
_PARQUET_REF = "refs/convert/parquet"  # the hub's parquet copy: loads without the dataset's script

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
        Task("qqp", ("question1", "question2"), 2, {"f1": _f1, "accuracy": _accuracy}),
        Task("mnli", ("premise", "hypothesis"), 3, {"accuracy": _accuracy},
             splits={"validation": "validation_matched", "test": "test_matched"}),
        Task("mnli-mm", ("premise", "hypothesis"), 3, {"accuracy": _accuracy}, hub=("nyu-mll/glue", "mnli", None),
             folder="mnli", splits={"validation": "validation_mismatched", "test": "test_mismatched"}),
        Task("superglue-boolq", ("question", "passage"), 2, {"accuracy": _accuracy},
             hub=(_SUPERGLUE, "boolq", _PARQUET_REF)),
        Task("superglue-cb", ("premise", "hypothesis"), 3, {"accuracy": _accuracy, "f1_macro": _f1_macro},
             hub=(_SUPERGLUE, "cb", _PARQUET_REF)),
        Task("superglue-rte", ("premise", "hypothesis"), 2, {"accuracy": _accuracy},
             hub=(_SUPERGLUE, "rte", _PARQUET_REF)),
    ]
}
#: Other names of built-in tasks (compared without ``-``/``_`` and case).
ALIASES = {"boolq": "superglue-boolq", "cb": "superglue-cb", "mnlim": "mnli", "mnlimatched": "mnli",
           "mnlimismatched": "mnli-mm"}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(n): n for n in TASKS} | {_key(a): n for a, n in ALIASES.items()}


def get_task(name: "str | TaskSpec | dict") -> Task:
    """Look up a task: a built-in name, or a :class:`TaskSpec` (or its mapping, as in a recipe).

    A spec without ``source`` is a built-in task with its metrics reordered so that ``metric``
    comes first; a spec with a source is user data (columns, labels and metrics from the spec; the
    data is not read here).

    Raises:
        TaskError: unknown name (the message lists the valid ones), invalid spec, or a ``metric``
            the task does not report.
    """
    if isinstance(name, dict):
        from pydantic import ValidationError

        try:
            name = TaskSpec.model_validate(name)
        except ValidationError as exc:
            from autopeft._util import validation_message

            raise TaskError(f"task: {validation_message(exc, whole='spec')}") from None
    if isinstance(name, TaskSpec):
        return _task_of_spec(name)
    key = _key(name)
    if key not in _BY_KEY:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}, a .csv/.tsv/.jsonl/.parquet file or "
                        "folder, or hf:<dataset id>")
    return TASKS[_BY_KEY[key]]


def _task_of_spec(spec: TaskSpec) -> Task:
    from dataclasses import replace

    if spec.source is None:
        base = get_task(spec.name)
        return replace(base, metrics=_ordered(base.metrics, spec.metric, base.name), spec=spec)
    names = REGRESSION_METRICS if spec.regression else CLASSIFICATION_METRICS
    metrics = _ordered({n: METRICS[n] for n in names}, spec.metric, spec.name)
    return Task(spec.name, tuple(spec.text_columns), 1 if spec.regression else len(spec.labels), metrics,
                hub=("", None, None), label_names=None if spec.regression else tuple(spec.labels), spec=spec)


def _ordered(metrics: dict[str, Callable], first: str | None, task: str) -> dict[str, Callable]:
    if first is None:
        return dict(metrics)
    if first not in metrics:
        raise TaskError(f"metric {first!r} is not reported for {task}; use one of: {', '.join(metrics)}")
    return {first: metrics[first]} | {k: v for k, v in metrics.items() if k != first}


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
    """Load ``split`` (train/validation/test) of ``task`` from the local folder or the hub; user data
    (a spec with a ``source``) from its files or dataset (:func:`autopeft.data.userfiles.load_user_split`,
    which ignores ``data_dir``).

    Raises:
        TaskError: the local folder lacks the file, the hub cannot be reached, or user data is bad.
    """
    if task.spec is not None and task.spec.source is not None:
        return load_user_split(task, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _from_hub(task, split)
    base = root / (task.folder or task.name) / task.splits.get(split, split)
    tsv, parquet = base.with_suffix(".tsv"), base.with_suffix(".parquet")
    import pandas as pd

    if tsv.exists():
        df = pd.read_csv(tsv, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    elif parquet.exists():
        df = pd.read_parquet(parquet)
    else:
        raise TaskError(f"no {split} data for {task.name} in {root} (looked for {base.parent.name}/{tsv.name} or "
                        f"{base.parent.name}/{parquet.name})")
    return _to_split(task, df)


def _to_split(task: Task, df) -> Split:
    missing = [c for c in (*task.text_columns, "label") if c not in df.columns]
    if missing:
        raise TaskError(f"{task.name} data lacks columns {missing}")
    texts = list(zip(*(cell_texts(df[c]) for c in task.text_columns)))
    dtype = np.float32 if task.num_labels == 1 else np.int64
    return Split(texts, df["label"].to_numpy().astype(dtype))


def _from_hub(task: Task, split: str) -> Split:
    try:
        import datasets

        path, config, revision = task.hub
        ds = datasets.load_dataset(path, config or task.name, split=task.splits.get(split, split),
                                   **({"revision": revision} if revision else {}))
    except Exception as exc:
        raise TaskError(
            f"cannot load {task.name}/{split} from the Hugging Face hub ({type(exc).__name__}); "
            f"pass --data-dir or set {DATA_DIR_ENV} to a local data folder") from None
    return _to_split(task, ds.to_pandas())
