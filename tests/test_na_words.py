"""Words that are data are not missing values (issue 14, case 1; huggingface/datasets#4467).

pandas reads ``NA``, ``null``, ``None``, ``N/A``, ``nan``, ``NULL`` (and more) as NaN by default, so a
class named ``None`` was refused as "empty or NaN labels" and such texts became ``""`` in training and
in ``autopeft predict --input``. JSON's reader guessed types (the string ``"007"`` became ``7.0``),
a CSV text column of digits became numbers (``007`` -> ``7``), and the GLUE loader wrote a missing
Parquet cell as the text ``"None"``. Every reader now keeps each non-empty cell's text; only an
empty cell is empty, and an empty label is still a one-line error naming its rows.
"""

import csv
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from autopeft.cli import app
from autopeft.data.tasks import get_task, load_split
from autopeft.data.userdata import read_texts, resolve_task

runner = CliRunner()
NA_WORDS = ["NA", "null", "None", "N/A", "nan", "NULL", "NaN", "n/a", "#N/A", "-NaN", "<NA>"]
SMALL_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 128}


def _rows(n: int) -> list[tuple[str, str]]:
    """``(text, label)``: every third text an NA word, classes ``None`` / ``positive`` / ``negative``."""
    return [(NA_WORDS[i % len(NA_WORDS)] if i % 3 == 0 else f"movie {i} was fine",
             ["None", "positive", "negative"][i % 3]) for i in range(n)]


