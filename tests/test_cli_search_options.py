"""Search options as a user types them, each run end to end through the CLI (real SST-2, MiniLM-L6, 64
training examples, the tiny space), with its effect checked in the search's files and MLflow:
``--searcher``, ``--seed``, ``--experiment``, ``--cpus-per-trial``, ``--rung-eval-examples``,
``--time-budget``, ``--budget``, ``-q`` on ``search`` and ``resume``, and ``--one-shot``. Before, these were checked only as arguments handed to a replaced ``api.search``."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autopeft.cli import app

SPACE = Path(__file__).parent / "data" / "tiny_space.yaml"
#: What the progress output (off with ``-q``) prints at the start of every search.
PROGRESS_LINES = ("splits: train", "rungs: ")


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after_the_module():
    yield
    import ray

    ray.shutdown()


def _search(tmp_path: Path, glue_dir: Path, name: str, *options: str):
    return CliRunner().invoke(app, ["search", "--task", "sst2", "--budget", "50k", "--space", str(SPACE),
                                    "--trials", "2", "--max-train-examples", "64", "--data-dir", str(glue_dir),
                                    "--name", name, "--output-dir", str(tmp_path),
                                    "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *options], terminal_width=200)


@pytest.mark.integration
def test_searcher_seed_experiment_cpus_and_quiet_take_effect_and_resume_quiet(glue_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    res = _search(tmp_path, glue_dir, "o", "--searcher", "random", "--seed", "3", "--experiment", "my-exp",
                  "--cpus-per-trial", "1", "--rung-eval-examples", "100", "--time-budget", "30m", "-q")
    assert res.exit_code == 0, res.output
    assert not any(line in res.output for line in PROGRESS_LINES) and "Pareto front" in res.output  # -q
    folder = tmp_path / "o"
    settings = json.loads((folder / "search.json").read_text())
    assert (settings["searcher"], settings["seed"], settings["cpus_per_trial"]) == ("random", 3, 1.0)
    assert settings["splits"]["dev_seed"] == 3  # --seed carves the dev split ...
    trained = [t for t in json.loads((folder / "trials.json").read_text()) if t["rows"]]
    assert trained and all(t["recipe"]["training"]["seed"] == 3 for t in trained)  # ... and seeds every trial
    assert all(r["threads"] == 1 for t in trained for r in t["rows"])  # --cpus-per-trial 1: one thread a trial
    # --rung-eval-examples: the lower rung is scored on 100 dev examples, the top one on the whole dev split
    assert settings["rungs"] == [32, 64] and all([r["eval_examples"] for r in t["rows"]] == [100, 2000] for t in trained)
    assert settings["time_budget_s"] == 1800  # --time-budget 30m
    # --budget 50k: trained trials fit it, samples over it were rejected untrained
    records = json.loads((folder / "trials.json").read_text())
    assert settings["param_limit"] == 50_000 and all(t["trainable_params"] <= 50_000 for t in trained)
    over = [t for t in records if t["status"] == "over_budget"]
    assert over and all(t["trainable_params"] > 50_000 and not t["rows"] for t in over)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.get_experiment_by_name("my-exp")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("autopeft.kind") == "search"]
    assert parent.data.params["searcher"] == "random"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["trial_id"] for r in children} >= {t["trial_id"] for t in trained}
    assert client.get_experiment_by_name("autopeft") is None  # nothing went to the default experiment

    # resume -q: a search that lost its result.json is finished again, silently, with the same front
    front = json.loads((folder / "pareto.json").read_text())
    (folder / "result.json").unlink()
    res = CliRunner().invoke(app, ["resume", "o", "-q", "--output-dir", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert not any(line in res.output for line in (*PROGRESS_LINES, "resumed after")) and "Pareto front" in res.output
    assert (folder / "result.json").is_file()
    assert [p["trial_id"] for p in json.loads((folder / "pareto.json").read_text())] == [p["trial_id"] for p in front]


@pytest.mark.integration
def test_one_shot_adds_its_proposals_as_start_points_and_progress_is_printed(glue_dir, tmp_path):
    res = _search(tmp_path, glue_dir, "shot", "--one-shot", "--trials", "3")
    assert res.exit_code == 0, res.output
    assert all(line in res.output for line in PROGRESS_LINES)  # without -q, progress is printed
    folder = tmp_path / "shot"
    assert json.loads((folder / "search.json").read_text())["one_shot"] is True
    shot = json.loads((folder / "one_shot.json").read_text())
    assert set(shot["importance"]) == {"lora", "adapter"} and shot["proposals"]  # a gate per component
    assert all(0 < g < 1 for g in shot["importance"].values())
    assert shot["examples"] == 64  # the top fidelity, not 2,000: one top-fidelity trial at most
    # the proposals are start points after the space's own: with 3 trial slots (the space's second start point is
    # over the 50k budget, rejected without a slot), both proposals are trained
    trained = [t["config"] for t in json.loads((folder / "trials.json").read_text()) if t["rows"]]
    assert len(trained) == 3
    for proposal in shot["proposals"]:
        assert any(all(c.get(k) == v for k, v in proposal.items()) for c in trained[1:]), proposal
