"""A long value is never cut without a word (issue 14, case 5; mlflow/mlflow#6183).

A parameter over MLflow's 6,000 characters (a search-space path, a long label or target list) was cut
silently on the runs, an ``error`` tag at 5,000 characters, a trial's error message in ``trials.json``
at 2,000. Now a cut value ends in a visible marker, and MLflow keeps the whole value as an artifact of
the run.
"""

from pathlib import Path

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as MAX_PARAM_VALUE_LENGTH
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as MAX_TAG_VALUE_LENGTH

from autopeft.searching.tracking import SearchTracker


def _artifact(uri: str, run_id: str, path: str, tmp: Path) -> str:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(tmp))).read_text()


def test_a_long_parameter_is_marked_and_kept_whole_as_an_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = "/data/" + "/".join(f"level{i:04d}" for i in range(700)) + "/space.yaml"  # 7,011 characters
    labels = [f"class_{i:05d}" for i in range(800)]
    tracker = SearchTracker(uri, "long", "s", {"space_source": source, "task": {"labels": labels}, "seed": 0})
    params = MlflowClient(uri).get_run(tracker.parent_id).data.params
    marker = (f" …[cut: {len(source):,} characters in all; whole value: artifact "
              "long_values/params/space_source.txt]")
    assert params["space_source"] == source[:MAX_PARAM_VALUE_LENGTH - len(marker)] + marker  # was source[:6000]
    assert len(params["space_source"]) == MAX_PARAM_VALUE_LENGTH
    assert params["task.labels"].endswith("whole value: artifact long_values/params/task.labels.txt]")
    assert params["seed"] == "0"  # short values unchanged
    (tmp_path / "a").mkdir()
    assert _artifact(uri, tracker.parent_id, "long_values/params/space_source.txt", tmp_path / "a") == source
    assert _artifact(uri, tracker.parent_id, "long_values/params/task.labels.txt", tmp_path / "a") == str(labels)
    # a trial's parameters too (e.g. a long target list of the recipe)
    targets = [f"encoder.layer.{i}.attention.self.query_projection_module" for i in range(150)]
    run = tracker.start_trial("t1", {"lora.r": 8}, {"task": "sst2", "components": [
        {"method": "lora", "r": 8, "target_modules": targets}]})
    trial = MlflowClient(uri).get_run(run).data.params
    key = "recipe.components.0.lora.target_modules"
    assert trial[key].endswith(f"whole value: artifact long_values/params/{key}.txt]") and trial["space.lora.r"] == "8"
    assert _artifact(uri, run, f"long_values/params/{key}.txt", tmp_path / "a") == str(targets)


def test_long_tags_are_marked_and_kept_whole_as_an_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker(uri, "long", "s", {"seed": 0})
    error = "ValueError: " + "".join(f"line {i} of a long traceback\n" for i in range(600))  # ~16,000 characters
    run = tracker.start_trial("t1", {"lora.r": 8}, None)
    tracker.end_trial("t1", "failed", error)
    tag = MlflowClient(uri).get_run(run).data.tags["error"]
    assert tag.startswith(error[:4000]) and len(tag) == MAX_TAG_VALUE_LENGTH  # was error[:5000], no word
    assert tag.endswith(f" …[cut: {len(error):,} characters in all; whole value: artifact long_values/tags/error.txt]")
    assert _artifact(uri, run, "long_values/tags/error.txt", tmp_path) == error
    short = "RuntimeError: " + "x" * 6000  # fits the 8,000 of a tag: whole (was cut at 5,000)
    tracker.start_trial("t2", {"lora.r": 4}, None)
    tracker.end_trial("t2", "failed", short)
    assert MlflowClient(uri).get_run(tracker.trial_runs["t2"]).data.tags["error"] == short
    tracker.fail(error)
    parent = MlflowClient(uri).get_run(tracker.parent_id)
    assert parent.data.tags["error"].endswith("whole value: artifact long_values/tags/error.txt]")
    (tmp_path / "p").mkdir()
    assert _artifact(uri, tracker.parent_id, "long_values/tags/error.txt", tmp_path / "p") == error


def test_a_trials_long_error_is_recorded_with_a_marker(tmp_path):
    from types import SimpleNamespace

    from autopeft.searching.tune import MAX_ERROR_CHARS, _ray_error

    line = "ActorDiedError: The actor died unexpectedly " + "because " * 4000
    (tmp_path / "error.txt").write_text(f"Failure # 1\n{line}\n")
    got = _ray_error(SimpleNamespace(error_file=str(tmp_path / "error.txt")))
    assert len(got) == MAX_ERROR_CHARS and got.startswith(line[:1000])  # was line[:2000], no word
    assert got.endswith(f" …[cut: {len(line.strip()):,} characters in all]")


def test_cut_value_keeps_short_values_and_fits_the_limit():
    from autopeft.searching.tracking import cut_value

    assert cut_value("abc", 3) == "abc"
    cut = cut_value("x" * 500, 100, "long_values/tags/t.txt")
    assert len(cut) == 100 and cut.startswith("x") and cut.endswith("artifact long_values/tags/t.txt]")
    assert cut_value("y" * 10, 5) == "yyyy…"  # no room for the marker: the value's start, not part of the marker
    assert cut_value("y" * 10, 1) == "…" and cut_value("y" * 10, 0) == ""
