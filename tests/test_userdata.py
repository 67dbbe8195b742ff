"""User data as a task (CSV / TSV / JSON Lines / Parquet, folders, hf:), the new built-in tasks, and the
one-line errors on bad data, raised before Ray or MLflow start."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from autopeft.cli import app
from autopeft.composition.recipe import load_recipe, recipe_from_dict
from autopeft.data.tasks import TaskError, get_task, load_split
from autopeft.data.userdata import resolve_task

runner = CliRunner()
SMALL_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 128}


def reviews(n=200, seed=0):
    """``n`` rows: ``review`` text, ``sentiment`` positive/negative (60/40), ``stars`` 1-5, ``score`` float."""
    rng = np.random.default_rng(seed)
    sentiment = np.array(["positive"] * (n * 6 // 10) + ["negative"] * (n - n * 6 // 10))
    return pd.DataFrame({"review": [f"review number {i} {'good' if s == 'positive' else 'bad'}"
                                    for i, s in enumerate(sentiment)],
                         "sentiment": sentiment, "stars": rng.integers(1, 6, n),
                         "score": rng.normal(size=n).round(3)})


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "reviews.csv"
    reviews().to_csv(path, index=False)
    return path


def test_string_labels_map_to_sorted_ids_and_a_stratified_10pct_is_held_out(csv):
    spec = resolve_task(str(csv), "review", "sentiment", seed=0)
    assert spec["labels"] == ["negative", "positive"] and spec["name"] == "reviews"
    assert spec["held_out"] == {"fraction": 0.1, "seed": 0, "stratified": True}
    assert spec["source"] == str(csv.resolve())
    task = get_task(spec)
    assert task.num_labels == 2 and task.metric == "accuracy" and list(task.metrics) == ["accuracy", "f1_macro", "mcc"]
    train, val = load_split(task, "train"), load_split(task, "validation")
    assert (len(train), len(val)) == (180, 20)
    assert np.bincount(val.labels).tolist() == [8, 12]  # 40/60 kept: stratified
    df = reviews()
    all_rows = {(t[0], int(df.sentiment[df.review == t[0]].iloc[0] == "positive")) for t in df[["review"]].values}
    got = {(t[0], int(y)) for t, y in zip(train.texts + val.texts, np.concatenate([train.labels, val.labels]))}
    assert got == all_rows and not {t for t in train.texts} & {t for t in val.texts}  # a partition, ids right
    again = load_split(get_task(resolve_task(str(csv), "review", "sentiment", seed=0)), "validation")
    assert again.texts == val.texts  # deterministic
    other = load_split(get_task(resolve_task(str(csv), "review", "sentiment", seed=1)), "validation")
    assert other.texts != val.texts  # seeded


def test_every_format_and_a_folder_with_validation_read_the_same(tmp_path, csv):
    df = reviews()
    df.to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    df.to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "r.parquet")
    ref = load_split(get_task(resolve_task(str(csv), "review", "sentiment")), "train")
    for name in ("r.tsv", "r.jsonl", "r.parquet"):
        got = load_split(get_task(resolve_task(str(tmp_path / name), "review", "sentiment")), "train")
        assert got.texts == ref.texts and got.labels.tolist() == ref.labels.tolist(), name
    folder = tmp_path / "split"
    folder.mkdir()
    df[:150].to_csv(folder / "train.csv", index=False)
    df[150:].to_json(folder / "dev.jsonl", orient="records", lines=True)
    spec = resolve_task(str(folder), "review", "sentiment")
    assert "held_out" not in spec and spec["name"] == "split"
    val = load_split(get_task(spec), "validation")
    assert val.texts == [(t,) for t in df.review[150:]]
    assert val.labels.tolist() == (df.sentiment[150:] == "positive").astype(int).tolist()


def test_integer_labels_keep_their_values_and_float_labels_make_a_regression(csv):
    ints = resolve_task(str(csv), "review", "stars", metric="f1_macro")
    assert ints["labels"] == [1, 2, 3, 4, 5] and list(get_task(ints).metrics)[0] == "f1_macro"
    stars = reviews()["stars"].to_numpy()
    ids = np.concatenate([load_split(get_task(ints), s).labels for s in ("train", "validation")])
    assert sorted((ids + 1).tolist()) == sorted(stars.tolist())  # stars 1..5 are ids 0..4
    reg = resolve_task(str(csv), "review", "score", metric="spearman")
    assert reg["regression"] is True and "labels" not in reg and reg["held_out"]["stratified"] is False
    task = get_task(reg)
    assert task.num_labels == 1 and list(task.metrics) == ["spearman", "pearson"]
    split = load_split(task, "train")
    assert split.labels.dtype == np.float32 and len(split) == 180


def test_float_labels_that_look_like_classes_need_the_metric_to_say_which_task(tmp_path):
    """0/1 labels with one stray 0.5 made a regression task without a word (its search maximised Pearson)."""
    df = reviews()
    df["y"] = (df.sentiment == "positive").astype(float)
    df.loc[16, "y"] = 0.5
    path = tmp_path / "r.csv"
    df.to_csv(path, index=False)
    with pytest.raises(TaskError, match=r"float labels that look like classes \(199 of 200 are 0, 1, and 1 not "
                                        r"\(data row 17: 0.5\)\): pass --metric accuracy .* or --metric pearson"):
        resolve_task(str(path), "review", "y")
    with pytest.raises(TaskError, match=r"--metric mcc makes column 'y' of r.csv classes, but 1 label\(s\) are not "
                                        r"whole numbers \(data row 17: 0.5\)"):
        resolve_task(str(path), "review", "y", metric="mcc")
    reg = resolve_task(str(path), "review", "y", metric="pearson")
    assert reg["regression"] is True and get_task(reg).num_labels == 1
    df.loc[16, "y"] = 1.0  # 0.0 / 1.0 written by a float column: classes when the metric says so
    df.to_csv(path, index=False)
    with pytest.raises(TaskError, match="200 of 200 are 0, 1\\)"):
        resolve_task(str(path), "review", "y")
    spec = resolve_task(str(path), "review", "y", metric="accuracy")
    assert spec["labels"] == [0, 1] and "regression" not in spec
    ids = np.concatenate([load_split(get_task(spec), s).labels for s in ("train", "validation")])
    assert sorted(ids.tolist()) == sorted(df.y.astype(int).tolist())
    # integer scores asked for as a regression; real float scores stay a regression without a metric
    stars = resolve_task(str(path), "review", "stars", metric="pearson")
    assert stars["regression"] is True and load_split(get_task(stars), "train").labels.dtype == np.float32
    assert resolve_task(str(path), "review", "score")["regression"] is True


def test_classification_metrics_by_hand():
    task = get_task({"name": "x", "source": "/nowhere.csv", "text_columns": ["t"], "label_column": "y",
                     "labels": ["a", "b"]})
    m = task.score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    # accuracy 3/4; F1 class 0: P=1, R=2/3 -> 0.8; class 1: P=1/2, R=1 -> 2/3; MCC = (1*2 - 1*0)/sqrt(2*1*3*2)
    assert m == pytest.approx({"accuracy": 0.75, "f1_macro": (0.8 + 2 / 3) / 2, "mcc": 2 / 12 ** 0.5})


def test_metric_must_be_one_the_task_reports(csv):
    with pytest.raises(TaskError, match="metric 'pearson' is not reported for reviews; use one of: accuracy, f1_macro, mcc"):
        resolve_task(str(csv), "review", "sentiment", metric="pearson")
    assert resolve_task("mrpc", metric="accuracy") == {"name": "mrpc", "metric": "accuracy"}
    assert list(get_task({"name": "mrpc", "metric": "accuracy"}).metrics) == ["accuracy", "f1"]
    assert resolve_task("sst2") == "sst2" and resolve_task("SST-2") == "sst2"  # GLUE recipes unchanged


def test_builtin_tasks_mnli_qqp_and_superglue():
    expect = {"mnli": (("premise", "hypothesis"), 3), "mnli-mm": (("premise", "hypothesis"), 3),
              "qqp": (("question1", "question2"), 2), "superglue-boolq": (("question", "passage"), 2),
              "boolq": (("question", "passage"), 2), "cb": (("premise", "hypothesis"), 3),
              "superglue-rte": (("premise", "hypothesis"), 2), "rte": (("sentence1", "sentence2"), 2)}
    for name, (cols, k) in expect.items():
        t = get_task(name)
        assert (t.text_columns, t.num_labels) == (cols, k), name
    assert get_task("cb").name == "superglue-cb" and get_task("rte").name == "rte"
    assert list(get_task("cb").metrics) == ["accuracy", "f1_macro"] and get_task("qqp").metric == "f1"


def _frame(columns, labels):
    return pd.DataFrame({**{c: [f"{c} {i}" for i in range(len(labels))] for c in columns}, "label": labels,
                         "idx": range(len(labels))})


def test_builtin_tasks_load_from_a_local_folder(tmp_path):
    (tmp_path / "mnli").mkdir()
    (tmp_path / "superglue-boolq").mkdir()
    _frame(("premise", "hypothesis"), [0, 1, 2]).to_parquet(tmp_path / "mnli" / "validation_matched.parquet")
    _frame(("premise", "hypothesis"), [2, 2]).to_parquet(tmp_path / "mnli" / "validation_mismatched.parquet")
    _frame(("question", "passage"), [1, 0, 1]).to_parquet(tmp_path / "superglue-boolq" / "train.parquet")
    assert load_split(get_task("mnli"), "validation", tmp_path).labels.tolist() == [0, 1, 2]
    mm = load_split(get_task("mnli-mm"), "validation", tmp_path)
    assert mm.labels.tolist() == [2, 2] and mm.texts[1] == ("premise 1", "hypothesis 1")
    boolq = load_split(get_task("boolq"), "train", tmp_path)
    assert boolq.texts[0] == ("question 0", "passage 0") and boolq.labels.tolist() == [1, 0, 1]


def test_builtin_tasks_load_through_the_hub_loader(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split, kw.get("revision")))
        cols = {"cb": ("premise", "hypothesis"), "boolq": ("question", "passage"),
                "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}[name]
        return datasets.Dataset.from_pandas(_frame(cols, [0, 1, 1]))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.delenv("AUTOPEFT_DATA_DIR", raising=False)
    cb = load_split(get_task("cb"), "validation")
    assert cb.texts[2] == ("premise 2", "hypothesis 2") and cb.labels.tolist() == [0, 1, 1]
    load_split(get_task("boolq"), "train")
    load_split(get_task("mnli-mm"), "validation")
    load_split(get_task("qqp"), "train")
    assert calls == [("aps/super_glue", "cb", "validation", "refs/convert/parquet"),
                     ("aps/super_glue", "boolq", "train", "refs/convert/parquet"),
                     ("nyu-mll/glue", "mnli", "validation_mismatched", None), ("nyu-mll/glue", "qqp", "train", None)]


def test_hf_dataset_class_names_become_labels_and_validation_is_held_out(monkeypatch):
    import datasets

    df = reviews(60)
    feats = datasets.Features({"review": datasets.Value("string"),
                               "sentiment": datasets.ClassLabel(names=["pos", "neg"])})
    train = datasets.Dataset.from_dict({"review": df.review.tolist(),
                                        "sentiment": (df.sentiment == "negative").astype(int).tolist()}, features=feats)
    seen = []

    def fake(path, name=None, **kw):
        seen.append((path, name))
        return datasets.DatasetDict({"train": train, "test": train})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = resolve_task("hf:someone/movie-reviews:en", "review", "sentiment")
    assert seen[0] == ("someone/movie-reviews", "en")
    assert spec["labels"] == ["neg", "pos"] and spec["name"] == "movie-reviews-en" and spec["held_out"]["fraction"] == 0.1
    split = load_split(get_task(spec), "validation")
    names = dict(zip(df.review, np.where(df.sentiment == "positive", "pos", "neg")))
    assert [spec["labels"][y] for y in split.labels] == [names[t[0]] for t in split.texts] and len(split) == 6


def test_recipes_with_a_task_name_or_a_spec_load(tmp_path, csv):
    plain = tmp_path / "plain.yaml"
    plain.write_text("task: sst2\ncomponents: [{method: lora}]\n")
    assert load_recipe(plain).task == "sst2"
    r = recipe_from_dict({"task": resolve_task(str(csv), "review", "sentiment"), "components": [{"method": "bitfit"}]})
    r.save(tmp_path / "user.yaml")
    saved = yaml.safe_load((tmp_path / "user.yaml").read_text())["task"]
    assert saved["labels"] == ["negative", "positive"] and saved["held_out"]["seed"] == 0
    again = load_recipe(tmp_path / "user.yaml")
    assert again.task == r.task and get_task(again.task).label_names == ("negative", "positive")


def _bad(tmp_path, name, df=None, text=None):
    path = tmp_path / name
    if df is not None:
        df.to_csv(path, index=False)
    elif text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize("case,args,msg", [
    ("missing", ["--task", "{tmp}/nope.csv"], "does not exist"),
    ("misspelt label", ["--label-column", "sentimnet"],
     "has no column 'sentimnet' (--label-column); its columns: review, sentiment, stars, score; did you mean 'sentiment'?"),
    ("misspelt text", ["--text-columns", "reveiw"], "has no column 'reveiw' (--text-columns); its columns: review"),
    ("empty", ["--task", "{tmp}/empty.csv"], "the train split (empty.csv) is empty"),
    ("empty validation", ["--task", "{tmp}/nodev"], "the validation split (nodev/validation.csv) is empty"),
    ("single class", ["--task", "{tmp}/one.csv"], "has a single class ('positive')"),
    ("nan label", ["--task", "{tmp}/nan.csv"], "2 empty or NaN label(s) in column 'sentiment' of nan.csv (data rows 3, 5"),
    ("blank label", ["--task", "{tmp}/blank.csv"], "1 empty or NaN label(s) in column 'sentiment' of blank.csv (data rows 2"),
    ("unseen", ["--task", "{tmp}/folder"], "validation labels ['meh'] (folder/validation.csv) do not occur in train"),
    ("no validation room", ["--task", "{tmp}/rare.csv"], "cannot hold out a stratified 10% validation split of the 40 "
     "rows of rare.csv: 1 of its 3 classes have a single row (give a validation file, more rows per class, or check "
     "--label-column)"),
    # the text column as the label: every row its own class (was: sklearn's message listing all 40 classes)
    ("text as label", ["--label-column", "review"], "validation split of the 200 rows of reviews.csv: 200 of its 200 "
     "classes have a single row"),
    ("glue columns", ["--task", "sst2"], "--text-columns and --label-column apply to data files and hf: datasets"),
    ("bad metric", ["--metric", "bleu"], "metric 'bleu' is not reported for reviews"),
])
def test_bad_data_is_one_error_line_and_exit_2_before_anything_starts(case, args, msg, tmp_path, csv, monkeypatch):
    df = reviews(40)
    _bad(tmp_path, "empty.csv", text="review,sentiment\n")
    _bad(tmp_path, "one.csv", df.assign(sentiment="positive"))
    _bad(tmp_path, "nan.csv", df.assign(sentiment=df.sentiment.where(~df.index.isin([2, 4]))))
    _bad(tmp_path, "blank.csv", df.assign(sentiment=df.sentiment.where(df.index != 1, "  ")))
    _bad(tmp_path, "rare.csv", df.assign(sentiment=["odd"] + df.sentiment[1:].tolist()))
    (tmp_path / "folder").mkdir()
    _bad(tmp_path, "folder/train.csv", df)
    _bad(tmp_path, "folder/validation.csv", df.assign(sentiment=["meh"] + df.sentiment[1:].tolist()))
    (tmp_path / "nodev").mkdir()
    _bad(tmp_path, "nodev/train.csv", df)
    _bad(tmp_path, "nodev/validation.csv", text="review,sentiment\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--task": str(csv), "--text-columns": "review", "--label-column": "sentiment"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    res = runner.invoke(app, ["search", *[x for kv in base.items() for x in kv], "--output-dir", str(out),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert msg in " ".join(res.output.split()), res.output
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()  # before MLflow and the search folder
    import ray

    assert not ray.is_initialized()  # before Ray


def test_predict_returns_the_original_label_strings(csv, tmp_path):
    from autopeft import api
    from autopeft.backbones import load_tokenizer
    from autopeft.training.saved import load_trained

    spec = resolve_task(str(csv), "review", "sentiment")
    recipe = recipe_from_dict({"backbone": SMALL_BERT, "task": spec,
                               "components": [{"method": "lora", "r": 2, "target_modules": ["query", "value"]}],
                               "training": {"max_train_examples": 32, "batch_size": 16, "max_seq_length": 32}})
    result = api.train(recipe, output_dir=tmp_path / "out", log=None)
    assert set(result.metrics) == {"accuracy", "f1_macro", "mcc"}
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["task"]
    assert saved["labels"] == ["negative", "positive"]  # the mapping travels with the trained output
    texts = ["review number 3 good", "review number 150 bad", "something else entirely"]
    got = api.predict(tmp_path / "out", texts)
    model = load_trained(tmp_path / "out")
    enc = load_tokenizer(SMALL_BERT)(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits.argmax(-1).tolist()
    assert got == [["negative", "positive"][i] for i in ids]
    val = load_split(get_task(spec), "validation")
    preds = api.predict(tmp_path / "out", [t[0] for t in val.texts])
    gold = [["negative", "positive"][y] for y in val.labels]
    assert np.mean([p == g for p, g in zip(preds, gold)]) == pytest.approx(result.metrics["accuracy"], abs=1e-12)
    res = runner.invoke(app, ["predict", str(tmp_path / "out"), *texts])
    assert res.exit_code == 0 and res.output.split() == got
    with pytest.raises(ValueError, match="reads 1"):
        api.predict(tmp_path / "out", [("a", "b")])
    for bad in (0, -1, 2.5):  # was: -1 scored nothing and predicted the first label for every text
        with pytest.raises(ValueError, match=rf"^batch_size must be a whole number >= 1, got {bad}$"):
            api.predict(tmp_path / "out", texts, batch_size=bad)
