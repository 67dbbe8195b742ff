"""AdapterFusion (Pfeiffer et al., arXiv:2005.00247, eq. 3-6): fusion maths, stage 1 -> 2, persistence."""

import pytest
import torch
from safetensors.torch import load_file

from autopeft.training.fusion import stage1_recipe, stage2_recipe, train_adapters, train_fusion
from autopeft.methods.adapter_fusion import (
    AdapterFusionLayer, fusion_attention, fusion_hosts, prune_fusion_adapters,
)
from autopeft.composition.model import CompositionError, count_parameters
from autopeft.composition.recipe import build_model, recipe_from_dict
from autopeft.training.saved import load_trained, save_trained
from autopeft.composition.recipe import ADAPTER_FILE
from autopeft.training.trainer import run_trial
from conftest import TINY_BERT, tiny_inputs

D, L = TINY_BERT["hidden_size"], TINY_BERT["num_hidden_layers"]
SERIAL = {"method": "adapter", "placement": "serial"}


def make_stage1(tmp_path, task, seed, adapter=SERIAL, backbone=TINY_BERT, std=0.3):
    """A stage-1 folder as save_trained writes it, with random (non-identity) adapter weights."""
    recipe = recipe_from_dict({"backbone": backbone, "task": task, "components": [adapter],
                               "training": {"seed": seed}})
    model = build_model(recipe)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_trained(model, recipe, None, tmp_path / task)


@pytest.fixture
def folders(tmp_path):
    return [make_stage1(tmp_path, "sst2", 1), make_stage1(tmp_path, "rte", 2), make_stage1(tmp_path, "cola", 3)]


def randomize_fusion(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, host in fusion_hosts(model):
            for p in host.fusion.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


# ----- the fusion layer, eq. 3-6 ------------------------------------------------------------------
def _adapters(n, d, seed=0):
    torch.manual_seed(seed)
    mods = [torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh()) for _ in range(n)]
    return mods


def test_identity_value_and_uniform_attention_give_mean_of_adapter_outputs():
    fusion = AdapterFusionLayer(D, value_init_noise=0.0)
    assert torch.equal(fusion.value.weight, torch.eye(D))
    with torch.no_grad():
        fusion.query.weight.zero_()  # q = 0 -> every score 0 -> softmax uniform
    adapters = _adapters(3, D)
    h = torch.randn(2, 5, D)
    out = fusion(h, torch.randn(2, 5, D), adapters)
    expected = torch.stack([a(h) for a in adapters]).mean(0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fusion.last_weights, torch.full((3,), 1 / 3))


def test_fusion_matches_hand_computed_eq_3_to_6():
    torch.manual_seed(1)
    fusion = AdapterFusionLayer(D)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    adapters = _adapters(4, D, seed=2)
    h = torch.randn(2, 3, D)
    out = fusion(h, h, adapters)
    Q, bq = fusion.query.weight, fusion.query.bias
    K, bk = fusion.key.weight, fusion.key.bias
    V = fusion.value.weight
    ref = torch.empty_like(out)
    for b in range(2):
        for t in range(3):
            q = Q @ h[b, t] + bq
            zs = [a(h[b, t]) for a in adapters]
            scores = torch.stack([q @ (K @ z + bk) for z in zs])  # eq. 3 before the softmax
            s = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            ref[b, t] = sum(s[n] * (V @ zs[n]) for n in range(4))  # eq. 4-6
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, torch.stack([a(h) for a in adapters]).mean(0), atol=1e-3)


def test_value_initialised_to_identity_with_small_noise():
    torch.manual_seed(0)
    fusion = AdapterFusionLayer(D, value_init_noise=1e-3)
    diff = fusion.value.weight - torch.eye(D)
    assert 0 < diff.abs().max() < 1e-2
    assert fusion.value.bias is None
    assert fusion.query.bias.abs().sum() == 0 and 0.01 < fusion.query.weight.std() < 0.03


# ----- stage 1 -> stage 2 ----------------------------------------------------------------------------
def test_stage2_loads_the_saved_adapters_frozen_and_identical(folders):
    model = build_model(stage2_recipe(folders, "mrpc"))
    hosts = fusion_hosts(model)
    assert [(layer, which) for layer, which, _ in hosts] == [(i, "ffn") for i in range(L)]
    for folder, name in zip(folders, ["sst2", "rte", "cola"]):
        saved = load_file(str(folder / ADAPTER_FILE))
        for layer, _, host in hosts:
            adapter = host.serial[name]
            prefix = f"backbone.bert.encoder.layer.{layer}.output.serial.adapter."
            for key, value in adapter.state_dict().items():
                assert torch.equal(value, saved[prefix + key]), (name, layer, key)
            assert all(not p.requires_grad for p in adapter.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".fusion." in n or n.startswith("backbone.classifier") for n in trainable)
    assert len([n for n in trainable if ".fusion." in n]) == 5 * L


