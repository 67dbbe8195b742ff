"""Reading user data: a CSV / TSV / JSON Lines / Parquet file or folder, or a Hugging Face dataset, into
tables and labelled splits (:func:`load_user_split`, which :func:`autopeft.data.tasks.load_split` calls for a
task spec with a ``source``).

How the data becomes a task (columns, labels, the held-out validation split) is
:mod:`autopeft.data.userdata`'s; this module only reads what a spec names, so that :mod:`autopeft.data.tasks`
can load user splits without importing the layer above it. Every problem is a one-line
:class:`autopeft.data.tasks.TaskError`.
"""

from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from autopeft.errors import TaskError, first_line
from autopeft.data.splits import Split, cell_texts

#: File suffix -> format.
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet"}
#: Names of a validation split (files in a folder, splits of a Hugging Face dataset), in preference order.
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
HF_PREFIX = "hf:"
#: ``pandas.read_csv`` options under which only an empty cell is missing (NaN): pandas' default
#: missing-value words ("NA", "null", "None", "N/A", "nan", "NULL", "#N/A", ...) stay text, as they
#: are data (a class named ``None``, a text that says ``NA``; huggingface/datasets#4467).
CSV_NA_OPTIONS = {"keep_default_na": False, "na_values": [""]}


def load_user_split(task, split: str) -> Split:
    """Read ``split`` (``train``, ``validation``, ``test``) of user data with labels as ids.

    Labels are mapped with the spec's ``labels`` (id ``i`` = ``labels[i]``; floats for regression);
    with ``held_out`` set, ``train`` and ``validation`` are the two parts of the train data
    (deterministic: seeded, and the same on every node). Texts are strings (missing text: ``""``).

    Returns:
        :class:`autopeft.data.tasks.Split`: ``texts[i]`` a tuple of 1 or 2 strings; ``labels`` (N,) int64
        ids, or float32 for regression.

    Raises:
        TaskError: the data is gone or changed (a column, a split, a label outside ``labels``).
    """
    spec = task.spec
    assert spec is not None and spec.source is not None
    tables = read_tables(spec.source)
    want = "train" if spec.held_out is not None and split in ("train", "validation") else split
    df = tables.get(want)
    if df is None:
        raise TaskError(f"{spec.name} has no {split} split ({spec.source})")
    where = tables[f"__where__{want}"]
    for c in [*spec.text_columns, spec.label_column]:
        _need_column(df, c, "--text-columns" if c != spec.label_column else "--label-column", where)
    if len(df) == 0:
        raise TaskError(f"the {split} split ({where}) is empty")
    kind, values = _clean_labels(df[spec.label_column], spec.label_column, where)
    if spec.regression:
        labels = np.asarray(values, dtype=np.float32)
    else:
        index = {v: i for i, v in enumerate(spec.labels)}
        kinds = {type(v) for v in spec.labels}
        k = "bool" if kinds == {bool} else "int" if kinds == {int} else "str"
        try:
            labels = np.array([index[_as_kind(v, k)] for v in values], dtype=np.int64)
        except KeyError as exc:
            raise TaskError(f"label {exc.args[0]!r} in {where} is not one of the task's labels {spec.labels[:10]}; "
                            "the data changed since the search: search again") from None
    text_df = tables.get(f"__text__{want}", df)
    texts = list(zip(*(_text(text_df[c]) for c in spec.text_columns)))
    if spec.held_out is not None and split in ("train", "validation"):
        keep = _held_out_indices(len(df), None if spec.regression else labels, spec.held_out, where)[
            0 if split == "train" else 1]
        texts, labels = [texts[i] for i in keep], labels[keep]
    return Split(texts, labels)


@functools.lru_cache(maxsize=8)
def _cached_tables(source: str, stamp: tuple) -> dict[str, Any]:
    if source.startswith(HF_PREFIX):
        return _hf_tables(source)
    path = Path(source)
    files = {"train": path} if path.is_file() else _split_files(path)
    out: dict[str, Any] = {}
    for split, f in files.items():
        out[split] = _read_file(f)
        if SUFFIXES.get(f.suffix.lower()) in ("csv", "tsv"):  # untyped: texts as the strings in the file
            out[f"__text__{split}"] = _read_file(f, as_text=True)
        out[f"__where__{split}"] = f.name if path.is_file() else f"{path.name}/{f.name}"
    return out


