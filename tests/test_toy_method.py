"""A method is one registration: a toy method defined here, in the test, is counted, trains, joins a
search space and is refused by the peft export with its own reason - no other file of autopeft knows it.

The toy is (IA)^3-like (Liu et al., arXiv:2205.05638): a learned scale on each output of the FFN's
first Linear, ``h = W x * s`` with ``s`` (d_ff,) starting at ``init``.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import Field
from torch import nn

from autopeft.methods import base
from autopeft.methods.base import MethodConfig, register
from conftest import TINY_BERT, tiny_recipe

TOY = "toy_scale"
WHY_NOT_PEFT = "peft has no toy scale (the test's own reason)"
WHY_NOT_MERGE = "the toy scale is kept apart on purpose (the test's own reason)"
#: TINY_BERT's shapes with a vocabulary the bundled tokenizer's ids fit.
SMALL_BERT = {**TINY_BERT, "vocab_size": 30522, "max_position_embeddings": 128}


class ToyScaleConfig(MethodConfig):
    """``init``: the scale's starting value; ``target``: the Linear whose outputs are scaled."""

    method: str = TOY
    init: float = Field(1.0, gt=0)
    target: str = "ffn_in"


class ToyScale(nn.Module):
    """``base(x) * scale``: x (..., d_in) -> (..., d_out); ``scale`` (d_out,) is the only new parameter."""

    def __init__(self, base_layer: nn.Linear, init: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.full((base_layer.out_features,), float(init), device=base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale


def apply_toy_scale(model, cfg: ToyScaleConfig) -> None:
    """Scale the outputs of ``cfg.target`` in every selected layer."""
    for layer in model.layers_of(cfg):
        model.wrap_linear(layer, cfg.target, lambda linear: ToyScale(linear, cfg.init))


@pytest.fixture
def toy(monkeypatch):
    """The toy method registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register(TOY, ToyScaleConfig, paper="arXiv:2205.05638", why_not_peft=WHY_NOT_PEFT, why_not_merge=WHY_NOT_MERGE,
             search_defaults={"init": [0.5, 1.0]})(apply_toy_scale)
    return TOY


def test_the_toy_method_is_counted(toy):
    from autopeft.composition.recipe import count_recipe

    head_only = count_recipe(tiny_recipe([]))
    counted = count_recipe(tiny_recipe([{"method": toy}]))
    assert counted.trainable_params - head_only.trainable_params == 2 * 37  # L x d_ff scales
    upper = count_recipe(tiny_recipe([{"method": toy, "layers": [1], "target": "ffn_out"}]))
    assert upper.trainable_params - head_only.trainable_params == 32  # one layer x d


def test_the_toy_method_trains_and_leaves_the_backbone_frozen(toy, tmp_path):
    from autopeft.composition.recipe import build_model, recipe_from_dict
    from autopeft.training.trainer import run_trial
    from autopeft.data.userdata import resolve_task

    path = tmp_path / "reviews.csv"
    labels = ["positive", "negative"] * 40
    pd.DataFrame({"review": [f"review {i} {'good' if s == 'positive' else 'bad'}" for i, s in enumerate(labels)],
                  "sentiment": labels}).to_csv(path, index=False)
    recipe = recipe_from_dict({"backbone": SMALL_BERT, "task": resolve_task(str(path), "review", "sentiment"),
                               "components": [{"method": toy, "init": 0.5}],
                               "training": {"max_train_examples": 32, "batch_size": 8, "max_seq_length": 16,
                                            "learning_rate": 1e-2}})
    fresh = build_model(recipe)
    result, model = run_trial(recipe, log=None)
    assert np.isfinite(result.score)
    new, old = model.state_dict(), fresh.state_dict()
    scales = [k for k in new if k.endswith(".scale")]
    assert len(scales) == 2 and all(not torch.equal(new[k], old[k]) for k in scales)
    frozen = [k for k in old if not k.endswith(".scale") and "classifier" not in k]
    assert all(torch.equal(new[k], old[k]) for k in frozen)


def test_the_toy_method_joins_a_search_space_with_its_defaults(toy):
    from autopeft.searching.space import SearchSpace

    space = SearchSpace.from_dict({"components": {"toy": {"method": toy}, "lora": {"r": [2, 4]}}})
    assert space.dims["toy.init"].values == (0.5, 1.0) and "toy.enabled" in space.dims
    point = {k: d.default() for k, d in space.tunable().items()}
    point.update({"toy.enabled": True, "lora.enabled": False, "toy.init": 0.5})
    recipe = space.to_recipe({k: space.tunable()[k].encode(v) for k, v in point.items()}, {"backbone": TINY_BERT})
    assert [(c.method, c.init) for c in recipe.components] == [(toy, 0.5)]
    own = SearchSpace.from_dict({"components": {"toy": {"method": toy, "init": 2.0}}})
    assert own.dims["toy.init"].values == (2.0,)  # the space's own setting wins over the method's default


def test_the_peft_export_refuses_the_toy_method_with_its_own_reason(toy):
    from autopeft.exporting.hf_export import ExportError, check_exportable

    recipe = tiny_recipe([{"method": toy}])
    with pytest.raises(ExportError, match=r"peft cannot hold this recipe: peft has no toy scale \(the test's own"):
        check_exportable(recipe, "peft", "the recipe")
    with pytest.raises(ExportError, match=r"cannot merge this recipe: the toy scale is kept apart on purpose"):
        check_exportable(recipe, "merged", "the recipe")