def test_stage2_sublayer_output_is_layernorm_of_fused_adapters(folders):
    """The model runs eq. 3-6 at the FFN: LN(mean_n z_n + x) with V = I, Q = 0 (uniform attention)."""
    model = build_model(stage2_recipe(folders, "sst2", value_init_noise=0.0)).eval()
    layer, _, host = fusion_hosts(model)[1]
    with torch.no_grad():
        host.fusion.query.weight.zero_()
        host.fusion.query.bias.zero_()
    captured = {}
    host.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    ids, mask = tiny_inputs()
    model(ids, attention_mask=mask)
    inner, x = captured["args"]
    with torch.no_grad():
        h = host.base.dense(inner)
        mean_z = torch.stack([a(h) for a in host.serial.values()]).mean(0)
        expected = host.base.LayerNorm(mean_z + x)
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=0)


def test_trainable_count_closed_form(tmp_path, folders):
    per_slot = 3 * D * D + 2 * D  # Q (d^2+d) + K (d^2+d) + V (d^2, no bias)
    head = D * 2 + 2
    c = count_parameters(build_model(stage2_recipe(folders, "sst2")))
    assert (c.trainable_params, c.head_params) == (L * per_slot, head)
    c = count_parameters(build_model(stage2_recipe(folders, "sst2", layers=[1])))
    assert c.trainable_params == per_slot
    both = make_stage1(tmp_path / "both", "sst2", 4, adapter={**SERIAL, "sublayers": ["attention", "ffn"]})
    c = count_parameters(build_model(stage2_recipe([both, folders[1]], "sst2")))
    assert c.trainable_params == 2 * L * per_slot
    # meta-device counting (no weights read) agrees
    from autopeft.composition.recipe import count_recipe

    assert count_recipe(stage2_recipe(folders, "sst2")).trainable_params == L * per_slot


