"""Every method from a recipe on the real MiniLM-L6 and real SST-2, through the CLI: count, then train.

Tiny fidelity (64 training and 64 validation examples): this checks that each method builds, trains,
evaluates and saves on the real backbone, not how well it learns (experiments/methods_table.md does).
"""

import json

import pytest
import yaml
from typer.testing import CliRunner

from autopeft.cli import app
from autopeft.methods import CANONICAL_METHODS

pytestmark = pytest.mark.integration
runner = CliRunner()


def _components(method, tmp_path, glue_dir):
    if method == "adapter_drop":
        return [{"method": "adapter"}, {"method": "adapter_drop"}]
    if method == "adapter_fusion":
        from autopeft.training.fusion import train_adapters

        base = {"backbone": "minilm-l6", "training": {"max_train_examples": 32, "max_eval_examples": 32}}
        folders = train_adapters(["mrpc", "rte"], base, tmp_path / "stage1", str(glue_dir))
        return [{"method": "adapter_fusion", "adapters": [str(f) for f in folders]}]
    return [{"method": method}]


@pytest.mark.parametrize("method", CANONICAL_METHODS)
def test_count_and_train_every_method_on_minilm(method, tmp_path, glue_dir):
    recipe = {"backbone": "minilm-l6", "task": "sst2", "components": _components(method, tmp_path, glue_dir),
              "training": {"max_train_examples": 64, "max_eval_examples": 64, "batch_size": 32}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    counted = runner.invoke(app, ["count", str(path), "--json"])
    assert counted.exit_code == 0, counted.output
    n = json.loads(counted.output)["trainable_params"]
    trained = runner.invoke(app, ["train", "--recipe", str(path), "--data-dir", str(glue_dir), "-o", str(tmp_path / "out"),
                                  "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["trainable_params"] == n and metrics["steps"] == 2 and 0.0 <= metrics["score"] <= 1.0
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
