"""Search settings that cannot work are one line before anything starts (no folder, no Ray, no MLflow)."""

import pytest

from autopeft import api
from autopeft.api import SearchSettingsError
from conftest import GLUE_DIR

TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 160}


def _search(tmp_path, **kw):
    if not (GLUE_DIR / "sst2" / "validation.tsv").exists():
        pytest.skip("real GLUE data not found")
    args = dict(task="sst2", budget="0.5%", backbone=TINY, data_dir=str(GLUE_DIR), output_dir=tmp_path / "runs",
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", trials=1, progress=None)
    return api.search(**{**args, **kw})


def _nothing_started(tmp_path):
    import ray

    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "", ".hidden", "x" * 200])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path, name):
    with pytest.raises(SearchSettingsError, match="must be a plain folder name"):
        _search(tmp_path, name=name)
    _nothing_started(tmp_path)


def test_a_budget_below_the_smallest_configuration_is_refused_up_front(tmp_path):
    # default space on the tiny BERT: the smallest configuration is the parallel FFN adapter with
    # reduction factor 128 -> bottleneck max(1, 32 // 128) = 1: 2 layers x (32*1 + 1 + 1*32 + 32) = 194
    with pytest.raises(SearchSettingsError, match=r"budget 10 = 10 trainable parameters is below the smallest "
                                                  r"configuration of space 'default' .*: 194\): raise --budget to "
                                                  r"at least 194"):
        _search(tmp_path, budget="10")
    _nothing_started(tmp_path)


def test_resources_no_trial_can_get_are_refused(tmp_path):
    with pytest.raises(SearchSettingsError, match=r"--gpus-per-trial 1 exceeds this machine's 0 GPUs"):
        _search(tmp_path, gpus_per_trial=1)
    with pytest.raises(SearchSettingsError, match=r"--cpus-per-trial 999 exceeds this machine's"):
        _search(tmp_path, cpus_per_trial=999)
    _nothing_started(tmp_path)


def test_a_preset_backbone_counts_but_never_searches(tmp_path):
    with pytest.raises(SearchSettingsError, match="preset 'llama-2-7b' describes sizes for counting only"):
        _search(tmp_path, backbone={"preset": "llama-2-7b"})
    _nothing_started(tmp_path)


def test_a_ray_client_address_is_refused_before_anything_starts(tmp_path):
    """Through Ray Client (``ray://``) Ray Tune runs on the head node, so the driver's trial records
    stayed there: tried on a head with ``ray[client]``, the search exited 0 with an empty trials.json."""
    with pytest.raises(SearchSettingsError) as err:
        _search(tmp_path, ray_address="ray://10.0.0.9:10001")
    assert str(err.value) == ("--ray-address ray://10.0.0.9:10001 goes through Ray Client, which runs Ray Tune on the "
                              "head node, so the search's trial records would stay there: run autopeft on a machine "
                              "of the cluster with --ray-address <head-ip>:6379 (or auto)")
    _nothing_started(tmp_path)


def test_cluster_resources_are_checked_against_the_connected_cluster(monkeypatch):
    import ray

    from autopeft.searching.tune import ClusterTooSmall, check_cluster_fits

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    check_cluster_fits(4, 0)
    with pytest.raises(ClusterTooSmall, match="a trial needs 1 GPUs but the Ray cluster has 0"):
        check_cluster_fits(1, 1)
    with pytest.raises(ClusterTooSmall, match="a trial needs 8 CPUs but the Ray cluster has 4"):
        check_cluster_fits(8, 0)


def test_a_cluster_that_cannot_be_reached_is_a_one_line_exit_2(capsys):
    import typer

    from autopeft import cli
    from autopeft.searching.tune import RayStartError

    def connect():
        raise RayStartError("cannot start Ray (address 10.0.0.9:6379): timed out; if the head runs with token ...")

    with pytest.raises(typer.Exit) as exit_:
        cli._run(connect)
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot start Ray (address 10.0.0.9:6379): timed out; if the head runs with token ..."]


def test_trial_summaries_print_whole_numbers_without_a_decimal_point():
    from autopeft.searching.tune import _summary

    recipe = {"components": [{"method": "adapter", "placement": "parallel", "reduction_factor": 64.0}],
              "training": {"learning_rate": 0.0032}}
    assert _summary(recipe) == "adapter(placement=parallel, reduction_factor=64) lr=0.0032"


