"""The one-shot proposal step: a gated supernet on a tiny random BERT and a tiny local SST-2 folder."""

import pytest

from autopeft.searching.oneshot import OneShotResult, _supernet, propose
from autopeft.searching.space import SearchSpace
from autopeft.composition.recipe import count_recipe

#: Vocabulary of the bundled BERT-uncased tokenizer, which bare configs use.
SMALL_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 128}

SPACE = {
    "name": "oneshot-tiny",
    "components": {
        "lora": {"enabled": [True, False], "r": [4, 8], "target_modules": [["query", "value"]]},
        "adapter": {"enabled": [False, True], "placement": "parallel", "reduction_factor": [8, 16]},
        "prefix_tuning": {"enabled": [False, True], "num_virtual_tokens": [4, 8], "encoder_hidden_size": [8, 16]},
    },
    "gating": [False, True],
    "training": {"learning_rate": {"loguniform": [1.0e-3, 1.0e-2]}, "batch_size": 16},
    "start_points": [{"lora.enabled": True, "lora.r": 8, "training.learning_rate": 5.0e-3}],
}
BASE = {"backbone": SMALL_BERT, "task": "sst2",
        "training": {"max_train_examples": 512, "schedule_examples": 512, "max_seq_length": 32, "seed": 0}}
COMPONENTS = {"lora", "adapter", "prefix_tuning"}


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory):
    """``<dir>/sst2/{train,validation}.tsv`` with a learnable signal (good/bad words)."""
    root = tmp_path_factory.mktemp("glue")
    (root / "sst2").mkdir()
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "boring"]
    for split, n in (("train", 96), ("validation", 40)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            word = (good if label else bad)[(i // 2) % 4]
            rows.append(f"the film was {word} and the cast was {(good if label else bad)[(i // 3) % 4]}\t{label}")
        (root / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(root)


def count(space, point):
    return count_recipe(space.to_recipe(space.complete_point(point), BASE)).trainable_params


@pytest.fixture(scope="module")
def space():
    return SearchSpace.from_dict(SPACE)


@pytest.fixture(scope="module")
def generous(space, tiny_glue):
    logs = []
    return propose(space, BASE, 10_000, tiny_glue, examples=64, max_proposals=2, device="cpu", log=logs.append), logs


def test_importance_covers_every_component_in_unit_interval(generous):
    result, logs = generous
    assert isinstance(result, OneShotResult)
    assert set(result.importance) == COMPONENTS
    assert all(0.0 <= v <= 1.0 for v in result.importance.values())
    assert result.examples == 64 and result.wall_time_s > 0
    assert any("gate importance" in line for line in logs)


def test_proposals_are_within_budget_non_empty_and_ranked(space, generous):
    result, _ = generous
    assert 1 <= len(result.proposals) <= 2
    top = max(result.importance, key=result.importance.get)
    for point in result.proposals:
        space.complete_point(point)  # a valid start point
        assert 0 < count(space, point) <= 10_000
        assert space.to_recipe(space.complete_point(point), BASE).components
    assert result.proposals[0][f"{top}.enabled"] is True
    assert result.proposals[0]["gating"] is False  # a single component is proposed ungated
    assert result.proposals[0]["training.learning_rate"] == 5.0e-3  # the first start point's
    if len(result.proposals) == 2:
        assert result.proposals[1]["gating"] is True
        assert sum(result.proposals[1].get(f"{k}.enabled", False) for k in COMPONENTS) == 2
    signatures = {str(sorted(space.complete_point(p).items())) for p in result.proposals}
    assert len(signatures) == len(result.proposals)


def test_tight_budget_only_allows_the_smallest_component(space, tiny_glue, generous):
    singles = {k: count(space, {f"{k}.enabled": True}) for k in COMPONENTS}
    smallest = min(singles, key=singles.get)
    limit = singles[smallest]
    assert sorted(singles.values())[1] > limit  # the others do not fit, even at their cheapest
    result = propose(space, BASE, limit, tiny_glue, examples=64, max_proposals=2, device="cpu")
    assert result.proposals
    for point in result.proposals:
        assert 0 < count(space, point) <= limit
        assert [k for k in COMPONENTS if point.get(f"{k}.enabled")] == [smallest]


def test_same_seed_same_importance(space, tiny_glue, generous):
    again = propose(space, BASE, 10_000, tiny_glue, examples=64, max_proposals=2, device="cpu")
    assert again.importance == generous[0].importance
    assert again.proposals == generous[0].proposals


def test_supernet_drops_conflicting_and_ungated_components():
    sp = SearchSpace.from_dict({"components": {
        "lora": {"r": [4]}, "lora_again": {"method": "lora", "r": [8]}, "bitfit": {}, "adapter": {}}})
    logs = []
    keys, recipe, gates = _supernet(sp, BASE, ["lora", "lora_again", "bitfit", "adapter"], 64, {}, logs.append)
    assert keys == ["lora", "adapter"]
    assert recipe.gating and recipe.training.max_train_examples == 64
    assert all(gates[k] for k in keys)
    assert any("lora_again" in line and "claim" in line for line in logs)
    assert any("bitfit" in line and "gated" in line for line in logs)


def test_a_one_shot_search_tries_the_proposals_right_after_the_start_points(tmp_path, tiny_glue):
    """``search(one_shot=True)`` (``--one-shot``) end to end through Ray: the supernet's proposals are
    written to one_shot.json and are the search's next samples after the space's start point."""
    import json

    import yaml

    import autopeft

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({**SPACE, "fidelity": {"max_train_examples": 64, "min_train_examples": 32,
                                                                 "reduction_factor": 2}}))
    result = autopeft.search(task="sst2", budget="10000", backbone=SMALL_BERT, space=str(space_file), trials=3,
                             one_shot=True, data_dir=tiny_glue, output_dir=tmp_path / "runs", name="shot", seed=0,
                             tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", time_budget_s=900,
                             training={"max_seq_length": 32}, progress=None)
    shot = json.loads((result.path / "one_shot.json").read_text())
    assert set(shot["importance"]) == COMPONENTS and 1 <= len(shot["proposals"]) <= 2
    assert result.settings["one_shot"] is True
    sampled = [t for t in result.trials if t["status"] not in ("over_budget", "empty", "invalid")]
    # sample 0: the space's start point (LoRA r=8, lr 5e-3); then each proposal, in order
    assert sampled[0]["config"]["lora.r"] == 8 and sampled[0]["config"]["training.learning_rate"] == 5e-3
    for proposal, trial in zip(shot["proposals"], sampled[1:]):
        scalars = {k: v for k, v in proposal.items() if not isinstance(v, (list, dict))}
        assert {k: trial["config"][k] for k in scalars} == scalars, (proposal, trial["config"])
    assert len(result.pareto) >= 1 and all(t["status"] != "failed" for t in result.trials)


def test_importance_is_each_components_mean_gate_value(space, tiny_glue):
    """Gates set to known constants (``W_G = 0``, ``b = logit(v)``: every gate outputs ``v``) read back as
    each component's importance, so gates are attributed to the component that owns them."""
    import math

    import torch

    from autopeft.composition.gates import Gate
    from autopeft.composition.recipe import build_model
    from autopeft.searching.oneshot import _read_importance, _start_settings

    # candidates in another order than the space's (it used to drop lora as "dropped beside adapter")
    keys, recipe, gates = _supernet(space, BASE, sorted(COMPONENTS), 64, _start_settings(space), print)
    assert keys == list(SPACE["components"]) and all(gates[k] for k in keys)
    want = {"adapter": 0.2, "lora": 0.5, "prefix_tuning": 0.9}
    model = build_model(recipe)
    owner = {name: key for key, names in gates.items() for name in names}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Gate):
                module.proj.weight.zero_()
                module.proj.bias.fill_(math.log(want[owner[name]] / (1 - want[owner[name]])))
    got = _read_importance(model, recipe, gates, tiny_glue)
    assert got == pytest.approx(want, abs=1e-6)
