"""A user CSV end to end on the real MiniLM, through the CLI as the README shows it: 200 SST-2 rows with
string labels -> search (2 trials) -> export -> train -> predict gives back the original label strings."""

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import autopeft
from autopeft.cli import app
from autopeft.data.tasks import get_task, load_split

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_user_csv_search_export_train_predict_on_minilm(glue_dir, tmp_path, monkeypatch):
    sst2 = pd.read_csv(glue_dir / "sst2" / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                       nrows=200)
    data = pd.DataFrame({"review": sst2.sentence, "sentiment": np.where(sst2.label == 1, "positive", "negative")})
    data.to_csv(tmp_path / "reviews.csv", index=False)
    monkeypatch.chdir(tmp_path)
    space = str(Path(__file__).parent / "data" / "tiny_space.yaml")
    res = runner.invoke(app, ["search", "--task", "reviews.csv", "--text-columns", "review", "--label-column",
                              "sentiment", "--budget", "1%", "--space", space, "--trials", "2",
                              "--max-train-examples", "128", "--name", "reviews"])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "autopeft_runs" / "reviews" / "search.json").read_text())
    assert settings["task"]["labels"] == ["negative", "positive"]
    assert settings["task"]["held_out"] == {"fraction": 0.1, "seed": 0, "stratified": True}
    front = json.loads((tmp_path / "autopeft_runs" / "reviews" / "pareto.json").read_text())
    assert front and all(r["examples_seen"] == 128 for r in front)

    res = runner.invoke(app, ["export", "reviews", "--pick", "best", "-o", "best.yaml"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--recipe", "best.yaml", "-o", "trained"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "trained" / "recipe.yaml").read_text())["task"]["labels"] == ["negative", "positive"]
    metrics = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    best = max(front, key=lambda r: r["score"])
    assert metrics["score"] == pytest.approx(best["score"], abs=1e-9)  # the exported recipe retrains to its score

    # the held-out 10% (20 rows, the test split), predicted as strings, scores exactly the recorded test accuracy
    val = load_split(get_task(settings["task"]), "validation")
    extra = ["a gorgeous , witty , seductive movie .", "dull and lifeless"]
    preds = autopeft.predict(tmp_path / "trained", [t[0] for t in val.texts] + extra)
    preds, extra_preds = preds[:20], preds[20:]
    gold = [["negative", "positive"][y] for y in val.labels]
    original = dict(zip(data.review, data.sentiment))
    assert gold == [original[t[0]] for t in val.texts]  # ids map back to the CSV's strings
    assert len(preds) == 20 and set(preds) <= {"negative", "positive"}
    assert np.mean([p == g for p, g in zip(preds, gold)]) == pytest.approx(metrics["test_metrics"]["accuracy"], abs=1e-12)

    res = runner.invoke(app, ["predict", "trained", *extra])
    assert res.exit_code == 0, res.output
    assert res.output.split() == extra_preds
