"""Search spaces: parsing, encoding of list choices, recipes from points, errors."""

import pytest

from autopeft.composition.recipe import count_recipe
from autopeft.searching.space import Dim, SearchSpace, SearchSpaceError

BASE = {"backbone": "minilm-l6", "task": "sst2", "training": {"seed": 0}}


def test_default_space_rungs_and_start_points_fit_the_budget():
    space = SearchSpace.load("default")
    assert space.fidelity.rungs() == [2688, 8064, 24000]
    limit = int(0.005 * 22_713_216)
    for point in space.start_points:
        recipe = space.to_recipe(space.complete_point(point), BASE)
        assert recipe.components and count_recipe(recipe).trainable_params <= limit


def test_list_choices_travel_as_json_and_decode_back():
    space = SearchSpace.from_dict({"components": {"lora": {"enabled": [True], "target_modules": [["query"], ["query", "value"]]}}})
    dim = space.dims["lora.target_modules"]
    assert dim.encoded and dim.encode(["query", "value"]) == '["query", "value"]'
    recipe = space.to_recipe({"lora.target_modules": '["query", "value"]'}, BASE)
    assert recipe.components[0].target_modules == ["query", "value"]


def test_disabled_components_and_training_dims():
    space = SearchSpace.from_dict({"components": {"lora": {}, "bitfit": {}},
                                   "training": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    recipe = space.to_recipe({"lora.enabled": False, "bitfit.enabled": True, "training.learning_rate": 0.002}, BASE)
    assert [c.method for c in recipe.components] == ["bitfit"] and recipe.training.learning_rate == 0.002


@pytest.mark.parametrize("name,where", [("max_train_examples", "--max-train-examples"),
                                        ("schedule_examples", "top fidelity"), ("seed", "--seed"),
                                        ("max_eval_examples", "max_eval_examples"),
                                        ("rung_eval_examples", "--rung-eval-examples")])
def test_settings_every_trial_shares_are_refused_in_a_space(name, where):
    """A space that searched (or fixed) training.rung_eval_examples made trials score their lower rungs on
    different examples, and the search's own settings still named its default: the scheduler compared
    trials on different footing. Every setting all trials must share is refused, with where it is set."""
    with pytest.raises(SearchSpaceError) as err:
        SearchSpace.from_dict({"components": {"lora": {}}, "training": {name: [100, 500]}})
    msg = str(err.value)
    assert msg.startswith(f"training.{name} is a setting of the whole search, not of a trial") and where in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec,kind", [([1, 2], "choice"), (3, "fixed"), ([4], "fixed"), ({"int": [1, 4]}, "int"),
                                       ({"loguniform": [1e-4, 1e-2]}, "loguniform"), ({"choice": [[1], [2]]}, "choice")])
def test_dim_forms(spec, kind):
    assert Dim.parse("x", spec).kind == kind


@pytest.mark.parametrize("data,msg", [
    ({"components": {"nope": {}}}, "unknown method 'nope'"),
    ({"components": {"lora": {"rank": [4]}}}, "lora has no parameter 'rank'"),
    ({"components": {"lora": {"r": {"int": [8, 4]}}}}, "low < high"),
    ({"components": {"lora": {}}, "start_points": [{"lora.rr": 1}]}, "unknown dimensions"),
    ({}, "needs a 'components'"),
    # a misspelt key was ignored: the search ran without its start points
    ({"components": {"lora": {}}, "start_point": [{"lora.r": 8}]}, "has no key 'start_point'; valid: name, components"),
    ({"components": {"lora": {}}, "per_layer": {"num_layer": 6}}, "per_layer is a mapping of num_layers and choices"),
    # a recipe given as a space (was: AttributeError: 'list' object has no attribute 'items')
    ({"task": "rte", "components": [{"method": "lora", "r": 8}]}, "maps names to parameter ranges, not a list"),
    # a scalar was said to be "not a list"
    ({"components": 5}, "'components' maps names to parameter ranges, got int 5$"),
    ({"components": {"lora": [4, 8]}}, "component 'lora': its parameters must be a mapping"),
    ({"components": {"adapter": {"reduction_factor": [16, 32]}}, "start_points": [{"adapter.reduction_factor": 4}]},
     r"start point adapter.reduction_factor=4 is not one of the space's choices \(16, 32\)"),
    ({"components": {"lora": {}}, "training": {"learning_rate": {"loguniform": [1e-4, 1e-2]}},
      "start_points": [{"training.learning_rate": 0.5}]}, r"start point training.learning_rate=0.5 is outside"),
])
def test_bad_spaces_are_errors(data, msg):
    with pytest.raises(SearchSpaceError, match=msg):
        SearchSpace.from_dict(data)


L = {"lora": {}}