def _write_csv(path, rows, header=("text", "label"), sep=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_class_named_none_and_na_word_texts_are_data(tmp_path):
    rows = _rows(66)
    path = _write_csv(tmp_path / "reviews.csv", rows)
    spec = resolve_task(str(path))  # was: TaskError "22 empty or NaN label(s) in column 'label'"
    assert spec["labels"] == ["None", "negative", "positive"]
    task = get_task(spec)
    got = []
    for split in ("train", "validation"):
        s = load_split(task, split)
        got += [(t[0], spec["labels"][y]) for t, y in zip(s.texts, s.labels)]
    assert sorted(got) == sorted(rows)  # every text and label as written, "NA" ... "NULL" included
    assert {t for t, _ in got} >= set(NA_WORDS)


#: Cells whose text a reader used to change: NA words, digits (CSV typing, JSON's dtype guess),
#: a date (JSON's date guess), and one truly empty cell, which is the only "" there is.
TEXTS = [*NA_WORDS, "007", "1e3", "2020-01-01", "", "True", "ok"]
LABELS = ["a", "b"] * (len(TEXTS) // 2) + ["a"] * (len(TEXTS) % 2)


def _dataset(fmt: str, folder):
    """A folder with train and validation files of ``fmt`` holding :data:`TEXTS` (no held-out shuffle)."""
    folder.mkdir()
    for split in ("train", "validation"):
        if fmt in ("csv", "tsv"):
            _write_csv(folder / f"{split}.{fmt}", zip(TEXTS, LABELS), sep="," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            with open(folder / f"{split}.jsonl", "w") as f:
                for t, y in zip(TEXTS, LABELS):
                    f.write(json.dumps({"text": t if t else None, "label": y}) + "\n")
        else:
            pd.DataFrame({"text": [t if t else None for t in TEXTS], "label": LABELS}).to_parquet(
                folder / f"{split}.parquet")
    return folder


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "hf-csv"])
def test_every_reader_keeps_the_text_of_every_non_empty_cell(fmt, tmp_path, monkeypatch):
    if fmt == "hf-csv":  # hf:<local folder of CSV files>: datasets' CSV builder reads it with pandas
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
        source = "hf:" + str(_dataset("csv", tmp_path / "data"))
    else:
        source = str(_dataset(fmt, tmp_path / "data"))
    spec = resolve_task(source)
    assert spec["labels"] == ["a", "b"]
    for split in ("train", "validation"):
        s = load_split(get_task(spec), split)
        assert [t[0] for t in s.texts] == TEXTS, (fmt, split)
        assert [spec["labels"][y] for y in s.labels] == LABELS


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_predict_input_files_keep_their_texts(fmt, tmp_path):
    folder = _dataset(fmt, tmp_path / "data")
    assert read_texts(folder / f"train.{fmt}", ["text"]) == [(t,) for t in TEXTS]


def test_predict_input_cli_predicts_the_words_not_empty_texts(tmp_path):
    from autopeft import api
    from autopeft.composition.recipe import recipe_from_dict

    spec = resolve_task(str(_write_csv(tmp_path / "reviews.csv", _rows(60))))
    recipe = recipe_from_dict({"backbone": SMALL_BERT, "task": spec,
                               "components": [{"method": "lora", "r": 2, "target_modules": ["query", "value"]}],
                               "training": {"max_train_examples": 16, "batch_size": 16, "max_seq_length": 16}})
    api.train(recipe, output_dir=tmp_path / "out", log=None)
    inp = _write_csv(tmp_path / "in.csv", [(w,) for w in NA_WORDS], header=("text",))
    res = runner.invoke(app, ["predict", str(tmp_path / "out"), "-i", str(inp), "-o", str(tmp_path / "p.csv"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "p.csv", newline="") as f:
        out = list(csv.DictReader(f))
    assert [r["text"] for r in out] == NA_WORDS  # was: every text ""
    assert [r["prediction"] for r in out] == api.predict(tmp_path / "out", NA_WORDS)  # predicted on the words
    # an -o that cannot be written: one line, not a traceback (a folder is refused before predicting)
    res = runner.invoke(app, ["predict", str(tmp_path / "out"), "--input", str(inp), "-o", str(tmp_path)])
    assert res.exit_code == 2 and res.output == f"error: -o {str(tmp_path)!r} is a folder: give the CSV file to write\n"
    (tmp_path / "file").write_text("x")
    res = runner.invoke(app, ["predict", str(tmp_path / "out"), "--input", str(inp), "-o", str(tmp_path / "file" / "p.csv")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith("error: FileExistsError: ") and "Traceback" not in res.output, res.output


def test_an_empty_label_is_still_a_one_line_error_naming_its_rows(tmp_path, monkeypatch):
    rows = _rows(30)
    rows[2] = (rows[2][0], "")  # data row 3: truly empty
    path = _write_csv(tmp_path / "gaps.csv", rows)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["search", "--task", str(path), "--output-dir", str(tmp_path / "runs"),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")
    # one label (not the 10 "None" classes as well), row 3
    assert "1 empty or NaN label(s) in column 'label' of gaps.csv (data rows 3," in " ".join(res.output.split())


def test_glue_loader_reads_a_missing_parquet_cell_as_empty_and_words_as_words(tmp_path):
    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    texts = [None, "None", "NA", "fine"]
    for split in ("train", "validation"):
        pd.DataFrame({"sentence": texts, "label": [0, 1, 0, 1]}).to_parquet(folder / f"{split}.parquet")
    s = load_split(get_task("sst2"), "validation", tmp_path / "glue")
    assert [t[0] for t in s.texts] == ["", "None", "NA", "fine"]  # was "None" for the missing cell
    assert s.labels.tolist() == [0, 1, 0, 1] and s.labels.dtype == np.int64


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_text_column_of_digits_keeps_its_text(fmt, tmp_path):
    """Codes and numbers as texts: typing turned ``007`` into ``7`` (CSV) or ``7.0`` (JSON)."""
    texts, labels = ["007", "0042", "1e3", "12", "3.50", "8"], ["x", "y"] * 3
    folder = tmp_path / "codes"
    folder.mkdir()
    if fmt == "jsonl":
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                    for t, y in zip(texts, labels)))
    else:
        _write_csv(folder / f"train.{fmt}", zip(texts, labels), sep="," if fmt == "csv" else "\t")
    (folder / f"validation.{fmt}").write_bytes((folder / f"train.{fmt}").read_bytes())
    spec = resolve_task(str(folder))
    assert [t[0] for t in load_split(get_task(spec), "validation").texts] == texts
    assert read_texts(folder / f"train.{fmt}", ["text"]) == [(t,) for t in texts]


def test_json_labels_keep_their_json_types(tmp_path):
    """A JSON string label is a class name, a JSON number a number (pandas' guess made "1" an int)."""
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": str(i % 2), "stars": i % 3 + 1}) + "\n"
                            for i in range(40)))
    assert resolve_task(str(path))["labels"] == ["0", "1"]
    assert resolve_task(str(path), label_column="stars")["labels"] == [1, 2, 3]
