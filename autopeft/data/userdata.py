"""User data as a task: a CSV / TSV / JSON Lines / Parquet file or folder, or a Hugging Face dataset.

``autopeft search --task reviews.csv --text-columns review --label-column sentiment`` turns the data
into a :class:`autopeft.data.tasks.TaskSpec` (:func:`resolve_task`), stored in the recipe as ``task``;
every trial, ``autopeft train`` and :func:`autopeft.api.predict` read it back with
:func:`load_user_split`.

* **Sources.** A file is the train split. A folder holds ``train.<ext>`` and optionally
  ``validation.<ext>`` (or ``valid`` / ``val`` / ``dev``) and ``test.<ext>``, ext one of
  :data:`SUFFIXES`. ``hf:<dataset id>[:<config>]`` is loaded with ``datasets.load_dataset`` (which
  caches it under ``~/.cache/huggingface``); its ``train`` split and a ``validation`` (``valid``,
  ``val``, ``dev``) split if it has one; ``ClassLabel`` columns become their label names.
* **Labels.** Float labels make a regression task (one output; Pearson, then Spearman). Any other
  labels (strings, integers, booleans) are classes: the sorted distinct train labels, id ``i`` for
  ``labels[i]``; the list is saved in the recipe, so a trained output predicts the original labels.
  Classification reports accuracy (first), macro-F1 and Matthews correlation; ``metric`` picks the
  one a search maximises. The metric also settles labels whose kind is unclear: float labels that
  look like classes (``0.0``/``1.0``, or 0/1 with a stray ``0.5``) are refused without one, and
  integer labels with ``pearson``/``spearman`` are a regression task.
* **Validation.** Without a validation split, a seeded 10% of train, stratified by label for
  classes (``sklearn.model_selection.train_test_split``), is held out and recorded in the spec
  (``held_out``); train is the other 90%.
* **Cells are text as written.** Only a truly empty cell is missing: the words pandas reads as
  missing by default (``NA``, ``null``, ``None``, ``N/A``, ``nan``, ``NULL``, ...) are data, in
  labels and texts (:data:`CSV_NA_OPTIONS`, also for ``hf:`` datasets built from CSV files), and a
  CSV/TSV text column is read as the strings in the file (``007`` stays ``007``, not ``7``). JSON
  keeps JSON's own types (``"007"`` is a string, ``7`` a number; no date guessing). An empty text
  is ``""``; an empty label is an error naming the rows.
* **Bad data** raises :class:`autopeft.data.tasks.TaskError` with one line, before anything starts:
  a missing file, a missing or misspelt column (the message lists the columns that exist), an empty
  split, a single class, NaN or empty labels, validation labels that train does not have.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from autopeft.data.tasks import REGRESSION_METRICS, HeldOut, Task, TaskError, TaskSpec, get_task
# Reading the files is autopeft.data.userfiles' (below autopeft.data.tasks); re-exported here, their old home.
from autopeft.data.userfiles import (  # noqa: F401
    CSV_NA_OPTIONS, HF_PREFIX, SUFFIXES, VALIDATION_NAMES, _as_kind, _clean_labels, _held_out_indices, _need_column,
    _read_file, _text, load_user_split, read_tables,
)

#: Share of train held out as validation when the data has no validation split.
HELD_OUT_FRACTION = 0.1
#: Columns taken as the text / the label when ``--text-columns`` / ``--label-column`` are not given.
DEFAULT_TEXT_COLUMNS = (("text",), ("sentence",), ("sentence1", "sentence2"))
DEFAULT_LABEL_COLUMN = "label"


def is_data_source(task: str) -> bool:
    """Whether ``--task`` names data rather than a task: ``hf:...``, a data-file suffix, a path
    separator, or an existing path. Built-in task names are checked first by the caller."""
    t = str(task)
    return (t.startswith(HF_PREFIX) or Path(t).suffix.lower() in SUFFIXES or "/" in t or os.sep in t
            or Path(t).expanduser().exists())


def resolve_task(task: str | dict | TaskSpec, text_columns: Sequence[str] | str | None = None,
                 label_column: str | None = None, metric: str | None = None, seed: int = 0) -> str | dict:
    """What a recipe stores as ``task`` for ``--task``, after checking the data.

    Args:
        task: a built-in task name, a data file or folder, ``hf:<id>[:<config>]``, or a spec (a
            :class:`TaskSpec` or its mapping, e.g. from a search's settings).
        text_columns: one or two text columns (a list, or ``"a,b"``); default ``text``,
            ``sentence`` or ``sentence1,sentence2``, whichever the data has. User data only.
        label_column: the label column; default ``label``. User data only.
        metric: the metric to maximise (default: the task's first, accuracy for user classes).
        seed: seeds the held-out validation split when the data has none.

    Returns:
        The built-in task's name (unchanged recipes), or a JSON-ready :class:`TaskSpec` mapping
        (user data, or a built-in task with ``metric``).

    Raises:
        TaskError: one line; see the module docstring for the data checks.
    """
    if isinstance(text_columns, str):
        text_columns = [c.strip() for c in text_columns.split(",") if c.strip()]
    if isinstance(task, (dict, TaskSpec)):
        spec = get_task(task).spec
        if spec is None:
            raise TaskError(f"invalid task spec {task!r}")
        if spec.source is not None:
            check_spec_data(spec)
        return _dump(spec)
    builtin = _builtin(task)
    if builtin is not None:
        if text_columns or label_column:
            raise TaskError(f"--text-columns and --label-column apply to data files and hf: datasets; {builtin.name} "
                            f"reads {', '.join(builtin.text_columns)} and label")
        if metric is None:
            return builtin.name
        return _dump(get_task(TaskSpec(name=builtin.name, metric=metric)).spec)
    if not is_data_source(task):
        get_task(task)  # raises: unknown task, listing the valid names
    source = _normalise_source(task)
    tables = read_tables(source)
    train, val = tables["train"], tables.get("validation")
    where = {"train": tables["__where__train"], "validation": tables.get("__where__validation")}
    cols, label = _checked_columns(train, val, text_columns, label_column, where)
    kind, train_labels, labels = _train_labels(train, label, where["train"], metric)
    if val is not None:
        _check_validation_labels(val, label, kind, labels, where)
    held = None
    if val is None:
        held = HeldOut(fraction=HELD_OUT_FRACTION, seed=seed, stratified=labels is not None)
        ids = None if labels is None else np.array([labels.index(v) for v in train_labels])
        _held_out_indices(len(train), ids, held, where["train"])
    spec = TaskSpec(name=_display_name(source), source=source, text_columns=list(cols), label_column=label,
                    labels=labels, regression=labels is None, metric=metric, held_out=held)
    get_task(spec)  # checks the metric
    return _dump(spec)


def _checked_columns(train, val, text_columns: Sequence[str] | None, label_column: str | None,
                     where: dict[str, str | None]) -> tuple[list[str], str]:
    """``(text columns, label column)`` of user data, each present in every split, no split empty."""
    cols = _pick_text_columns(train, text_columns, where["train"])
    label = label_column or DEFAULT_LABEL_COLUMN
    if label_column is None and label not in train.columns:
        raise TaskError(f"{where['train']} has no column {label!r}: name the label column with --label-column "
                        f"(columns: {', '.join(map(str, train.columns))})")
    for split, df in (("train", train), ("validation", val)):
        if df is None:
            continue
        for c, flag in [(c, "--text-columns") for c in cols] + [(label, "--label-column")]:
            _need_column(df, c, flag, where[split])
        if len(df) == 0:
            raise TaskError(f"the {split} split ({where[split]}) is empty")
    return cols, label


#: Float labels that look like classes (:func:`_train_labels`): at most this many distinct whole
#: numbers make up at least :data:`CLASS_LIKE_SHARE` of the rows.
CLASS_LIKE_VALUES, CLASS_LIKE_SHARE = 10, 0.9


def _train_labels(train, label: str, where: str, metric: str | None = None):
    """``(kind, labels of the rows, classes)`` of the train split; ``classes`` is ``None`` for
    regression (float labels). At least two classes, or two distinct values. Float labels that look
    like classes are settled by ``metric`` (:func:`_settle_class_like_floats`); integer labels with a
    regression metric are a regression task (scores 1-5).

    Raises:
        TaskError: a single class or value; as :func:`_settle_class_like_floats`.
    """
    kind, train_labels = _clean_labels(train[label], label, where)
    if kind == "int" and metric in REGRESSION_METRICS:  # integer scores (ratings 1-5) asked for as a regression
        kind, train_labels = "float", [float(v) for v in train_labels]
    if kind == "float" and metric not in REGRESSION_METRICS:
        kind, train_labels = _settle_class_like_floats(train_labels, label, where, metric)
    if kind == "float":
        if len(np.unique(train_labels)) < 2:
            raise TaskError(f"every label in column {label!r} of {where} is {train_labels[0]}: "
                            "regression needs at least two values")
        labels = None
    else:
        labels = sorted(set(train_labels))
        if len(labels) < 2:
            raise TaskError(f"column {label!r} of {where} has a single class ({labels[0]!r}): "
                            "classification needs at least two")
    return kind, train_labels, labels


def _settle_class_like_floats(train_labels: list, label: str, where: str, metric: str | None) -> tuple[str, list]:
    """``(kind, labels)`` for float train labels when ``metric`` is not a regression metric.

    Float labels that look like classes (at most :data:`CLASS_LIKE_VALUES` distinct whole numbers
    on at least :data:`CLASS_LIKE_SHARE` of the rows: ``0.0``/``1.0`` written by a float column, or
    0/1 labels with a stray ``0.5``) need ``metric`` to say which task is meant: a classification
    metric makes the whole numbers classes (``"int"``); without a metric it is an error. Other
    floats stay a regression task (``"float"``). Was: silently a regression task, its search
    maximising Pearson on what the user meant as classes.

    Raises:
        TaskError: class-like floats without a metric; a classification metric and a fractional
            label (its row named).
    """
    values = np.asarray(train_labels)
    whole = values == np.round(values)
    classes = np.unique(values[whole])
    fractions = np.flatnonzero(~whole)
    rows = ", ".join(f"data row {r + 1}: {values[r]:g}" for r in fractions[:3]) + (", ..." if len(fractions) > 3 else "")
    if metric is not None:  # a classification metric: the labels are classes
        if len(fractions):
            raise TaskError(f"--metric {metric} makes column {label!r} of {where} classes, but {len(fractions)} "
                            f"label(s) are not whole numbers ({rows}): fix them, or use --metric pearson")
        return "int", [int(v) for v in values]
    if whole.mean() >= CLASS_LIKE_SHARE and len(classes) <= CLASS_LIKE_VALUES:
        shown = ", ".join(f"{v:g}" for v in classes)
        also = f", and {len(fractions)} not ({rows})" if len(fractions) else ""
        raise TaskError(f"column {label!r} of {where} holds float labels that look like classes ({int(whole.sum())} "
                        f"of {len(values)} are {shown}{also}): pass --metric accuracy (or f1_macro, mcc) for "
                        "classes, or --metric pearson (or spearman) for a regression task")
    return "float", train_labels


def _check_validation_labels(val, label: str, kind: str, labels: list | None, where: dict[str, str | None]) -> None:
    """The validation split's labels: classes that train has, or numbers for a regression task."""
    vkind, val_labels = _clean_labels(val[label], label, where["validation"])
    if labels is not None:
        known = set(labels)
        unseen = sorted({_as_kind(v, kind) for v in val_labels} - known, key=str)
        if unseen:
            raise TaskError(f"validation labels {unseen[:5]} ({where['validation']}) do not occur in train "
                            f"({where['train']}: {labels[:10]})")
    elif vkind != "float" and not np.issubdtype(np.asarray(val_labels).dtype, np.number):
        raise TaskError(f"validation labels of {where['validation']} are not numbers, but train's are "
                        "(a regression task)")


def check_spec_data(spec: TaskSpec) -> None:
    """Read every split of a spec's data once, so that bad data fails before a search starts.

    Raises:
        TaskError: as :func:`load_user_split`.
    """
    task = get_task(spec)
    for split in ("train", "validation"):
        load_user_split(task, split)


def read_texts(source: str | Path, text_columns: Sequence[str]) -> list[tuple[str, ...]]:
    """The text columns of a data file (any format of :data:`SUFFIXES`), e.g. for prediction.

    Raises:
        TaskError: missing file, unknown format, or a missing column (the message lists those that exist).
    """
    path = Path(source).expanduser()
    df = _read_file(path, as_text=True)
    for c in text_columns:
        _need_column(df, c, "text column", path.name)
    return list(zip(*(_text(df[c]) for c in text_columns)))


# --- reading -------------------------------------------------------------------------------------


def _normalise_source(task: str) -> str:
    if task.startswith(HF_PREFIX):
        name = task[len(HF_PREFIX):].strip()
        if not name:
            raise TaskError("hf: needs a dataset id, e.g. hf:stanfordnlp/imdb")
        return HF_PREFIX + name
    path = Path(task).expanduser()
    if not path.exists():
        raise TaskError(f"data file {str(path)!r} does not exist")
    return str(path.resolve())  # absolute: Ray workers run in other folders


# --- checks --------------------------------------------------------------------------------------


def _builtin(task: str) -> Task | None:
    try:
        return get_task(task)
    except TaskError:
        return None


def _pick_text_columns(df, given: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if given:
        cols = tuple(given)
        if len(cols) > 2:
            raise TaskError(f"--text-columns takes one or two columns (a text or a text pair), got {len(cols)}: "
                            f"{','.join(cols)}")
        for c in cols:
            _need_column(df, c, "--text-columns", where)
        return cols
    for cols in DEFAULT_TEXT_COLUMNS:
        if all(c in df.columns for c in cols):
            return cols
    raise TaskError(f"name the text column(s) of {where} with --text-columns a[,b] "
                    f"(its columns: {', '.join(map(str, df.columns))})")


def _display_name(source: str) -> str:
    if source.startswith(HF_PREFIX):
        base = source[len(HF_PREFIX):].replace(":", "-").split("/")[-1]
    else:
        p = Path(source)
        base = p.stem if p.is_file() else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "data"


def _dump(spec: TaskSpec) -> dict:
    return spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