@pytest.mark.parametrize("data,msg", [
    # a value its setting cannot take: every sampled point was an invalid recipe, the search stopped
    # with "no configuration ... is a valid recipe", naming neither key nor value
    ({"components": {"lora": {"r": "eight"}}}, r"^lora\.r: 'eight' is not a valid value \(Input should be a valid integer"),
    ({"components": {"lora": {"r": [8, -1]}}}, r"^lora\.r: -1 is not a valid value"),
    ({"components": L, "training": {"learning_rate": "abc"}}, r"^training\.learning_rate: 'abc' is not a valid value"),
    ({"components": L, "training": {"warmup_ratio": {"uniform": [0.0, 1.5]}}}, r"^training\.warmup_ratio: 1\.5 is not"),
    ({"components": L, "pooling": ["mean", "max"]}, r"^pooling: 'max' is not a valid value"),
    ({"components": L, "gating": "yes"}, r"^gating: 'yes' is not true or false$"),
    ({"components": {"lora": {"enabled": ["yes", False]}}}, r"^lora\.enabled: 'yes' is not true or false$"),
    # malformed dimensions and sections (were: TypeError / AttributeError tracebacks)
    ({"components": {"lora": {"r": {"choice": 5}}}}, r"^lora\.r: choice needs a list of values, got 5$"),
    ({"components": L, "training": {"learning_rate": {"loguniform": [1e-4, "x"]}}}, "two numbers with low < high"),
    ({"components": {"lora": {"r": {"int": [1.5, 4]}}}}, r"^lora\.r: int needs whole-number bounds"),
    ({"components": L, "start_points": {"lora.r": 8}}, r"'start_points' is a list of mappings, got \{'lora\.r': 8\}"),
    ({"components": L, "start_points": 5}, "'start_points' is a list of mappings, got 5"),
    ({"components": L, "training": 5}, "'training' is a mapping of training settings, got 5"),
    ({"components": L, "one_of": {"g": "lora"}}, r"^one_of\.g is a list of components, got 'lora'$"),
    ({"components": L, "one_of": {"g": [["lora"]]}}, r"^one_of\.g is a list of components, got \[\['lora'\]\]$"),
    ({"components": L, "per_layer": {"num_layers": "six"}}, r"^per_layer needs num_layers, a whole number >= 1, got 'six'$"),
    ({"components": L, "per_layer": {"num_layers": 2.5}}, r"^per_layer needs num_layers, a whole number >= 1, got 2\.5$"),
    ({"components": L, "name": [1]}, r"^a search space's 'name' is a non-empty string, got \[1\]$"),
    # fidelities the rungs cannot use: the search looped forever before its first trial, printing nothing
    ({"components": L, "fidelity": {"reduction_factor": 1}}, r"^fidelity\.reduction_factor must be a whole number >= 2, got 1$"),
    ({"components": L, "fidelity": {"min_train_examples": 0}}, r"^fidelity\.min_train_examples must be a positive"),
    ({"components": L, "fidelity": {"max_train_examples": "x"}}, r"^fidelity\.max_train_examples must be a positive"),
    ({"components": L, "fidelity": {"min_train_examples": 500, "max_train_examples": 100}},
     r"^fidelity\.min_train_examples \(500\) is above max_train_examples \(100\)$"),
])
def test_bad_values_are_one_line_errors_naming_key_and_value(data, msg):
    with pytest.raises(SearchSpaceError, match=msg):
        SearchSpace.from_dict(data)


