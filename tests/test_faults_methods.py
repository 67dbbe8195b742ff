"""Method-state faults, one section per kind, each checked for every method it can occur in:

1. merged LoRA-style wrappers refuse to train (forward in training mode, optimiser step, step hook);
2. everything that defines a trained adapter survives save_trained / load_trained (AdaLoRA's rank
   masks and schedule step, AdapterDrop's n, a pruned fusion, a prefix frozen to its table, gates
   of fused stage-1 adapters);
3. every loader returns a model in eval mode with deterministic outputs;
4. one UniPELT gate per gated component and layer, read from the layer's input;
5. BitFit's ``all`` is every bias of the backbone but the head (= peft's ``bias="all"``).
"""

import pytest
import torch

from autopeft.methods.adalora import adalora_modules, adalora_rank, rank_pattern
from autopeft.methods.lora import LinearWrapper, MergedAdapterError, merge_lora, unmerge_lora
from autopeft.composition.model import Gate, count_parameters
from autopeft.composition.recipe import build_model, count_recipe, recipe_from_dict
from autopeft.training.saved import load_trained, save_trained
from autopeft.composition.recipe import ADAPTER_FILE
from autopeft.training.trainer import make_optimizer
from conftest import TINY_BERT, tiny_inputs, tiny_recipe

D, L, FF = TINY_BERT["hidden_size"], TINY_BERT["num_hidden_layers"], TINY_BERT["intermediate_size"]
#: A tiny BERT with the vocabulary of the bundled BERT-uncased tokenizer (for run_trial on text).
SMALL_BERT = {**TINY_BERT, "vocab_size": 30522, "max_position_embeddings": 128}
LABELS = torch.tensor([0, 1, 1])


