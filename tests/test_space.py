"""Search spaces: parsing, encoding of list choices, recipes from points, errors."""

import pytest

from autopeft.recipe import count_recipe
from autopeft.search.space import Dim, SearchSpace, SearchSpaceError

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
])
def test_bad_spaces_are_errors(data, msg):
    with pytest.raises(SearchSpaceError, match=msg):
        SearchSpace.from_dict(data)


def test_unknown_space_name_lists_shipped_spaces():
    with pytest.raises(SearchSpaceError, match="shipped: .*default"):
        SearchSpace.load("nonexistent")


def test_every_shipped_space_loads_and_its_start_points_build():
    from autopeft.search.space import SPACES_DIR

    for path in SPACES_DIR.glob("*.yaml"):
        space = SearchSpace.load(path)
        for point in space.start_points:
            space.to_recipe(space.complete_point(point), BASE)