def test_time_budget_none_means_no_cap_on_cpu_and_bad_values_are_refused(tmp_path, monkeypatch):
    """``math.inf`` (CLI ``--time-budget none``) is no cap, recorded as such and handed to Ray Tune as
    none; without it a CPU search stops at 26 minutes (the benchmark's "no time cap" got 26 minutes)."""
    import math

    from autopeft.cli import _parse_duration

    seen = []

    class Stop(Exception):
        pass

    def fake_run_tune(sp, base, limit, settings, *a, **k):
        seen.append(settings.time_budget_s)
        raise Stop  # before any trial: only the settings matter here

    monkeypatch.setattr("autopeft.searching.tune.run_tune", fake_run_tune)
    for value, want in ((math.inf, None), (None, 26 * 60), (90.0, 90.0)):
        with pytest.raises(Stop):
            _search(tmp_path, time_budget_s=value, name=f"t{len(seen)}")
        assert seen[-1] == want
    import json

    assert json.loads((tmp_path / "runs" / "t0" / "search.json").read_text())["time_budget_s"] is None
    for bad in (0, -5.0, math.nan):
        with pytest.raises(SearchSettingsError, match="time_budget_s must be positive seconds or math.inf"):
            _search(tmp_path, time_budget_s=bad, name="bad")
    assert _parse_duration("none") == math.inf and _parse_duration("30m") == 1800
    with pytest.raises(Exception, match="invalid time budget 'nan'"):
        _parse_duration("nan")


def test_the_rung_line_names_what_each_rung_scores():
    """The start's "rungs:" line: the lower rungs' sample and what the top rung scores, which
    max_eval_examples caps (the line said "all 2,000" while every rung scored the same 48)."""
    from types import SimpleNamespace

    from autopeft import api
    from autopeft.searching.budget import parse_budget

    def lines(training):
        out = []
        settings = {"splits": {"train": 65349, "dev": 2000, "test": 872, "test_source": "validation"}, "seed": 0,
                    "param_limit": 1, "backbone_params": 2, "rungs": [2688, 8064, 24000], "training": training}
        api._announce(out.append, settings, "s", SimpleNamespace(name="sst2", num_labels=2), parse_budget("1"),
                      "sqlite://", "id", [])
        return [x for x in out if x.startswith("rungs:")]

    assert lines({"rung_eval_examples": 500}) == [
        "rungs: 2,688, 8,064, 24,000 training examples; the lower ones score a seeded 500 of the dev examples "
        "(the same for every trial), the top one all 2,000"]
    assert lines({"rung_eval_examples": 500, "max_eval_examples": 1000})[0].endswith(
        "the top one the first 1,000 (max_eval_examples)")
    assert lines({"rung_eval_examples": 500, "max_eval_examples": 48}) == []  # every rung scores the same 48
    assert lines({"rung_eval_examples": None}) == [] == lines({})


@pytest.mark.parametrize("kw,msg", [
    # were (the Python API; the CLI checks its own): trials 0 / -2 wrote a finished search of no trials,
    # 1.5 and cpus_per_trial=-1 went on into Ray Tune, gpus_per_trial=-1 counted as GPUs
    ({"trials": 0}, "trials must be a whole number >= 1, got 0"),
    ({"trials": -2}, "trials must be a whole number >= 1, got -2"),
    ({"trials": 1.5}, "trials must be a whole number >= 1, got 1.5"),
    ({"cpus_per_trial": -1}, "cpus_per_trial must be a positive number of CPUs, got -1"),
    ({"gpus_per_trial": -1}, "gpus_per_trial must be a number of GPUs >= 0, got -1"),
    ({"seed": "x"}, "seed must be a whole number, got 'x'"),
    ({"max_train_examples": 2.5}, "max_train_examples must be a whole number of examples >= 1, got 2.5"),
    ({"confirm_seeds": -1}, "confirm_seeds must be a whole number >= 0, got -1"),
])
def test_counts_and_resources_that_are_no_usable_number_are_refused(tmp_path, kw, msg):
    with pytest.raises(SearchSettingsError, match=f"^{msg}$".replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _search(tmp_path, **kw)
    _nothing_started(tmp_path)
