"""A tiny real search: real MiniLM, a few hundred real SST-2 examples, 3 trials, Ray Tune -> MLflow.

Checks what MLflow holds (parent run, one nested run per trial, metrics per rung, status and
pareto tags, the Pareto artifact), that the over-budget point was never trained, and that the
exported best recipe retrains to the same score.
"""

import json
from pathlib import Path

import pytest

import autopeft

pytestmark = pytest.mark.integration
SPACE = Path(__file__).parent / "data" / "tiny_space.yaml"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    glue = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
    if not (glue / "sst2" / "train.tsv").exists():
        pytest.skip("real GLUE data not found")
    work = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    result = autopeft.search(task="sst2", budget="50k", space=str(SPACE), trials=3, data_dir=str(glue),
                             tracking_uri=uri, experiment="itest", name="tiny", output_dir=work,
                             training={"max_eval_examples": 200}, progress=None)
    return result, uri, glue, work


def test_mlflow_holds_parent_and_one_nested_run_per_trial(searched):
    from mlflow.tracking import MlflowClient

    result, uri, _, _ = searched
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("itest")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == result.mlflow_run_id][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(result.trials)
    trained = [t for t in result.trials if t["status"] in ("finished", "stopped_early", "failed")]
    assert len(trained) == 3  # rejected samples take no trial slot
    assert parent.data.params["budget"] == "50k" and parent.data.params["param_limit"] == "50000"
    assert parent.data.params["searcher"] == "tpe" and parent.data.params["seed"] == "0"
    statuses = {r.data.tags["trial_id"]: r.data.tags["status"] for r in children}
    assert set(statuses.values()) <= {"finished", "stopped_early", "failed", "over_budget", "empty", "invalid"}
    assert "over_budget" in statuses.values()  # the adapter start point (445,248 params) is over 50k
    pareto_ids = {row["trial_id"] for row in result.pareto}
    for r in children:
        tid = r.data.tags["trial_id"]
        assert r.data.tags["pareto"] == ("true" if tid in pareto_ids else "false")
        if r.data.tags["status"] == "finished":
            history = client.get_metric_history(r.info.run_id, "score")
            assert [m.step for m in history] == [128, 256]  # one value per rung
            assert r.data.params["space.lora.enabled"] in ("True", "False")
        if r.data.tags["status"] == "over_budget":
            assert "score" not in r.data.metrics and r.data.metrics["trainable_params"] > 50_000
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.json", "pareto.csv", "best_recipe.yaml"} <= artifacts


def test_pareto_lists_only_within_budget_trials_at_the_top_fidelity(searched):
    result, _, _, _ = searched
    assert result.pareto, "at least the LoRA start point finishes"
    front = json.loads((result.path / "pareto.json").read_text())
    assert [r["trial_id"] for r in front] == [r["trial_id"] for r in result.pareto]
    for row in front:
        assert row["trainable_params"] <= 50_000 and row["examples_seen"] == 256
    over = [t for t in result.trials if t["status"] == "over_budget"]
    assert over and all(not t["rows"] for t in over)  # never trained
    assert all(t["trial_id"].startswith("rejected_") for t in over)  # never a Ray trial
    ray_trials = {p.name for p in (result.path / "ray").iterdir() if p.is_dir()}
    assert not any(t["trial_id"] in name for t in over for name in ray_trials)


def test_exported_best_recipe_retrains_to_the_same_score(searched, tmp_path):
    result, _, glue, work = searched
    recipe = autopeft.export("tiny", pick="best", output=tmp_path / "best.yaml", output_dir=work)
    again = autopeft.train(tmp_path / "best.yaml", data_dir=str(glue), output_dir=tmp_path / "out", log=None)
    best = max(result.pareto, key=lambda r: r["score"])
    assert again.score == pytest.approx(best["score"], abs=1e-9)
    assert again.trainable_params == best["trainable_params"] == autopeft.count(recipe).trainable_params
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
