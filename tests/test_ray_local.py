"""Without --ray-address a search starts its own local Ray, whatever another Ray user left running.

Before the fix, ``ray.init()`` joined the cluster named in Ray's current-cluster file (left by
``ray start --head``, even after the head was killed without ``ray stop``) and failed with "When
connecting to an existing cluster, num_cpus and num_gpus must not be provided".
"""

import os
from pathlib import Path

import pytest

import autopeft

pytestmark = pytest.mark.integration
GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
SPACE = Path(__file__).parent / "data" / "tiny_space.yaml"


@pytest.fixture
def throwaway_head(tmp_path):
    """A Ray head started as another user would (``ray start --head``), in its own ``--block`` process
    so that stopping it stops this head only, never other Ray clusters on the machine."""
    from test_ray_cluster import _stop, start_head

    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    head, _ = start_head(env, tmp_path / "head.log")
    try:
        yield
    finally:
        _stop(head)


def test_default_search_ignores_a_cluster_started_earlier(throwaway_head, tmp_path, monkeypatch):
    if not (GLUE / "sst2" / "train.tsv").exists():
        pytest.skip("real GLUE data not found")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = autopeft.search(task="sst2", budget="50k", space=str(SPACE), trials=1, data_dir=str(GLUE),
                             tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", name="own-ray", output_dir=tmp_path,
                             training={"max_eval_examples": 64}, max_train_examples=64, progress=None)
    ray.shutdown()
    trained = [t for t in result.trials if t["status"] in ("finished", "stopped_early")]
    assert len(trained) == 1 and trained[0]["rows"][-1]["examples_seen"] == 64
    assert result.settings["training"]["rung_eval_examples"] == autopeft.api.RUNG_EVAL_EXAMPLES == 500  # the default