def read_tables(source: str) -> dict[str, Any]:
    """``{"train": DataFrame, "validation": DataFrame (if any), "test": ..., "__where__<split>": label}``
    of a source (cached per process while the files are unchanged; do not modify the frames).
    CSV/TSV splits also have ``"__text__<split>"``: the same file with every column as the strings
    written in it (read text columns from there; the typed frame's ``007`` is ``7``).

    Raises:
        TaskError: missing or unreadable files, no train file in a folder, a dataset that cannot load.
    """
    stamp: tuple = ()
    if not source.startswith(HF_PREFIX):
        path = Path(source)
        if not path.exists():
            raise TaskError(f"data file {source!r} does not exist")
        stamp = _files_stamp(path, recursive=False)
    else:  # a local folder or file given as hf:<path>: its files, at any depth (a hub id has none here)
        local = Path(source[len(HF_PREFIX):].partition(":")[0]).expanduser()
        if local.exists():
            stamp = _files_stamp(local, recursive=True)
    return _cached_tables(source, stamp)


def _files_stamp(path: Path, recursive: bool) -> tuple:
    """``(path, mtime_ns, size)`` of a file, or of the files in a folder (``recursive``: at any depth):
    the key under which :func:`_cached_tables` keeps what it read, so it changes when the data does."""
    files = [path] if path.is_file() else sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                                                 if p.is_file())
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix.lower() not in SUFFIXES:
            continue
        stem = f.stem.lower()
        split = "train" if stem == "train" else "validation" if stem in VALIDATION_NAMES else \
            "test" if stem == "test" else None
        if split:
            found.setdefault(split, []).append(f)
    if "train" not in found:
        names = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise TaskError(f"folder {str(folder)!r} has no train file (train.csv, train.tsv, train.jsonl or "
                        f"train.parquet); it holds: {names}")
    out = {}
    for split, files in found.items():
        if split == "validation":
            files = sorted(files, key=lambda f: VALIDATION_NAMES.index(f.stem.lower()))
        if len(files) > 1 and files[0].stem.lower() == files[1].stem.lower():
            raise TaskError(f"folder {str(folder)!r} has more than one {split} file: "
                            f"{', '.join(f.name for f in files)}; keep one")
        out[split] = files[0]
    return out


def _read_file(path: Path, as_text: bool = False):
    """A data file as a DataFrame. Only empty cells are missing (:data:`CSV_NA_OPTIONS`); JSON keeps
    its own types (``dtype=False``: pandas would turn the string ``"007"`` into ``7.0`` and
    date-like columns into timestamps). ``as_text``: CSV/TSV columns as the strings in the file
    (for text columns); other formats are typed by the file and read the same either way."""
    import pandas as pd

    fmt = SUFFIXES.get(path.suffix.lower())
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} does not exist")
    if fmt is None:
        raise TaskError(f"cannot read {path.name}: use a .csv, .tsv, .jsonl or .parquet file")
    text = {"dtype": str} if as_text else {}
    try:
        if fmt == "csv":
            return pd.read_csv(path, **CSV_NA_OPTIONS, **text)
        if fmt == "tsv":
            return pd.read_csv(path, sep="\t", **CSV_NA_OPTIONS, **text)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if fmt == "json":
            try:
                return pd.read_json(path, dtype=False)
            except ValueError:
                return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except TaskError:
        raise
    except Exception as exc:  # a file that does not parse
        if "No columns to parse" in str(exc):
            raise TaskError(f"the data file {path.name} is empty") from None
        msg = first_line(exc)
        raise TaskError(f"cannot read {path.name} as {fmt}: {msg}") from None