def test_the_values_a_space_can_take_are_checked_but_a_component_never_on_may_hold_placeholders():
    ok = SearchSpace.from_dict({"components": {"lora": {"r": ["8", 16]}, "adapter_fusion": {"enabled": False, "adapters": []}},
                                "training": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    assert ok.dims["lora.r"].values == ("8", 16)  # lax as the recipe is: "8" becomes r=8 there
    with pytest.raises(SearchSpaceError, match=r"^adapter_fusion\.adapters: \[\] is not a valid value"):
        SearchSpace.from_dict({"components": {"adapter_fusion": {"enabled": [True, False], "adapters": []}}})


def test_a_reduction_factor_of_one_is_a_one_line_cli_error_not_a_hang(tmp_path):
    from typer.testing import CliRunner

    from autopeft.cli import app

    space = tmp_path / "s.yaml"
    space.write_text("components: {lora: {}}\nfidelity: {reduction_factor: 1}\n")
    res = CliRunner().invoke(app, ["search", "--space", str(space), "--output-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and res.output.strip() == "error: fidelity.reduction_factor must be a whole number >= 2, got 1"


def test_a_space_file_naming_one_key_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: the search would have run over r in [16] only."""
    path = tmp_path / "s.yaml"
    path.write_text("components:\n  lora:\n    r: [4, 8]\n    r: [16]\n")
    with pytest.raises(SearchSpaceError, match=r"key 'r' appears twice in one mapping \(line 4\)"):
        SearchSpace.load(str(path))
    path.write_text("components:\n  lora: &b {r: [4, 8]}\n  ffn: {<<: *b, method: lora, r: [16]}\n")  # merge keys may
    assert SearchSpace.load(str(path)).dims["ffn.r"].values == (16,)  # be overridden: that is not a repeated key


def test_unknown_space_name_lists_shipped_spaces():
    with pytest.raises(SearchSpaceError, match="shipped: .*default"):
        SearchSpace.load("nonexistent")


def test_every_shipped_space_loads_and_its_start_points_build():
    from autopeft.searching.space import shipped_spaces

    from autopeft.composition.recipe import count_recipe

    assert {"default", "full", "autopeft_paper"} <= set(shipped_spaces())
    built = {}
    for name in shipped_spaces():
        space = SearchSpace.load(name)
        for point in space.start_points:
            r = space.to_recipe(space.complete_point(point), BASE)
            built.setdefault(name, []).append(([c.method for c in r.components], count_recipe(r).trainable_params,
                                               r.pooling, r.training.learning_rate))
    # MiniLM-L6: 6 layers, d = 384, d_ff = 1,536. The default space's start points (its docstring):
    lora_ffn = 6 * 2 * 4 * (384 + 1536)  # LoRA r=4 on ffn_in and ffn_out: 92,160
    adapter_ffn = 6 * (2 * 384 * 12 + 12 + 384)  # parallel FFN adapter, bottleneck 384/32 = 12: 57,672
    lora_qv = 6 * 2 * 8 * (384 + 384)  # LoRA r=8 on W_q and W_v: 73,728
    assert built["default"] == [(["lora"], lora_ffn, "mean", 3e-3), (["adapter"], adapter_ffn, "mean", 5e-3),
                                (["lora"], lora_qv, "mean", 1.5e-3)]
    assert built["autopeft_paper"] == [(["adapter"], adapter_ffn, "pooler", 3e-3)]  # bottleneck 12
    assert [b[0] for b in built["full"]] == [["lora"], ["unipelt"], ["mam"]] and built["full"][0][1] == lora_qv


def test_component_aliases_give_two_differently_placed_adapters():
    space = SearchSpace.load("autopeft_paper")
    point = {**space.complete_point({}), "serial_adapter.enabled": True, "serial_adapter.bottleneck_size": 3,
             "parallel_adapter.enabled": True, "parallel_adapter.bottleneck_size": 12, "layer.0": False}
    recipe = space.to_recipe(point, BASE)
    got = [(c.method, c.placement, c.bottleneck_size, c.layers) for c in recipe.components]
    assert got == [("adapter", "serial", 3, [1, 2, 3, 4, 5]), ("adapter", "parallel", 12, [1, 2, 3, 4, 5])]
    d = 384
    assert count_recipe(recipe).trainable_params == 5 * ((2 * d * 3 + 3 + d) + (2 * d * 12 + 12 + d))


def test_one_of_groups_switch_exactly_one_member_on():
    space = SearchSpace.load("full")
    assert "lora.enabled" not in space.dims and space.dims["one_of.lowrank"].values == ("none", "lora", "adalora", "qlora")
    recipe = space.to_recipe({**space.complete_point({}), "one_of.lowrank": "adalora", "one_of.prefix": "mam"}, BASE)
    assert [c.method for c in recipe.components] == ["adalora", "mam"]


def test_adapter_drop_is_left_out_without_adapters_and_quantization_is_a_dimension():
    space = SearchSpace.load("full")
    point = {**space.complete_point({}), "adapter_drop.enabled": True, "quantization": "nf4"}
    assert space.to_recipe(point, BASE).components == [] and space.to_recipe(point, BASE).quantization == "nf4"
    point["adapter.enabled"] = True
    assert [c.method for c in space.to_recipe(point, BASE).components] == ["adapter", "adapter_drop"]


def test_every_method_is_reachable_in_the_full_space():
    from autopeft.methods import CANONICAL_METHODS

    space = SearchSpace.load("full")
    assert set(CANONICAL_METHODS) <= set(space.component_methods.values())


def test_the_users_training_settings_win_over_the_spaces_own():
    """``--batch-size 16`` did nothing: every shipped space fixes ``training.batch_size: 32``, and the
    space's values were applied over the user's. Now the user's setting replaces the dimension, fixed or
    searched, and the start points' values for it."""
    from autopeft.searching.space import SearchSpace

    sp = SearchSpace.load("default")
    assert sp.dims["training.batch_size"].values == (32,)
    fixed, notes = sp.with_training({"batch_size": 16, "learning_rate": 1e-3, "precision": "fp32"})
    assert fixed.dims["training.batch_size"].values == (16,) and fixed.dims["training.learning_rate"].kind == "fixed"
    assert notes == ["training.learning_rate fixed at 0.001 (your setting) instead of searched over [0.0015, 0.005]"]
    assert all("training.learning_rate" not in p for p in fixed.start_points) and len(fixed.start_points) == 3
    base = {"backbone": {"preset": "minilm-l6"}, "task": "sst2",
            "training": {"batch_size": 16, "learning_rate": 1e-3}}
    recipe = fixed.to_recipe(fixed.complete_point(fixed.start_points[0]), base)
    assert (recipe.training.batch_size, recipe.training.learning_rate) == (16, 1e-3)
    assert sp.to_recipe(sp.complete_point(sp.start_points[0]), base).training.batch_size == 32  # the old behaviour
    assert sp.with_training({}) == (sp, [])
