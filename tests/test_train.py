"""The trial loop on real SST-2 text with a small random BERT: determinism, rungs, memory, save/load."""

import torch

from autopeft.composition.recipe import recipe_from_dict
from autopeft.training.saved import load_trained, save_trained
from autopeft.training.scoring import evaluate
from autopeft.training.trainer import run_trial

SMALL_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 128}


def recipe(components, **training):
    t = {"max_train_examples": 96, "batch_size": 16, "max_eval_examples": 64, "max_seq_length": 32,
         "learning_rate": 5e-3, **training}
    return recipe_from_dict({"backbone": SMALL_BERT, "task": "sst2", "components": components, "training": t})


LORA = [{"method": "lora", "r": 4, "target_modules": ["query", "value"]}]


def test_same_seed_same_result_and_rungs_do_not_change_training(glue_dir):
    plain, m1 = run_trial(recipe(LORA), glue_dir)
    again, _ = run_trial(recipe(LORA), glue_dir)
    staged, m3 = run_trial(recipe(LORA), glue_dir, rungs=[32, 64])
    assert plain.score == again.score and plain.peak_memory_bytes == again.peak_memory_bytes
    assert [h["examples_seen"] for h in staged.history] == [32, 64, 96]
    assert staged.score == plain.score
    for (n, p), (_, q) in zip(m1.trainable_state_dict().items(), m3.trainable_state_dict().items()):
        assert torch.equal(p, q), n


def test_lower_rungs_score_the_seeded_sample_and_the_top_rung_all_of_it(glue_dir):
    """``training.rung_eval_examples``: a rung below the top scores that many seeded rows of the eval
    split (the same rows as evaluating the model on ``Split.sample`` directly), the top rung the whole
    split; training is unchanged, so the top score equals the run without rungs."""
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches

    plain, _ = run_trial(recipe(LORA), glue_dir)
    r = recipe(LORA, rung_eval_examples=24)
    staged, _ = run_trial(r, glue_dir, rungs=[48])
    _, half = run_trial(recipe(LORA, rung_eval_examples=24, max_train_examples=48, schedule_examples=96), glue_dir)
    assert [(h["examples_seen"], h["eval_examples"]) for h in staged.history] == [(48, 24), (96, 64)]
    assert staged.score == plain.score and staged.eval_examples == 64
    val = load_split(get_task("sst2"), "validation", glue_dir)
    first = type(val)(val.texts[:64], val.labels[:64])
    sample = first.sample(24, seed=0)
    assert sample.texts == first.sample(24, seed=0).texts and sample.texts != first.sample(24, seed=1).texts
    assert len(sample) == 24 and set(sample.texts) <= set(first.texts)
    b = Batches(sample, load_tokenizer(r.backbone), 32, torch.device("cpu"))
    assert staged.history[0]["accuracy"] == evaluate(half, get_task("sst2"), b, 128)["accuracy"]
    # a rung within one batch of the top ends at the top (batches of 16: 80 -> 96): scored as the top, on all 64
    edge, _ = run_trial(r, glue_dir, rungs=[90])
    assert [(h["examples_seen"], h["eval_examples"]) for h in edge.history] == [(96, 64), (96, 64)]


def test_training_changes_method_weights_but_not_the_backbone(glue_dir):
    from autopeft.composition.recipe import build_model

    fresh = build_model(recipe(LORA))
    _, trained = run_trial(recipe(LORA), glue_dir)
    new, old = trained.state_dict(), fresh.state_dict()
    frozen = [k for k in old if "lora_" not in k and "classifier" not in k]
    assert all(torch.equal(new[k], old[k]) for k in frozen)
    assert not torch.equal(new["backbone.bert.encoder.layer.0.attention.self.query.lora_B.weight"],
                           old["backbone.bert.encoder.layer.0.attention.self.query.lora_B.weight"])


def test_cpu_memory_account_is_deterministic_and_grows_with_batch(glue_dir):
    small, model = run_trial(recipe(LORA, batch_size=8, max_train_examples=16), glue_dir)
    large, _ = run_trial(recipe(LORA, batch_size=32, max_train_examples=64), glue_dir)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = params + 4 * trainable * 3  # + gradients + AdamW's two moments (float32)
    assert small.peak_memory_bytes > fixed  # plus tensors saved for backward
    assert large.peak_memory_bytes - fixed > 2 * (small.peak_memory_bytes - fixed)


def test_saved_weights_reload_to_the_same_score(glue_dir, tmp_path):
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches

    r = recipe(LORA + [{"method": "adapter", "reduction_factor": 8}])
    result, model = run_trial(r, glue_dir)
    save_trained(model, r, result, tmp_path)
    reloaded = load_trained(tmp_path)
    task = get_task("sst2")
    batches = Batches(load_split(task, "validation", glue_dir), load_tokenizer(r.backbone), 32, torch.device("cpu"))
    assert evaluate(reloaded, task, batches, 64, 64)["accuracy"] == result.score
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "recipe.yaml").exists()


def test_relative_data_dir_resolves_to_an_absolute_path(glue_dir, monkeypatch):
    from autopeft.data.tasks import resolve_data_dir

    monkeypatch.chdir(glue_dir.parent)
    assert resolve_data_dir("glue") == glue_dir.resolve()
