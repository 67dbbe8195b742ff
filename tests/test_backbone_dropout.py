"""``training.backbone_dropout``: the frozen backbone's own dropout set for training (experiments/
gap_to_full_ft.md measures it as a lever), with every method family, and equal to a backbone whose
config has that dropout."""

import pytest
import torch

from autopeft.composition.recipe import RecipeError, build_model, recipe_from_dict
from autopeft.training.setup import set_backbone_dropout
from autopeft.training.trainer import run_trial
from conftest import TINY_BERT, tiny_inputs
from test_precision import CHECKPOINTED, SMALL_BERT, recipe


def _dropouts(module: torch.nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)]


#: Every method family; a method's own dropout is its own setting (P-Tuning v2's ``prefix_dropout`` is 0.1 by default).
FAMILIES = {**CHECKPOINTED, "p_tuning_v2": [{"method": "p_tuning_v2", "num_virtual_tokens": 4, "prefix_dropout": 0.0}]}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_backbone_dropout_is_set_and_training_forward_is_deterministic(name):
    r = recipe_from_dict({"backbone": TINY_BERT, "task": "sst2", "components": FAMILIES[name], "pooling": "mean"})
    plain = build_model(r.model_copy(update={"components": []}))
    model = build_model(r).train()
    # every dropout module the backbone has (embeddings, 2 x attention probs, 2 x 2 hidden, the head's), also
    # where a method wrapped the module holding it
    assert set_backbone_dropout(model, 0.0) == len(_dropouts(plain.backbone)) == 8
    ids, mask = tiny_inputs(batch=4, length=9)

    def logits(seed):
        torch.manual_seed(seed)
        return model(input_ids=ids, attention_mask=mask).logits

    torch.testing.assert_close(logits(0), logits(1), rtol=0, atol=0)  # nothing random is left
    assert set_backbone_dropout(model, 0.1) == 8
    assert not torch.equal(logits(0), logits(1))  # was: dropout at the config's 0.1
    assert set_backbone_dropout(model, None) == 0


def test_training_equals_a_backbone_configured_without_dropout(glue_dir, tmp_path):
    """``autopeft train`` of a recipe with ``backbone_dropout: 0.0`` (as a user runs it) trains the very
    weights of the same recipe on a backbone whose config has no dropout."""
    import yaml
    from typer.testing import CliRunner

    from autopeft.cli import app
    from autopeft.training.saved import load_trained

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(backbone_dropout=0.0).model_dump(mode="json")))
    res = CliRunner().invoke(app, ["train", "--recipe", str(path), "--data-dir", str(glue_dir), "-o", str(tmp_path / "off")])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "off" / "recipe.yaml").read_text())["training"]["backbone_dropout"] == 0.0
    off_model = load_trained(tmp_path / "off")
    config = {**SMALL_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ref, ref_model = run_trial(recipe(backbone=config), glue_dir)
    _, on_model = run_trial(recipe(), glue_dir)
    trained = {n: p for n, p in off_model.named_parameters() if p.requires_grad}
    assert trained
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[n], p, rtol=0, atol=0, msg=n)
    lora_a = "backbone.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert not torch.equal(dict(on_model.named_parameters())[lora_a], trained[lora_a])  # 0.1 trains otherwise
    assert f"{ref.score:.4f}" in res.output  # the same score as the reference printed


@pytest.mark.parametrize("bad", [1.0, -0.1, "half"])
def test_a_bad_backbone_dropout_is_refused(bad):
    with pytest.raises(RecipeError, match="backbone_dropout"):
        recipe(backbone_dropout=bad)