def _hf_tables(source: str) -> dict[str, Any]:
    name = source[len(HF_PREFIX):]
    path, _, config = name.partition(":")
    try:
        import datasets

        try:  # a dataset of CSV/TSV files: pandas reads it, and only an empty cell is missing
            dd = datasets.load_dataset(path, config or None, **CSV_NA_OPTIONS)
        except ValueError as exc:
            if "keep_default_na" not in str(exc):
                raise
            dd = datasets.load_dataset(path, config or None)  # another builder (Parquet, JSON): typed already
    except Exception as exc:
        msg = first_line(exc)
        raise TaskError(f"cannot load the Hugging Face dataset {name!r}: "
                        f"{msg[:300]}{'…' if len(msg) > 300 else ''}") from None
    if not hasattr(dd, "keys"):
        raise TaskError(f"the Hugging Face dataset {name!r} has no named splits")
    splits = list(dd.keys())
    if "train" not in splits:
        raise TaskError(f"the Hugging Face dataset {name!r} has no train split (splits: {', '.join(splits)})")
    out: dict[str, Any] = {}
    val = next((s for s in VALIDATION_NAMES if s in splits), None)
    for split, key in (("train", "train"), ("validation", val), ("test", "test" if "test" in splits else None)):
        if key is None:
            continue
        out[split] = _hf_frame(dd[key])
        out[f"__where__{split}"] = f"{name} [{key}]"
    return out


def _hf_frame(ds):
    """A dataset split as a DataFrame, ``ClassLabel`` columns as their names (``-1``, no label: missing)."""
    import datasets

    df = ds.to_pandas()
    for col, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            df[col] = [feature.int2str(int(v)) if v is not None and v >= 0 else None for v in df[col]]
    return df


def _need_column(df, column: str, flag: str, where: str) -> None:
    if column in df.columns:
        return
    names = [str(c) for c in df.columns]
    close = difflib.get_close_matches(column, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"{where} has no column {column!r} ({flag}); its columns: {', '.join(names)}{hint}")


def _clean_labels(series, column: str, where: str) -> tuple[str, list]:
    """``(kind, values)``: kind ``bool`` / ``int`` / ``float`` / ``str``; raises on NaN or empty labels."""
    import pandas as pd

    missing = series.isna().to_numpy().copy()
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        missing |= series.astype(str).str.strip().eq("").to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        shown = ", ".join(str(r + 1) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise TaskError(f"{len(rows)} empty or NaN label(s) in column {column!r} of {where} (data rows {shown}, "
                        "counting from 1): fill or drop them")
    if pd.api.types.is_bool_dtype(series):
        return "bool", [bool(v) for v in series]
    if pd.api.types.is_integer_dtype(series):
        return "int", [int(v) for v in series]
    if pd.api.types.is_float_dtype(series):
        values = series.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise TaskError(f"column {column!r} of {where} holds infinite labels")
        return "float", values.tolist()
    return "str", [str(v) for v in series]


def _as_kind(value, kind: str):
    """``value`` as a label of ``kind`` (the train labels' kind), for lookups across files."""
    if kind == "int":
        try:
            f = float(value)
            return int(f) if f.is_integer() else str(value)
        except (TypeError, ValueError):
            return str(value)
    if kind == "bool" and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if kind == "str":
        return str(value)
    return value


def _held_out_indices(n: int, label_ids, held, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, validation_rows)``, sorted, of a seeded (stratified) hold-out of ``n`` rows."""
    from sklearn.model_selection import train_test_split

    stratify = np.asarray(label_ids) if held.stratified and label_ids is not None else None
    if stratify is not None:  # say why in the data's terms (sklearn's message listed every class)
        counts = np.unique(stratify, return_counts=True)[1]
        n_val = math.ceil(held.fraction * n)
        why = (f"{int((counts < 2).sum())} of its {len(counts)} classes have a single row" if counts.min() < 2 else
               f"its {len(counts)} classes outnumber the {min(n_val, n - n_val)} rows of a side"
               if len(counts) > min(n_val, n - n_val) else None)
        if why:
            raise TaskError(f"cannot hold out a stratified {held.fraction:.0%} validation split of the {n} rows of "
                            f"{where}: {why} (give a validation file, more rows per class, or check --label-column)")
    try:
        tr, va = train_test_split(np.arange(n), test_size=held.fraction, random_state=held.seed, shuffle=True,
                                  stratify=stratify)
    except ValueError as exc:
        raise TaskError(f"cannot hold out a {'stratified ' if stratify is not None else ''}{held.fraction:.0%} "
                        f"validation split of the {n} rows of {where}: {first_line(exc)} "
                        "(give a validation file, or more rows per class)") from None
    return np.sort(tr), np.sort(va)


def _text(series) -> list[str]:
    return cell_texts(series)
