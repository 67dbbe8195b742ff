"""Selection and report on different data: the dev split, 95% intervals, and a test split no search reads."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import autopeft
from autopeft.data.tasks import DevSplit, Split, carve_dev, default_dev_examples
from autopeft.data.uncertainty import bootstrap_ci, within_noise

#: A tiny BERT that trains: the bundled BERT tokenizer needs the full 30,522-token vocabulary.
TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 160}

SPACE = Path(__file__).parent / "data" / "tiny_space.yaml"


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after_the_module():
    """The searches here run in this process: leave no Ray instance to later tests (they check that
    bad input starts none)."""
    yield
    import ray

    ray.shutdown()


def _split(n: int, positive: float = 0.3) -> Split:
    labels = (np.arange(n) < round(positive * n)).astype(np.int64)
    return Split([(f"text {i}",) for i in range(n)], labels)


@pytest.mark.parametrize("n, expected", [(67349, 2000), (8551, 855), (2490, 249), (500, 100), (150, 75), (10, 5)])
def test_default_dev_size_is_a_tenth_of_train_within_100_and_2000_and_at_most_half(n, expected):
    assert default_dev_examples(n) == expected


def test_carved_dev_is_seeded_stratified_and_disjoint_from_train():
    split = _split(1000, positive=0.3)
    train, dev = carve_dev(split, DevSplit(examples=100, seed=0))
    assert len(train) == 900 and len(dev) == 100
    assert dev.labels.sum() == 30  # stratified: 30% positive, as train
    assert {t for t, in train.texts}.isdisjoint({t for t, in dev.texts})
    assert sorted(t for t, in train.texts + dev.texts) == sorted(t for t, in split.texts)
    again = carve_dev(split, DevSplit(examples=100, seed=0))[1]
    other = carve_dev(split, DevSplit(examples=100, seed=1))[1]
    assert again.texts == dev.texts and other.texts != dev.texts


def test_a_dev_split_as_large_as_train_is_a_one_line_error():
    from autopeft.data.tasks import TaskError

    with pytest.raises(TaskError, match="leaves nothing to train on"):
        carve_dev(_split(10), DevSplit(examples=10))


def test_bootstrap_interval_of_accuracy_matches_the_binomial_one():
    """n=1000 at 80% accuracy: the normal interval is 0.8 +- 1.96 sqrt(0.8 * 0.2 / 1000) = +-0.0248."""
    from autopeft.data.tasks import METRICS

    gold = np.ones(1000, dtype=np.int64)
    pred = np.concatenate([np.ones(800), np.zeros(200)]).astype(np.int64)
    low, high = bootstrap_ci(METRICS["accuracy"], pred, gold, seed=0)
    assert low == pytest.approx(0.8 - 0.0248, abs=0.004) and high == pytest.approx(0.8 + 0.0248, abs=0.004)
    assert bootstrap_ci(METRICS["accuracy"], pred, gold, seed=0) == (low, high)  # seeded
    f1_low, f1_high = bootstrap_ci(METRICS["f1"], pred, gold, seed=0)  # the generic (looped) path
    assert f1_low < 2 * 0.8 / 1.8 < f1_high


def test_within_noise_keeps_the_points_inside_the_best_interval_and_the_pick_takes_the_smallest(tmp_path):
    rows = [{"trial_id": "a", "score": 0.88, "score_low": 0.86, "score_high": 0.90, "trainable_params": 90_000,
             "peak_memory_bytes": 3, "recipe": {}},
            {"trial_id": "b", "score": 0.865, "score_low": 0.84, "score_high": 0.88, "trainable_params": 40_000,
             "peak_memory_bytes": 2, "recipe": {}},
            {"trial_id": "c", "score": 0.85, "score_low": 0.83, "score_high": 0.87, "trainable_params": 10_000,
             "peak_memory_bytes": 1, "recipe": {}}]
    assert [r["trial_id"] for r in within_noise(rows)] == ["a", "b"]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "pareto.json").write_text(json.dumps(rows))
    assert autopeft.api.pick_point(tmp_path / "s", "smallest-within-noise")[1]["trial_id"] == "b"
    assert autopeft.api.pick_point(tmp_path / "s", "best")[1]["trial_id"] == "a"
    # every other pick, on a front where each names another point
    rows[1]["peak_memory_bytes"] = 0  # b is the leanest, c the smallest
    (tmp_path / "s" / "pareto.json").write_text(json.dumps(rows))
    picks = {p: autopeft.api.pick_point(tmp_path / "s", p)[1]["trial_id"] for p in ("smallest", "leanest", "2", "b")}
    assert picks == {"smallest": "c", "leanest": "b", "2": "c", "b": "b"}
    with pytest.raises(ValueError, match=r"^pick 3 is out of range: the front has 3 points \(0-2\)$"):
        autopeft.api.pick_point(tmp_path / "s", "3")
    with pytest.raises(ValueError, match=r"^unknown pick 'trial_9'; use best, smallest, leanest, smallest-within-noise, "
                                         r"an index, or a trial id \(a, b, c\)$"):
        autopeft.api.pick_point(tmp_path / "s", "trial_9")


# ----- a real search: the test split is never read before the search ends -------------------------
def _data_dir(root: Path, glue: Path, flip: bool) -> Path:
    """1,200 SST-2 train rows and the real validation file (its labels flipped when ``flip``)."""
    d = root / ("flipped" if flip else "normal") / "sst2"
    d.mkdir(parents=True)
    lines = (glue / "sst2" / "train.tsv").read_text().splitlines(keepends=True)
    (d / "train.tsv").write_text("".join(lines[:1201]))
    val = (glue / "sst2" / "validation.tsv").read_text().splitlines(keepends=True)
    if flip:
        val = [val[0]] + [f"{s}\t{1 - int(y)}\n" for s, y in (v.rstrip("\n").rsplit("\t", 1) for v in val[1:])]
    (d / "validation.tsv").write_text("".join(val))
    return d.parent


@pytest.fixture(scope="module")
def twin_searches(tmp_path_factory):
    glue = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
    if not (glue / "sst2" / "train.tsv").exists():
        pytest.skip("real GLUE data not found")
    work = tmp_path_factory.mktemp("twins")
    out = {}
    for flip in (False, True):
        data = _data_dir(work, glue, flip)
        out[flip] = autopeft.search(task="sst2", budget="50%", backbone=TINY, space=str(SPACE), trials=3,
                                    data_dir=str(data), tracking_uri=f"sqlite:///{work / f'm{flip}.db'}",
                                    experiment="twins", name=f"s{int(flip)}", output_dir=work / f"runs{int(flip)}",
                                    progress=None)
    return out, work


def _strip(trials):
    """Trial records without wall-clock times and Ray node ids (they differ between any two runs)."""
    keep = []
    for t in trials:
        rows = [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in t["rows"]]
        keep.append({k: v for k, v in t.items() if k not in ("node_id", "hostname")} | {"rows": rows})
    return keep


def test_flipped_test_labels_change_nothing_but_the_test_scores(twin_searches):
    normal, flipped = twin_searches[0][False], twin_searches[0][True]
    assert _strip(normal.trials) == _strip(flipped.trials)  # every trial, dev score and status
    assert [r["trial_id"] for r in normal.pareto] == [r["trial_id"] for r in flipped.pareto]
    assert [r["score"] for r in normal.pareto] == [r["score"] for r in flipped.pareto]
    assert normal.hypervolume == flipped.hypervolume
    for pick in ("best", "smallest", "smallest-within-noise"):
        assert (autopeft.api.pick_point(normal.path, pick)[1]["trial_id"]
                == autopeft.api.pick_point(flipped.path, pick)[1]["trial_id"])
    for a, b in zip(normal.pareto, flipped.pareto):  # binary labels flipped: accuracy becomes 1 - accuracy
        assert a["test_score"] == pytest.approx(1 - b["test_score"], abs=1e-12)
        assert a["test_examples"] == b["test_examples"] == 872


def test_splits_are_recorded_and_every_front_point_has_dev_and_test_intervals(twin_searches):
    from mlflow.tracking import MlflowClient

    result, work = twin_searches[0][False], twin_searches[1]
    s = json.loads((result.path / "search.json").read_text())["splits"]
    assert (s["train"], s["dev"], s["test"]) == (1080, 120, 872)
    assert result.pareto
    for row in result.pareto:
        assert row["score_low"] <= row["score"] <= row["score_high"]
        assert row["test_low"] <= row["test_score"] <= row["test_high"]
        assert row["eval_split"] == "dev" and row["eval_examples"] == 120
    csv = (result.path / "pareto.csv").read_text().splitlines()
    assert csv[0].startswith("trial_id,score,score_low,score_high,test_score,test_low,test_high,")
    client = MlflowClient(f"sqlite:///{work / 'mFalse.db'}")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.params["splits.dev"] == "120" and parent.data.params["splits.test"] == "872"
    best = result.pareto[0]
    run = client.search_runs([parent.info.experiment_id], f"tags.trial_id = '{best['trial_id']}'")[0]
    assert run.data.metrics["test_score"] == pytest.approx(best["test_score"])
    assert run.data.metrics["score_low"] == pytest.approx(best["score_low"])


def test_the_search_keeps_the_front_models_and_train_reproduces_dev_and_test(twin_searches, tmp_path):
    result, work = twin_searches[0][False], twin_searches[1]
    best = result.pareto[0]
    kept = result.path / "trained" / best["trial_id"]
    assert (kept / "adapter_model.safetensors").is_file()
    recipe = autopeft.export(result.path, pick="best", output=tmp_path / "best.yaml")
    assert recipe.dev is not None and recipe.dev.examples == 120
    data = work / "normal"
    again = autopeft.train(tmp_path / "best.yaml", data_dir=str(data), output_dir=tmp_path / "out", log=None)
    assert again.score == best["score"] and again.test_score == best["test_score"]
    assert "dev score" in (tmp_path / "best.yaml").read_text().splitlines()[1]


def test_the_search_report_shows_dev_and_test_side_by_side(twin_searches, tmp_path):
    import subprocess
    import sys

    result, work = twin_searches[0][False], twin_searches[1]
    out = tmp_path / "report.html"
    script = Path(__file__).resolve().parents[1] / "dashboards" / "search_report.py"
    proc = subprocess.run([sys.executable, str(script), "--tracking-uri", f"sqlite:///{work / 'mFalse.db'}",
                           "--experiment", "twins", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    best = result.pareto[0]
    assert "<th>dev score</th><th>test score</th>" in page
    assert f"{best['score']:.4f} [{best['score_low']:.4f}, {best['score_high']:.4f}]" in page
    assert f"{best['test_score']:.4f} [{best['test_low']:.4f}, {best['test_high']:.4f}]" in page
    # each rung's dev score names how many dev examples it read (all 120 here: fewer than the rung sample)
    rows = [r for t in result.trials for r in t["rows"]]
    assert rows
    for row in rows:
        assert f"{row['examples_seen']}: {row['score']:.3f} on 120" in page


def test_cli_confirm_seeds_and_full_reference_are_reported(glue_dir, tmp_path):
    """``--confirm-seeds 1 --reference full`` as a user types them (real MiniLM, 64 examples a trial)."""
    from typer.testing import CliRunner

    from autopeft.cli import app

    data = _data_dir(tmp_path, glue_dir, flip=False)
    res = CliRunner().invoke(app, ["search", "--task", "sst2", "--budget", "50k", "--space", str(SPACE),
                                   "--trials", "1", "--max-train-examples", "64", "--data-dir", str(data),
                                   "--confirm-seeds", "1", "--reference", "full", "--name", "cr", "-q", "--batch-size", "16",
                                   "--output-dir", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    front = json.loads((tmp_path / "cr" / "pareto.json").read_text())
    c = front[0]["confirm"]
    assert front[0]["recipe"]["training"]["batch_size"] == 16 and front[0]["examples_seen"] == 64  # was 32: ignored
    assert c["seeds"] == [0, 1] and c["test_scores"][0] == front[0]["test_score"]
    assert c["test_mean"] == pytest.approx(sum(c["test_scores"]) / 2)
    assert c["test_std"] == pytest.approx(abs(c["test_scores"][0] - c["test_scores"][1]) / math.sqrt(2))
    ref = json.loads((tmp_path / "cr" / "reference.json").read_text())
    assert ref["kind"] == "full" and ref["trainable_params"] > 22_000_000 and ref["examples_seen"] == 64
    assert ref["recipe"]["dev"] == front[0]["recipe"]["dev"]  # the same splits as the search
    assert "test mean ± std" in res.output and f"{c['test_mean']:.4f} ± {c['test_std']:.4f} (2)" in res.output
    assert f"reference: full fine-tuning" in res.output and f"test {ref['test_score']:.4f}" in res.output


def test_cli_metric_option_selects_and_reports_on_that_metric(glue_dir, tmp_path):
    """``--metric accuracy`` on MRPC (whose own metric is F1) as a user types it: every trial's score,
    its interval, the front's test score and the printed table are accuracy, and F1 is still reported."""
    from typer.testing import CliRunner

    from autopeft.cli import app

    res = CliRunner().invoke(app, ["search", "--task", "mrpc", "--metric", "accuracy", "--budget", "50k",
                                   "--space", str(SPACE), "--trials", "1", "--max-train-examples", "64",
                                   "--data-dir", str(glue_dir), "--name", "m", "-q", "--output-dir", str(tmp_path),
                                   "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "search.json").read_text())["task"] == {"name": "mrpc", "metric": "accuracy"}
    row = json.loads((tmp_path / "m" / "pareto.json").read_text())[0]
    assert row["recipe"]["task"] == {"name": "mrpc", "metric": "accuracy"}
    assert row["score"] == row["accuracy"] and row["f1"] != row["accuracy"]
    assert row["score_low"] <= row["score"] <= row["score_high"]
    assert row["test_score"] == row["test_metrics"]["accuracy"] and set(row["test_metrics"]) == {"accuracy", "f1"}
    assert "accuracy" in res.output and f"{row['test_score']:.4f}" in res.output


def test_failed_after_search_runs_are_recorded_and_the_results_kept(glue_dir, tmp_path, monkeypatch):
    """A confirm seed or the reference that raises (a NaN loss) used to end the search with no
    pareto.json or result.json after the whole search; now each is recorded and the front is written."""
    from typer.testing import CliRunner

    import autopeft.training.trainer as trainer
    from autopeft.cli import app

    real = trainer.run_trial

    def nan_after_search(*args, **kwargs):  # the search's own trials train; the after-search runs fail
        if kwargs.get("test"):
            raise FloatingPointError("training loss became nan\nat step 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_trial", nan_after_search)
    data = _data_dir(tmp_path, glue_dir, flip=False)
    res = CliRunner().invoke(app, ["search", "--task", "sst2", "--budget", "50k", "--space", str(SPACE),
                                   "--trials", "1", "--max-train-examples", "64", "--data-dir", str(data),
                                   "--confirm-seeds", "1", "--reference", "full", "--name", "nan", "--quiet",
                                   "--output-dir", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    error = "FloatingPointError: training loss became nan at step 2"
    front = json.loads((tmp_path / "nan" / "pareto.json").read_text())
    c = front[0]["confirm"]
    assert c["seeds"] == [0, 1] and c["test_scores"] == [front[0]["test_score"], None]
    assert c["failed"] == {"1": error} and c["test_mean"] == front[0]["test_score"]
    assert json.loads((tmp_path / "nan" / "reference.json").read_text())["status"] == "failed"
    assert json.loads((tmp_path / "nan" / "result.json").read_text())["counts"]["finished"] == 1
    assert f"reference: full fine-tuning failed: {error}" in res.output


def test_a_kept_model_that_cannot_be_scored_is_noted_on_its_row(tmp_path):
    from autopeft.searching.final import score_front_on_test

    kept = tmp_path / "trained" / "trial_0000"
    kept.mkdir(parents=True)
    (kept / "recipe.yaml").write_text("backbone: minilm-l6\n")
    (kept / "adapter_model.safetensors").write_bytes(b"not safetensors")
    rows = [{"trial_id": "trial_0000", "score": 0.8, "recipe": {"backbone": "minilm-l6", "task": "sst2"}},
            {"trial_id": "trial_0001", "score": 0.7, "recipe": {}}]
    score_front_on_test(rows, tmp_path, None)
    assert rows[0]["test_score"] is None and rows[0]["test_note"].startswith("test scoring failed: ")
    assert rows[1]["test_score"] is None and rows[1]["test_note"] == f"no kept weights in {tmp_path / 'trained' / 'trial_0001'}"


def test_bad_confirm_seeds_and_reference_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from autopeft.cli import app

    res = CliRunner().invoke(app, ["search", "--reference", "lora", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "unknown --reference 'lora'; valid: full" in res.output
    res = CliRunner().invoke(app, ["search", "--confirm-seeds", "-1", "--output-dir", str(tmp_path)])
    # one line, as every bad input (was click's boxed usage panel); nothing written
    assert res.exit_code == 2 and res.output == ("error: Invalid value for '--confirm-seeds': Input should be greater "
                                                 "than or equal to 0; see `root search --help`\n"), res.output
    assert list(tmp_path.iterdir()) == []


def test_a_backbone_no_trial_could_train_is_refused_before_the_search(tmp_path):
    """A bare config whose vocabulary is smaller than the tokenizer's failed every trial at its first batch."""
    from autopeft.composition.recipe import RecipeError
    from conftest import GLUE_DIR, TINY_BERT

    with pytest.raises(RecipeError, match="vocab_size 120 is smaller than the 30,522 tokens"):
        autopeft.search(task="sst2", budget="50%", backbone=TINY_BERT, space=str(SPACE), trials=1,
                        data_dir=str(GLUE_DIR), output_dir=tmp_path / "runs", progress=None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("metric,n", [("mcc", 855), ("f1", 367), ("pearson", 575), ("accuracy", 872)])
def test_vectorised_intervals_equal_the_metric_resample_by_resample(metric, n):
    """The closed-form statistics (binary F1 and MCC, Pearson, accuracy) give the interval the scalar
    metric gives on the same resamples, including degenerate ones (MCC/F1 of one class: 0)."""
    from scipy.stats import bootstrap

    from autopeft.data.tasks import METRICS
    from autopeft.data.uncertainty import vectorised_metric, bootstrap_ci

    rng = np.random.default_rng(3)
    if metric == "pearson":
        gold = rng.random(n) * 5
        pred = gold + rng.normal(0, 1.5, n)
    else:
        gold = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, gold, 1 - gold)
    fn = METRICS[metric]
    want = bootstrap((pred, gold), lambda p, g: fn(p, g), n_resamples=300, paired=True, vectorized=False,
                     method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert bootstrap_ci(fn, pred, gold, seed=0, n_resamples=300) == pytest.approx((want.low, want.high), abs=1e-12)
    if metric != "pearson":  # one class predicted: sklearn answers 0 for MCC and F1
        stat = vectorised_metric(fn.__name__, np.zeros(n, int), gold)
        assert float(stat(np.zeros(n, int), gold)) == pytest.approx(fn(np.zeros(n, int), gold), abs=1e-12)
    assert vectorised_metric(fn.__name__, pred * 3, gold * 3) is None or metric in ("accuracy", "pearson")


def test_every_report_formats_a_score_and_its_interval_one_way():
    """The CLI table, export's provenance comment and the HTML report share one formatter."""
    from autopeft.cli import _fmt_ci
    from autopeft.data.uncertainty import fmt_ci

    assert fmt_ci(0.87614, 0.85412, 0.89681) == "0.8761 [0.8541, 0.8968]"
    assert fmt_ci(0.87614, None, 0.9) == fmt_ci(0.87614, float("nan"), 0.9) == "0.8761"
    assert fmt_ci(None) == fmt_ci(float("nan"), 0.1, 0.2) == fmt_ci(float("inf")) == fmt_ci(True) == "n/a"
    row = {"score": 0.8, "score_low": 0.7, "score_high": 0.9, "test_score": float("inf"), "test_low": 0.1}
    assert (_fmt_ci(row, "score"), _fmt_ci(row, "test")) == ("0.8000 [0.7000, 0.9000]", "n/a")  # was "inf"


def test_the_tune_loop_refuses_trials_without_a_dev_split():
    """Trials scored without ``dev`` would read the validation split, the search's test split: refused
    before Ray starts (``api.search`` always sets it; this guards any other caller of the loop)."""
    from autopeft.searching.tune import run_tune

    with pytest.raises(ValueError, match=r"no dev split|would read the test split"):
        run_tune(None, {"task": "sst2", "dev": None}, 1000, None, None)
