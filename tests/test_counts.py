"""Trainable-parameter counts equal their closed forms (meta-device backbones: no weights, no download)."""

import pytest

from autopeft.composition.recipe import count_recipe, recipe_from_dict

BERT = {"preset": "bert-base"}
ROBERTA = {"preset": "roberta-base"}
D, L, FF = 768, 12, 3072


def count(components, backbone=BERT, **kw):
    return count_recipe(recipe_from_dict({"backbone": backbone, "components": components, **kw}))


def test_lora_query_value_roberta_base():
    assert count([{"method": "lora", "r": 8, "target_modules": ["query", "value"]}], ROBERTA).trainable_params == 294_912


def test_lora_on_minilm_l6_is_73728():
    c = count([{"method": "lora", "r": 8, "target_modules": ["query", "value"]}], "minilm-l6")
    assert (c.trainable_params, c.backbone_params, c.head_params) == (73_728, 22_713_216, 770)


def test_lora_ffn_targets_use_their_own_shapes():
    c = count([{"method": "lora", "r": 4, "target_modules": ["ffn_in", "ffn_out"], "layers": [0, -1]}])
    assert c.trainable_params == 2 * 2 * 4 * (D + FF)


@pytest.mark.parametrize("variant,placement,sublayers,ln", [
    ("pfeiffer", "parallel", 1, 0), ("pfeiffer", "serial", 1, 0), ("houlsby", "serial", 2, 4 * D)])
def test_adapter_counts(variant, placement, sublayers, ln):
    m = D // 16
    c = count([{"method": "adapter", "variant": variant, "placement": placement, "reduction_factor": 16}])
    assert c.trainable_params == L * (sublayers * (2 * D * m + m + D) + ln)


def test_adapter_bottleneck_size_and_learned_scaling():
    c = count([{"method": "adapter", "bottleneck_size": 10, "scaling": "learned"}])
    assert c.trainable_params == L * (2 * D * 10 + 10 + D + 1)


def test_bitfit_all_and_subset():
    encoder = L * (4 * D + FF + D + 2 * D)  # per layer: q, k, v, attention_output, ffn_in, ffn_out, two LayerNorms
    model_level = D + D  # the embedding LayerNorm's bias and the pooler's
    assert count([{"method": "bitfit"}]).trainable_params == encoder + model_level == 102_912
    assert count([{"method": "bitfit", "biases": "encoder"}]).trainable_params == encoder == 101_376
    assert count([{"method": "bitfit", "biases": ["query", "ffn_in"]}]).trainable_params == L * (D + FF)


def test_prefix_tuning_mlp_count():
    p, h = 10, 64
    c = count([{"method": "prefix_tuning", "num_virtual_tokens": p, "encoder_hidden_size": h}])
    assert c.trainable_params == p * D + D * h + h + h * 2 * L * D + 2 * L * D


def test_gates_add_one_linear_to_1_per_component_and_layer():
    plain = count([{"method": "lora", "r": 8}]).trainable_params
    gated = count([{"method": "lora", "r": 8}], gating=True).trainable_params
    assert gated - plain == L * (D + 1)  # one gate per layer, shared by the wrapped query and value


def test_unipelt_is_the_sum_of_its_gated_parts():
    u = count([{"method": "unipelt"}]).trainable_params
    parts = count([{"method": "prefix_tuning", "num_virtual_tokens": 10, "encoder_hidden_size": 64},
                   {"method": "lora", "r": 8}, {"method": "adapter", "placement": "serial"}], gating=True)
    assert u == parts.trainable_params
    assert u == (10 * D + D * 64 + 64 + 64 * 2 * L * D + 2 * L * D) + L * (D + 1) \
        + (2 * L * 8 * 2 * D + L * (D + 1)) + L * (2 * D * 48 + 48 + D + D + 1)


def test_full_finetuning_trains_the_whole_backbone():
    c = count([{"method": "full_finetuning"}], "minilm-l6")
    assert c.trainable_params == c.backbone_params == 22_713_216


def test_the_methods_table_counts_are_the_methods_defaults_now():
    """experiments/methods_table.md is a measured table: when a method's defaults change, its row must be
    measured again (bitfit and unipelt had drifted: 25,344 and 524,008 there, 26,112 and 521,698 built)."""
    import json
    from pathlib import Path

    from autopeft.composition.recipe import count_recipe, recipe_from_dict

    rows = json.loads((Path(__file__).parents[1] / "experiments" / "methods_table.json").read_text())
    checked = 0
    for row in rows:
        if row["method"] == "adapter_fusion":  # its stage-one adapters are trained by the table's script
            continue
        comps = ([{"method": "adapter"}, {"method": "adapter_drop"}] if row["method"] == "adapter_drop"
                 else [{"method": row["method"]}])
        recipe = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2", "components": comps})
        assert count_recipe(recipe).trainable_params == row["trainable_params"], row["method"]
        checked += 1
    assert checked == len(rows) - 1 == 12