def perturb(model, seed=1, std=0.1):
    """Move every trainable tensor away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


def eval_logits(model, seed=0):
    ids, mask = tiny_inputs(seed=seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def train_loss(model, seed=0):
    ids, mask = tiny_inputs(seed=seed)
    return model(input_ids=ids, attention_mask=mask, labels=LABELS).loss


@pytest.fixture
def tiny_glue(tmp_path, monkeypatch):
    """``<dir>/sst2/{train,validation}.tsv`` with a learnable signal; token cache kept in tmp."""
    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path / "token-cache"))
    root = tmp_path / "glue"
    (root / "sst2").mkdir(parents=True)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "boring"]
    for split, n in (("train", 320), ("validation", 40)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = good if i % 2 else bad
            rows.append(f"the film was {words[(i // 2) % 4]} and the cast was {words[(i // 3) % 4]}\t{i % 2}")
        (root / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(root)


# ----- 1. merged wrappers refuse to train ---------------------------------------------------------
MERGEABLE = {
    "lora": {"method": "lora", "r": 2, "lora_dropout": 0.1},
    "lora_all_six": {"method": "lora", "r": 2, "target_modules": ["query", "key", "value", "attention_output",
                                                                  "ffn_in", "ffn_out"]},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10},
    "unipelt_lora": {"method": "unipelt", "gated": False, "num_virtual_tokens": 2},
}


@pytest.mark.parametrize("key", list(MERGEABLE))
def test_a_merged_model_refuses_a_training_forward_and_trains_again_after_unmerge(key):
    model = build_model(tiny_recipe([MERGEABLE[key]]))
    perturb(model)
    wrappers = [m for m in model.modules() if isinstance(m, LinearWrapper)]
    before = eval_logits(model.eval())
    assert merge_lora(model) == len(wrappers) > 0
    torch.testing.assert_close(eval_logits(model), before, atol=1e-5, rtol=0)  # inference: fine
    model.train()
    with torch.no_grad():  # training mode without gradients is not training either
        model(input_ids=tiny_inputs()[0])
    with pytest.raises(MergedAdapterError, match="is merged into its base weight.*unmerge_lora"):
        train_loss(model).backward()
    assert unmerge_lora(model) == len(wrappers)
    train_loss(model).backward()
    adapter = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert adapter and all(dict(model.named_parameters())[n].grad is not None for n in adapter)


def test_an_optimiser_step_on_a_merged_model_raises_and_leaves_every_weight_alone():
    model = build_model(tiny_recipe([MERGEABLE["lora"]])).train()
    perturb(model)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.1}]
    optimizer = make_optimizer(model, groups, 0.0, torch.device("cpu"))
    train_loss(model).backward()  # gradients taken unmerged ...
    merge_lora(model)  # ... then merged: a step would move A/B away from what was merged
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergedAdapterError, match="query is merged"):
        optimizer.step()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_adalora_step_hook_refuses_a_merged_model():
    model = build_model(tiny_recipe([MERGEABLE["adalora"]]))
    perturb(model)
    merge_lora(model)
    with pytest.raises(MergedAdapterError, match="unmerge_lora"):
        model.after_step(1)


# ----- 2. the whole trained adapter is saved and restored ----------------------------------------
def test_adalora_rank_allocation_survives_reload_and_further_training(tiny_glue, tmp_path):
    from autopeft.training.trainer import run_trial

    recipe = recipe_from_dict({"backbone": SMALL_BERT, "task": "sst2",
                               "components": [{"method": "adalora", "init_r": 12, "target_r": 8}],
                               "training": {"max_train_examples": 320, "batch_size": 32, "max_seq_length": 32}})
    _, trained = run_trial(recipe, tiny_glue, device="cpu")
    n = len(adalora_modules(trained))
    assert n == L * 6
    assert adalora_rank(trained) == 8 * n == 96  # bT after the 10-step schedule (b0 = 12 * 12 = 144)
    save_trained(trained, recipe, None, tmp_path / "out")
    reloaded = load_trained(tmp_path / "out")
    assert adalora_rank(reloaded) == 96
    assert rank_pattern(reloaded) == rank_pattern(trained)
    torch.testing.assert_close(eval_logits(reloaded), eval_logits(trained.eval()), atol=1e-6, rtol=0)
    # training on: the finished schedule keeps its allocation, pruned triplets stay exactly zero
    pattern = rank_pattern(reloaded)
    reloaded.train()
    reloaded.total_steps = 10  # what a training loop sets
    params = [p for p in reloaded.parameters() if p.requires_grad]
    optimizer = make_optimizer(reloaded, [{"params": params, "lr": 5e-2}], 0.0, torch.device("cpu"))
    for t in range(1, 4):
        train_loss(reloaded, seed=t).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reloaded.after_step(t)
    assert adalora_rank(reloaded) == 96 and rank_pattern(reloaded) == pattern
    for m in adalora_modules(reloaded).values():
        assert torch.all(m.lora_E[~m.rank_mask] == 0)


def test_an_adapter_file_without_method_state_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    recipe = tiny_recipe([MERGEABLE["adalora"]])
    model = build_model(recipe)
    perturb(model)
    save_trained(model, recipe, None, tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_FILE))
    old = {k: v for k, v in tensors.items() if k in model.trainable_state_dict()}  # the earlier format
    assert len(old) < len(tensors)
    save_file(old, str(tmp_path / ADAPTER_FILE))
    torch.testing.assert_close(eval_logits(load_trained(tmp_path)), eval_logits(model), atol=1e-6, rtol=0)


def test_adapter_drop_n_set_after_training_is_saved(tmp_path):
    from autopeft.methods.adapter_drop import set_adapter_drop

    recipe = tiny_recipe([{"method": "adapter", "placement": "serial"}, {"method": "adapter_drop", "n": 1}])
    model = build_model(recipe)
    perturb(model)
    set_adapter_drop(model, 2)
    before = eval_logits(model)
    save_trained(model, recipe, None, tmp_path)
    again = load_trained(tmp_path)
    assert again.extras["adapter_drop"].n == 2
    torch.testing.assert_close(eval_logits(again), before, atol=1e-6, rtol=0)


def test_a_prefix_frozen_to_its_table_reloads(tmp_path):
    recipe = tiny_recipe([{"method": "prefix_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 8}])
    model = build_model(recipe)
    perturb(model)
    model.extras["prefix_tuning_0"].freeze_to_table()
    before = eval_logits(model)
    save_trained(model, recipe, None, tmp_path)
    again = load_trained(tmp_path)
    assert not again.extras["prefix_tuning_0"].projection
    torch.testing.assert_close(eval_logits(again), before, atol=1e-6, rtol=0)


def _stage1(tmp_path, task, seed, gating=False):
    recipe = recipe_from_dict({"backbone": TINY_BERT, "task": task, "gating": gating, "training": {"seed": seed},
                               "components": [{"method": "adapter", "placement": "serial"}]})
    model = build_model(recipe)
    perturb(model, seed=seed, std=0.3)
    return save_trained(model, recipe, None, tmp_path / task), model


def test_a_pruned_fusion_reloads_pruned(tmp_path):
    from autopeft.training.fusion import stage2_recipe
    from autopeft.methods.adapter_fusion import fusion_hosts, prune_fusion_adapters

    folders = [_stage1(tmp_path, t, i)[0] for i, t in enumerate(["sst2", "rte", "cola"], 1)]
    recipe = stage2_recipe(folders, "sst2")
    model = build_model(recipe)
    perturb(model)
    assert prune_fusion_adapters(model, ["rte", "cola"]) == ["rte", "cola"]
    before = eval_logits(model)
    save_trained(model, recipe, None, tmp_path / "fused")
    again = load_trained(tmp_path / "fused")
    assert [list(h.serial) for _, _, h in fusion_hosts(again)] == [["rte", "cola"]] * L
    torch.testing.assert_close(eval_logits(again), before, atol=1e-6, rtol=0)


def test_gated_stage1_adapters_bring_their_trained_gates_into_the_fusion(tmp_path):
    from autopeft.training.fusion import stage2_recipe

    (a, ma), (b, mb) = _stage1(tmp_path, "sst2", 1, gating=True), _stage1(tmp_path, "rte", 2, gating=True)
    model = build_model(stage2_recipe([a, b], "sst2"))
    for layer in range(L):
        gates = model.encoder.layers[layer].peft_gates.gates
        assert sorted(gates) == ["adapter_fusion_0_rte", "adapter_fusion_0_sst2"]
        for name, src in (("sst2", ma), ("rte", mb)):
            own = src.encoder.layers[layer].peft_gates.gates["adapter_0"]
            assert torch.equal(gates[f"adapter_fusion_0_{name}"].proj.weight, own.proj.weight)
            assert not any(p.requires_grad for p in gates[f"adapter_fusion_0_{name}"].parameters())


# ----- 3. loaders return eval-mode models ---------------------------------------------------------
LOADED = {
    "p_tuning_v2": [{"method": "p_tuning_v2", "num_virtual_tokens": 3}],
    "prefix_tuning": [{"method": "prefix_tuning", "num_virtual_tokens": 3, "prefix_dropout": 0.1}],
    "p_tuning": [{"method": "p_tuning", "num_virtual_tokens": 3}],
    "lora_dropout": [{"method": "lora", "r": 2, "lora_dropout": 0.1}],
    "adapter": [{"method": "adapter", "reduction_factor": 8}],
    "adalora": [MERGEABLE["adalora"]],
    "unipelt": [{"method": "unipelt", "num_virtual_tokens": 3}],
    "adapter_drop_robust": [{"method": "adapter", "placement": "serial"}, {"method": "adapter_drop", "n": 1}],
}


@pytest.mark.parametrize("key", list(LOADED))
def test_load_trained_returns_every_module_in_eval_mode_with_repeatable_outputs(key, tmp_path):
    recipe = tiny_recipe(LOADED[key])
    model = build_model(recipe).train()  # saved from training mode, as after run_trial
    perturb(model)
    save_trained(model, recipe, None, tmp_path)
    again = load_trained(tmp_path)
    training = [n for n, m in again.named_modules() if m.training]
    assert training == []
    ids, mask = tiny_inputs()
    with torch.no_grad():
        first = again(input_ids=ids, attention_mask=mask).logits
        second = again(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, eval_logits(model.eval()), atol=1e-6, rtol=0)


def test_build_model_and_the_fusion_stage_loader_return_eval_mode(tmp_path):
    from autopeft.training.fusion import stage2_recipe

    folders = [_stage1(tmp_path, t, i)[0] for i, t in enumerate(["sst2", "rte"], 1)]
    for recipe in (tiny_recipe(LOADED["unipelt"]), stage2_recipe(folders, "rte")):
        model = build_model(recipe)
        assert [n for n, m in model.named_modules() if m.training] == []
        assert torch.equal(eval_logits(model), eval_logits(model))


# ----- 4. one gate per gated component and layer --------------------------------------------------
def gates_per_layer(model):
    return [sum(isinstance(m, Gate) for m in layer.modules()) for layer in model.encoder.layers]


def test_unipelt_has_three_gates_per_layer_on_the_meta_device():
    bert = {"preset": "bert-base"}
    recipe = recipe_from_dict({"backbone": bert, "components": [{"method": "unipelt"}]})
    model = build_model(recipe, device="meta")
    assert gates_per_layer(model) == [3] * 12
    assert sorted(model.encoder.layers[0].peft_gates.gates) == ["adapter_0", "lora_0", "prefix_tuning_0"]
    d, layers, p, h, r, m = 768, 12, 10, 64, 8, 48
    prefix = p * d + d * h + h + h * 2 * layers * d + 2 * layers * d
    lora = layers * 2 * r * 2 * d
    adapter = layers * (2 * d * m + m + d)
    gates = 3 * layers * (d + 1)
    assert count_parameters(model).trainable_params == prefix + lora + adapter + gates


COMBO = [  # four gated components (bitfit and p_tuning have nothing to gate)
    {"method": "lora", "r": 2, "target_modules": ["query", "value", "ffn_out"]},
    {"method": "adapter", "variant": "houlsby", "placement": "serial", "reduction_factor": 8},
    {"method": "prefix_tuning", "num_virtual_tokens": 2, "encoder_hidden_size": 8},
    {"method": "adalora", "init_r": 2, "target_r": 1, "total_step": 10, "target_modules": ["key", "ffn_in"]},
    {"method": "bitfit", "biases": ["attention_output"]},
    {"method": "p_tuning", "num_virtual_tokens": 2},
]


def test_gating_gives_each_component_one_gate_per_layer_shared_across_its_matrices():
    plain = count_parameters(build_model(tiny_recipe(COMBO)))
    model = build_model(tiny_recipe(COMBO, gating=True))
    assert gates_per_layer(model) == [4] * L
    assert count_parameters(model).trainable_params - plain.trainable_params == 4 * L * (D + 1)
    for layer in range(L):
        lora = [model.linear(layer, t).gate for t in ("query", "value", "ffn_out")]
        assert lora[0].module is lora[1].module is lora[2].module
        assert model.linear(layer, "key").gate.module is model.linear(layer, "ffn_in").gate.module
        houlsby = [model.sublayer(layer, w).serial["adapter"].gate.module for w in ("attention", "ffn")]
        assert houlsby[0] is houlsby[1]
        assert all(g.proj.in_features == D for g in model.encoder.layers[layer].peft_gates.gates.values())


def test_each_gate_reads_its_layers_input_once_per_forward():
    model = build_model(tiny_recipe(COMBO[:4], gating=True))
    seen, calls = {}, {}
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_pre_hook(lambda mod, args, kw, i=i: seen.__setitem__(("layer", i), args[0]),
                                        with_kwargs=True)
        for key, gate in layer.peft_gates.gates.items():
            def hook(mod, args, out, i=i, key=key):
                seen[(i, key)] = args[0]
                calls[(i, key)] = calls.get((i, key), 0) + 1
            gate.register_forward_hook(hook)
    eval_logits(model)
    assert sorted(calls) == sorted((i, k) for i in range(L) for k in ("adalora_3", "adapter_1", "lora_0", "prefix_tuning_2"))
    assert set(calls.values()) == {1}
    assert all(seen[(i, k)] is seen[("layer", i)] for i, k in calls)


def test_a_gated_model_saves_and_reloads_its_shared_gates(tmp_path):
    recipe = tiny_recipe(COMBO[:4], gating=True)
    model = build_model(recipe)
    perturb(model)
    save_trained(model, recipe, None, tmp_path)
    torch.testing.assert_close(eval_logits(load_trained(tmp_path)), eval_logits(model), atol=1e-6, rtol=0)


# ----- 5. BitFit's all ----------------------------------------------------------------------------
def _peft_bias_all(hf):
    """Bias parameters peft's ``bias="all"`` trains, task head excluded: {name: numel}."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=1, target_modules=["query"], bias="all"))
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.numel()
            for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias") and "classifier" not in n}


