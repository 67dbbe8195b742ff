"""A tiny search on a decoder backbone (random tiny Llama) over a user CSV, through Ray Tune into MLflow."""

import csv
from pathlib import Path

import pytest

import autopeft

pytestmark = pytest.mark.integration

#: Tiny Llama: GQA (4 query heads, 2 key/value heads); vocabulary of the BERT tokenizer that bare
#: configs use for training.
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 30522,
              "max_position_embeddings": 256, "bos_token_id": 101, "eos_token_id": 102}

SPACE = """
name: tiny-decoder
fidelity: {max_train_examples: 64, min_train_examples: 16, reduction_factor: 2}
components:
  lora: {enabled: [true, false], r: [2, 4], target_modules: [[q_proj, v_proj]]}
  prefix_tuning: {enabled: [false, true], num_virtual_tokens: [2, 4], encoder_hidden_size: 8}
  bitfit: {enabled: [false, true]}
pooling: [pooler, mean, cls]            # a decoder's pooler is its last token
training: {learning_rate: 1.0e-3, batch_size: 16}
start_points:
  - {lora.enabled: true, lora.r: 4, pooling: pooler}
  - {prefix_tuning.enabled: true, pooling: cls}
  - {bitfit.enabled: true}
"""


def _csv(path: Path, n: int = 80) -> Path:
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(n):
            word = words[i % 6]
            w.writerow([f"the film was {word} and {words[(i * 5) % 6]}", "positive" if i % 6 < 3 else "negative"])
    return path


def test_tiny_llama_search_on_a_user_csv_runs_through_ray_into_mlflow(tmp_path):
    import mlflow
    import ray

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    notes = []
    result = autopeft.search(task=str(_csv(tmp_path / "reviews.csv")), text_columns="review", label_column="sentiment",
                             budget="100%", backbone=TINY_LLAMA, space=str(space), trials=3,
                             tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", name="tiny-llama",
                             output_dir=tmp_path, training={"max_seq_length": 24}, progress=notes.append)
    ray.shutdown()
    # the space followed the backbone, once each: Llama has no biases; its first token sees only itself
    assert sum("bitfit left out of the search" in n for n in notes) == 1
    assert sum("pooling 'cls' left out of the search" in n for n in notes) == 1
    trained = [t for t in result.trials if t["status"] in ("finished", "stopped_early")]
    assert len(trained) == 3
    assert all(t["recipe"]["pooling"] != "cls" for t in trained)
    assert all(not any(c["method"] == "bitfit" for c in t["recipe"]["components"]) for t in trained)
    assert any({c["method"] for c in t["recipe"]["components"]} == {"lora"} for t in trained)  # start point 1
    assert any(c["method"] == "prefix_tuning" for t in trained for c in t["recipe"]["components"])  # 2, cls dropped
    assert any(t["rows"][-1]["examples_seen"] == 64 for t in trained)
    assert result.pareto, "no top-fidelity trial on the front"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autopeft")
    runs = client.search_runs([exp.experiment_id])
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(r.data.tags["trial_id"] for r in nested) == sorted(t["trial_id"] for t in result.trials)
    runs_by_id = {r.data.tags["trial_id"]: r for r in nested}
    for t in trained:  # each trained trial's run holds the score of its last rung
        assert runs_by_id[t["trial_id"]].data.metrics["score"] == pytest.approx(t["rows"][-1]["score"], abs=1e-9)