def test_fusion_save_and_reload_give_identical_logits(tmp_path, folders):
    recipe = stage2_recipe(folders, "sst2")
    model = build_model(recipe).eval()
    randomize_fusion(model)
    ids, mask = tiny_inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    out = save_trained(model, recipe, None, tmp_path / "fusion")
    saved = load_file(str(out / ADAPTER_FILE))
    assert not any(".serial." in k for k in saved)  # adapters stay in their stage-1 folders
    reloaded = load_trained(out).eval()
    with torch.no_grad():
        after = reloaded(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    fresh = build_model(recipe).eval()  # differently initialised fusion: different logits
    with torch.no_grad():
        assert not torch.allclose(fresh(ids, attention_mask=mask).logits, before, atol=1e-4)


def test_value_regularizer_is_lambda_times_squared_distance_to_identity(folders):
    model = build_model(stage2_recipe(folders, "sst2", regularization=0.5))
    hosts = fusion_hosts(model)
    g = torch.Generator().manual_seed(3)
    expected = 0.0
    with torch.no_grad():
        for _, _, host in hosts:
            e = torch.randn(D, D, generator=g) * 0.1
            host.fusion.value.weight.copy_(torch.eye(D) + e)
            expected += float((e ** 2).sum())
    assert model.regularization().item() == pytest.approx(0.5 * expected, rel=1e-5)
    assert build_model(stage2_recipe(folders, "sst2", regularization=0.0)).regularization() is None


def test_prune_keeps_most_attended_adapter_and_equals_smaller_recipe(tmp_path, folders):
    recipe = stage2_recipe(folders, "sst2")
    model = build_model(recipe).eval()
    randomize_fusion(model, std=0.5)
    ids, mask = tiny_inputs()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    act = fusion_attention(model)
    assert set(act) == {"sst2", "rte", "cola"} and sum(act.values()) == pytest.approx(1.0, abs=1e-5)
    best = max(act, key=act.get)
    assert prune_fusion_adapters(model, 1) == [best]
    assert all(list(h.serial) == [best] for _, _, h in fusion_hosts(model))
    with torch.no_grad():
        pruned = model(ids, attention_mask=mask).logits
    out = save_trained(model, recipe, None, tmp_path / "pruned")
    small = build_model(stage2_recipe([folders[["sst2", "rte", "cola"].index(best)]], "sst2")).eval()
    small.load_state_dict(load_file(str(out / ADAPTER_FILE)), strict=False)
    with torch.no_grad():
        assert torch.equal(small(ids, attention_mask=mask).logits, pruned)
    with pytest.raises(ValueError, match="unknown adapters"):
        prune_fusion_adapters(model, ["mnli"])


# ----- errors ---------------------------------------------------------------------------------------
def test_unfusable_stage1_adapters_are_rejected(tmp_path, folders):
    parallel = make_stage1(tmp_path / "p", "sst2", 5, adapter={"method": "adapter", "placement": "parallel"})
    with pytest.raises(CompositionError, match="serial"):
        build_model(recipe_from_dict(
            {"backbone": TINY_BERT, "components": [{"method": "adapter_fusion", "adapters": [str(parallel)]}]}))
    houlsby = make_stage1(tmp_path / "h", "sst2", 6, adapter={"method": "adapter", "variant": "houlsby", "placement": "serial"})
    with pytest.raises(CompositionError, match="LayerNorm"):
        stage2_recipe([houlsby], "sst2")
    with pytest.raises(CompositionError, match="not a stage-1 folder"):
        build_model(recipe_from_dict({"backbone": TINY_BERT, "components": [
            {"method": "adapter_fusion", "adapters": [str(tmp_path / "missing")]}]}))
    wide = make_stage1(tmp_path / "w", "sst2", 7, backbone={**TINY_BERT, "hidden_size": 48})
    with pytest.raises(CompositionError, match="another backbone"):
        build_model(recipe_from_dict({"backbone": TINY_BERT, "components": [
            {"method": "adapter_fusion", "adapters": [str(folders[0]), str(wide)]}]}))
    with pytest.raises(CompositionError, match="names"):
        build_model(stage2_recipe(folders, "sst2", names=["a", "b"]))
    with pytest.raises(CompositionError, match="serial"):
        stage1_recipe({"backbone": TINY_BERT, "components": [{"method": "adapter", "placement": "parallel"}]}, "sst2")


def test_stage1_recipe_defaults_to_a_serial_pfeiffer_adapter():
    r = stage1_recipe({"backbone": TINY_BERT}, "rte")
    (a,) = r.components
    assert (r.task, a.method, a.variant, a.placement, a.reduction_factor) == ("rte", "adapter", "pfeiffer", "serial", 16.0)
    r = stage1_recipe({"backbone": TINY_BERT, "components": [{"method": "adapter", "reduction_factor": 4}]}, "cola")
    assert (r.components[0].placement, r.components[0].reduction_factor) == ("serial", 4.0)


def test_train_adapters_then_fusion_end_to_end(tmp_path, glue_dir):
    base = {"backbone": {**TINY_BERT, "vocab_size": 30522},
            "training": {"max_train_examples": 8, "batch_size": 4, "max_eval_examples": 8,
                         "eval_batch_size": 8, "max_seq_length": 16, "learning_rate": 0.05}}
    folders = train_adapters(["sst2", "rte"], base, tmp_path / "adapters", glue_dir)
    assert folders == [tmp_path / "adapters" / "sst2", tmp_path / "adapters" / "rte"]
    assert all((f / "metrics.json").is_file() for f in folders)
    recipe = stage2_recipe(folders, "sst2", base)
    result, model = run_trial(recipe, glue_dir)
    assert result.steps == 2 and result.trainable_params == L * (3 * D * D + 2 * D)
    for folder, name in zip(folders, ["sst2", "rte"]):  # stage-2 training left the adapters untouched
        saved = load_file(str(folder / ADAPTER_FILE))
        for layer, _, host in fusion_hosts(model):
            for key, value in host.serial[name].state_dict().items():
                assert torch.equal(value, saved[f"backbone.bert.encoder.layer.{layer}.output.serial.adapter.{key}"])
    assert not torch.equal(fusion_hosts(model)[0][2].fusion.value.weight, build_model(recipe).encoder.get(0, "output").fusion.value.weight)
    res2, out = train_fusion(folders, "sst2", tmp_path / "fusion", glue_dir, base)
    assert res2.score == result.score
    # the same two stages as a user types them: the CLI prints the score the Python calls gave
    import yaml
    from typer.testing import CliRunner

    from autopeft.cli import app

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cli = CliRunner()
    res = cli.invoke(app, ["fusion", "stage1", "sst2", "rte", "-r", str(tmp_path / "base.yaml"), "-o",
                           str(tmp_path / "cli-adapters"), "--data-dir", str(glue_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cli_folders = [tmp_path / "cli-adapters" / "sst2", tmp_path / "cli-adapters" / "rte"]
    assert res.output.strip().splitlines()[-1] == "stage-1 adapters: " + " ".join(map(str, cli_folders))
    for mine, theirs in zip(cli_folders, folders):
        assert load_file(str(mine / ADAPTER_FILE)).keys() == load_file(str(theirs / ADAPTER_FILE)).keys()
        assert all(torch.equal(a, b) for a, b in zip(load_file(str(mine / ADAPTER_FILE)).values(),
                                                      load_file(str(theirs / ADAPTER_FILE)).values()))
    res = cli.invoke(app, ["fusion", "stage2", *map(str, cli_folders), "--task", "sst2", "-r", str(tmp_path / "base.yaml"),
                           "-o", str(tmp_path / "cli-fusion"), "--data-dir", str(glue_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == (f"sst2 validation: accuracy={res2.metrics['accuracy']:.4f}; "
                                                  f"saved to {tmp_path / 'cli-fusion'}")
    reloaded = load_trained(out).eval()
    ids, mask = tiny_inputs(vocab=30522)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model.eval()(ids, attention_mask=mask).logits)
