"""Composition: conflicts, identity starts, gates, freezing, and save/reload for every method."""

import pytest
import torch

from autopeft.methods import available_methods
from autopeft.composition.model import CompositionError, ComposedModel, count_parameters
from autopeft.composition.recipe import RecipeError, build_model
from autopeft.training.saved import load_trained, save_trained
from conftest import TINY_BERT, TINY_ROBERTA, tiny_inputs, tiny_recipe

#: Small settings per method so that every method builds on the tiny backbones.
SMALL = {
    "bitfit": {}, "lora": {"r": 2}, "adalora": {"init_r": 4, "target_r": 2, "total_step": 10},
    "qlora": {"r": 2}, "adapter": {"reduction_factor": 8}, "prefix_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3}, "p_tuning_v2": {"num_virtual_tokens": 3},
    "mam": {"num_virtual_tokens": 3, "bottleneck_size": 8}, "unipelt": {"num_virtual_tokens": 3},
}


def logits(model, seed=0):
    ids, mask = tiny_inputs(seed=seed)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def perturb(model):
    """Move every trainable tensor away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("backbone", [TINY_BERT, TINY_ROBERTA], ids=["bert", "roberta"])
@pytest.mark.parametrize("method", [m for m in SMALL])
def test_every_method_saves_and_reloads_to_identical_logits(method, backbone, tmp_path):
    if method not in available_methods():
        pytest.skip(f"{method} not registered")
    recipe = tiny_recipe([{"method": method, **SMALL[method]}], backbone=backbone)
    model = build_model(recipe)
    perturb(model)
    before = logits(model)
    save_trained(model, recipe, None, tmp_path)
    again = load_trained(tmp_path)
    assert torch.allclose(logits(again), before, atol=1e-6)
    assert count_parameters(again) == count_parameters(model)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix_tuning"])
def test_zero_initialised_methods_start_as_the_backbone(method):
    base = build_model(tiny_recipe([]))
    model = build_model(tiny_recipe([{"method": method, **SMALL[method]}]))
    out = logits(model)
    if method == "prefix_tuning":  # a prefix changes attention from the start
        assert not torch.allclose(out, logits(base), atol=1e-4)
    else:
        assert torch.allclose(out, logits(base), atol=1e-6)


def test_only_method_parameters_and_head_are_trainable():
    model = build_model(tiny_recipe([{"method": "lora", "r": 2}]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or n.startswith("backbone.classifier") for n in names)


def test_two_components_on_the_same_slot_are_an_error():
    with pytest.raises(CompositionError, match="lora and lora both claim linear/0/query"):
        build_model(tiny_recipe([{"method": "lora"}, {"method": "lora", "r": 2}]))


def test_same_method_on_disjoint_slots_composes():
    model = build_model(tiny_recipe([{"method": "lora", "r": 2, "target_modules": ["query"]},
                                     {"method": "lora", "r": 4, "target_modules": ["value"], "layers": [1]}]))
    assert count_parameters(model).trainable_params == 2 * (2 * 2 * 32) + 4 * 2 * 32


def test_lora_adapter_prefix_combine_with_gates_and_gates_report_values():
    model = build_model(tiny_recipe([{"method": "lora", "r": 2}, {"method": "adapter", "reduction_factor": 8},
                                     {"method": "prefix_tuning", "num_virtual_tokens": 2}], gating=True))
    logits(model)
    gates = model.gate_values()
    assert len(gates) == 2 * (1 + 1 + 1)  # per layer: 1 LoRA (shared by query and value), 1 adapter, 1 prefix gate
    # each value is UniPELT's G = mean_t sigmoid(W_G x_t + b) on its layer's input x (eq. 1-3), batch mean
    from autopeft.composition.gates import Gate, LayerGates

    checked = 0
    for name, layer_gates in model.named_modules():
        if isinstance(layer_gates, LayerGates):
            x = layer_gates._input  # (B, T, d), the layer input the forward pass recorded
            for key, gate in layer_gates.gates.items():
                assert isinstance(gate, Gate)
                with torch.no_grad():
                    expected = float(torch.sigmoid(x @ gate.proj.weight.T + gate.proj.bias).mean(dim=1).mean())
                assert gates[f"{name}.gates.{key}"] == pytest.approx(expected, abs=1e-6)
                checked += 1
    assert checked == len(gates)


def test_a_gate_scales_its_component_off_and_on():
    """UniPELT's h' = h + G * delta(h) (arXiv:2110.07577 eq. 1-3): with W_G = 0 and b = -30 (G ~ 1e-13)
    trained LoRA and adapter components leave the backbone's logits as they are; with b = +30 (G = 1)
    the logits are those of the same components ungated."""
    from autopeft.composition.gates import Gate

    comps = [{"method": "lora", "r": 2}, {"method": "adapter", "reduction_factor": 8}]
    gated, ungated, bare = (build_model(tiny_recipe(c, gating=g)) for c, g in ((comps, True), (comps, False), ([], False)))
    perturb(gated)
    for other in (ungated, bare):  # the same trained components and head; no gates / no components
        other.load_state_dict(gated.state_dict(), strict=False)
    assert not torch.allclose(logits(gated), logits(bare), atol=1e-3)  # the components matter

    def set_gates(bias: float) -> torch.Tensor:
        for module in gated.modules():
            if isinstance(module, Gate):
                with torch.no_grad():
                    module.proj.weight.zero_()
                    module.proj.bias.fill_(bias)
        return logits(gated)

    assert torch.allclose(set_gates(-30.0), logits(bare), atol=1e-5)
    assert torch.allclose(set_gates(30.0), logits(ungated), atol=1e-5)


def test_unknown_method_and_bad_hyperparameters_are_one_line_recipe_errors():
    with pytest.raises(RecipeError, match="unknown method 'loraa'; valid: bitfit"):
        tiny_recipe([{"method": "loraa"}])
    with pytest.raises(RecipeError, match=r"components: \[0\] lora.r: Input should be greater than or equal to 1"):
        tiny_recipe([{"method": "lora", "r": 0}])
    with pytest.raises(RecipeError, match="unknown target module 'qq'"):
        tiny_recipe([{"method": "lora", "target_modules": ["qq"]}])
    with pytest.raises(RecipeError, match="Extra inputs"):
        tiny_recipe([{"method": "lora", "rank": 8}])


def test_layer_out_of_range_is_a_composition_error():
    with pytest.raises(CompositionError, match="layer index 5 out of range"):
        build_model(tiny_recipe([{"method": "lora", "layers": [5]}]))


def test_composed_model_rejects_non_bert_family():
    with pytest.raises(ValueError, match="not supported"):
        ComposedModel(torch.nn.Linear(2, 2))


def test_the_old_name_peft_model_still_imports_with_a_deprecation_warning():
    import autopeft.composition.model as model_module

    with pytest.warns(DeprecationWarning, match="now ComposedModel"):
        assert model_module.PeftModel is ComposedModel
    with pytest.raises(AttributeError, match="no attribute 'PeftModle'"):
        model_module.PeftModle


def test_gated_lora_on_the_ffn_output_reads_the_layer_input():
    model = build_model(tiny_recipe([{"method": "lora", "r": 2, "target_modules": ["ffn_out"]}], gating=True))
    assert model.linear(0, "ffn_out").gate.module.proj.in_features == 32  # d, not d_ff: the layer's input
    assert logits(model).shape == (3, 2)


def test_lora_over_a_quantised_base_refuses_to_merge():
    from autopeft.methods.lora import merge_lora

    model = build_model(tiny_recipe([{"method": "lora", "r": 2}], quantization="nf4"))
    with pytest.raises(RuntimeError, match="cannot merge into a .* dequantise it first"):
        merge_lora(model)


@pytest.mark.parametrize("component", [{"method": "lora", "r": 2}, {"method": "adalora", "init_r": 4, "target_r": 2,
                                                                        "total_step": 10}], ids=["lora", "adalora"])
def test_merged_weight_is_the_one_merge_formula(component):
    """``merged_weight`` is ``W0 + Delta W`` and leaves the base as it is; ``merge`` writes exactly it."""
    from autopeft.methods.lora import LinearWrapper

    model = build_model(tiny_recipe([component]))
    perturb(model)
    wrapper = next(m for m in model.modules() if isinstance(m, LinearWrapper))
    w0 = wrapper.base_layer.weight.detach().clone()
    merged = wrapper.merged_weight()
    assert torch.equal(merged, w0 + wrapper.delta_weight().detach())
    assert not torch.equal(merged, w0) and torch.equal(wrapper.base_layer.weight, w0)
    wrapper.merge()
    assert torch.equal(wrapper.base_layer.weight, merged)
    assert torch.equal(wrapper.merged_weight(), merged)  # merged already: the base weight is the sum (not W0 + 2 dW)


def test_merged_weight_of_a_bf16_base_adds_in_float32_and_rounds_once():
    from autopeft.methods.lora import LinearWrapper

    model = build_model(tiny_recipe([{"method": "lora", "r": 2}]))
    perturb(model)
    wrapper = next(m for m in model.modules() if isinstance(m, LinearWrapper))
    wrapper.base_layer.weight.data = wrapper.base_layer.weight.data.to(torch.bfloat16)
    exact = wrapper.base_layer.weight.float() + wrapper.delta_weight().detach().float()
    assert torch.equal(wrapper.merged_weight(torch.float32), exact)
    assert torch.equal(wrapper.merged_weight(), exact.to(torch.bfloat16))


def test_a_non_finite_update_neither_merges_nor_exports_merged(tmp_path):
    from autopeft.exporting.hf_export import ExportError, _write_merged
    from autopeft.methods.lora import LinearWrapper

    recipe = tiny_recipe([{"method": "lora", "r": 2}])
    model = build_model(recipe)
    wrapper = next(m for m in model.modules() if isinstance(m, LinearWrapper))
    with torch.no_grad():
        wrapper.lora_B.weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="non-finite weights; the adapter is left unmerged"):
        wrapper.merge()
    assert not wrapper.merged and torch.isfinite(wrapper.base_layer.weight).all()
    with pytest.raises(ExportError, match=r"^bert\.encoder\.layer\.0\.\S+: merging LoraLinear gave non-finite weights$"):
        _write_merged(model, recipe, tmp_path / "merged")


def test_loading_a_recipe_file_checks_the_composition(tmp_path):
    from autopeft.composition.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("backbone: {preset: bert-base}\ncomponents: [{method: mam}, {method: prefix_tuning}]\n")
    with pytest.raises(RecipeError, match="prefix_tuning and mam both claim prefix/0"):
        load_recipe(path)
