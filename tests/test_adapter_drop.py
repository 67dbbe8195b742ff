"""AdapterDrop (Rücklé et al., arXiv:2010.11918, section 3-4): fixed drop at inference, seeded robust drop in training."""

import random

import pytest
import torch

from autopeft.training.fusion import stage2_recipe
from autopeft.methods.adapter_drop import set_adapter_drop
from autopeft.composition.model import CompositionError, count_parameters
from autopeft.composition.recipe import RecipeError, build_model, recipe_from_dict
from autopeft.training.saved import save_trained
from conftest import TINY_BERT, tiny_inputs, tiny_recipe

L = TINY_BERT["num_hidden_layers"]
SERIAL = {"method": "adapter", "placement": "serial"}
HOULSBY = {"method": "adapter", "variant": "houlsby", "placement": "serial", "train_layernorm": False}


def randomize_trainable(model, seed=0, std=0.3):
    """Give every method parameter non-trivial values (adapters start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("backbone.classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, **kw):
    ids, mask = tiny_inputs()
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw)


def drawn(model, steps):
    """``k`` of each of ``steps`` training forward passes."""
    out = []
    for _ in range(steps):
        logits(model)
        out.append(model.extras["adapter_drop"].last_dropped)
    return out


def test_inference_drop_all_layers_equals_plain_backbone_and_none_equals_adapters():
    plain = build_model(tiny_recipe([])).eval()
    adapted = build_model(tiny_recipe([HOULSBY])).eval()
    randomize_trainable(adapted)
    dropped = build_model(tiny_recipe([HOULSBY, {"method": "adapter_drop", "n": L}])).eval()
    missing, unexpected = dropped.load_state_dict(adapted.state_dict(), strict=False)
    assert (missing, unexpected) == (["extras.adapter_drop._extra_state"], [])  # only AdapterDrop's own n
    base_out, adapter_out = logits(plain).logits, logits(adapted).logits
    assert not torch.allclose(base_out, adapter_out, atol=1e-3)  # the adapters do change the output
    assert torch.equal(logits(dropped).logits, base_out)
    set_adapter_drop(dropped, 0)
    assert torch.equal(logits(dropped).logits, adapter_out)
    assert dropped.extras["adapter_drop"].last_dropped == 0


def test_inference_drop_lowest_layer_only():
    """n=1: layer 0 computes the frozen backbone, layer 1 still runs its adapters."""
    plain = build_model(tiny_recipe([])).eval()
    model = build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": 1}])).eval()
    randomize_trainable(model)
    hs_plain = logits(plain, output_hidden_states=True).hidden_states
    hs = logits(model, output_hidden_states=True).hidden_states
    assert torch.equal(hs[1], hs_plain[1])
    assert not torch.allclose(hs[2], hs_plain[2], atol=1e-3)
    hosts = model.extras["adapter_drop"].hosts()
    assert [(layer, h.active) for layer, h in hosts] == [(0, False), (1, True)]


def test_fusion_layers_are_dropped_the_same_way(tmp_path):
    folders = []
    for i, task in enumerate(["sst2", "rte"]):
        r = recipe_from_dict({"backbone": TINY_BERT, "task": task, "components": [SERIAL], "training": {"seed": i}})
        m = build_model(r)
        randomize_trainable(m, seed=i)
        folders.append(save_trained(m, r, None, tmp_path / task))
    plain = build_model(tiny_recipe([])).eval()
    fusion = build_model(stage2_recipe(folders, "sst2")).eval()
    randomize_trainable(fusion, seed=5)
    dropped = build_model(stage2_recipe(folders, "sst2", {"components": [{"method": "adapter_drop", "n": L}]})).eval()
    missing, unexpected = dropped.load_state_dict(fusion.state_dict(), strict=False)
    assert (missing, unexpected) == (["extras.adapter_drop._extra_state"], [])
    assert torch.equal(logits(dropped).logits, logits(plain).logits)
    set_adapter_drop(dropped, 0)
    fused = logits(fusion).logits
    assert torch.equal(logits(dropped).logits, fused)
    assert not torch.allclose(fused, logits(plain).logits, atol=1e-3)


def test_robust_training_draws_vary_by_step_and_follow_the_seed():
    recipe = tiny_recipe([SERIAL, {"method": "adapter_drop", "n": L}], training={"seed": 7})
    model = build_model(recipe).train()
    controller = model.extras["adapter_drop"]
    seen = []
    for _ in range(12):
        logits(model)
        k = controller.last_dropped
        seen.append(k)
        assert [h.active for _, h in controller.hosts()] == [layer >= k for layer in range(L)]
    expected_rng = random.Random(7)
    assert seen == [expected_rng.randint(0, L) for _ in range(12)]
    assert set(seen) == set(range(L + 1))
    again = build_model(recipe).train()
    assert drawn(again, 12) == seen
    other = build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": L}], training={"seed": 8})).train()
    assert drawn(other, 12) != seen
    model.eval()  # inference: always the fixed n, no draw consumed
    draws = controller.draws
    logits(model)
    assert controller.last_dropped == L and controller.draws == draws


def test_dropped_adapters_get_no_gradient():
    wide = {**SERIAL, "bottleneck_size": 16}
    model = build_model(tiny_recipe([wide, {"method": "adapter_drop", "n": 1, "mode": "specialized"}])).train()
    randomize_trainable(model)
    ids, mask = tiny_inputs()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".serial." in n}
    assert all(g is None for n, g in grads.items() if ".layer.0." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layer.1." in n)


def test_modes_and_explicit_seed():
    spec = build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": 1, "mode": "specialized"}])).train()
    inf = build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": 1, "mode": "inference_only"}])).train()
    for _ in range(3):
        logits(spec), logits(inf)
        assert spec.extras["adapter_drop"].last_dropped == 1 and inf.extras["adapter_drop"].last_dropped == 0
    seeded = build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": 1, "max_train_drop": 2, "seed": 3}])).train()
    rng = random.Random(3)
    for _ in range(10):
        logits(seeded)
        assert seeded.extras["adapter_drop"].last_dropped == rng.randint(0, 2)


def test_adds_no_parameters():
    with_drop = count_parameters(build_model(tiny_recipe([SERIAL, {"method": "adapter_drop"}])))
    without = count_parameters(build_model(tiny_recipe([SERIAL])))
    assert with_drop == without and without.trainable_params > 0


def test_errors():
    with pytest.raises(CompositionError, match="no adapter"):
        build_model(tiny_recipe([{"method": "lora"}, {"method": "adapter_drop"}]))
    with pytest.raises(CompositionError, match="no adapter"):
        build_model(tiny_recipe([{"method": "adapter_drop"}, SERIAL]))  # must come after the adapters
    with pytest.raises(CompositionError, match="exceeds"):
        build_model(tiny_recipe([SERIAL, {"method": "adapter_drop", "n": L + 1}]))
    with pytest.raises(CompositionError, match="both claim"):
        build_model(tiny_recipe([SERIAL, {"method": "adapter_drop"}, {"method": "adapter_drop"}]))
    with pytest.raises(RecipeError, match="set n instead"):
        tiny_recipe([SERIAL, {"method": "adapter_drop", "layers": [0]}])
    model = build_model(tiny_recipe([SERIAL]))
    with pytest.raises(ValueError, match="no adapter_drop"):
        set_adapter_drop(model, 1)