@pytest.mark.parametrize("preset,expected", [
    ("bert-base", 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 + 768),  # + embedding LayerNorm + pooler
    ("roberta-base", 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768),  # no pooler in RoBERTa's classifier model
])
def test_bitfit_all_trains_every_backbone_bias_like_peft(preset, expected):
    from autopeft.backbones import load_model

    count = count_recipe(recipe_from_dict({"backbone": {"preset": preset}, "components": [{"method": "bitfit"}]}))
    assert count.trainable_params == expected
    assert sum(_peft_bias_all(load_model({"preset": preset}, 2, device="meta")).values()) == expected


def test_bitfit_all_trains_exactly_peft_bias_all_names_and_subsets_are_named():
    from autopeft.backbones import load_model

    model = build_model(tiny_recipe([{"method": "bitfit"}]))
    ours = {n.removeprefix("backbone."): p.numel() for n, p in model.named_parameters()
            if p.requires_grad and not model.is_head_parameter(n)}
    assert ours == _peft_bias_all(load_model(TINY_BERT, 2))
    encoder = count_parameters(build_model(tiny_recipe([{"method": "bitfit", "biases": "encoder"}]))).trainable_params
    assert encoder == L * (7 * D + FF)
    named = build_model(tiny_recipe([{"method": "bitfit", "biases": ["embeddings", "pooler"]}]))
    assert count_parameters(named).trainable_params == 2 * D


def test_a_component_added_to_a_built_model_takes_the_models_mode():
    from autopeft.methods.base import parse_component

    model = build_model(tiny_recipe([]))  # eval
    model.add_component(parse_component({"method": "lora", "r": 2, "lora_dropout": 0.1}))
    assert [n for n, m in model.named_modules() if m.training] == []
    model.train()
    model.add_component(parse_component({"method": "adapter", "reduction_factor": 8}))
    assert all(m.training for m in model.modules())
