"""Prompt-style methods (prefix_tuning, p_tuning, p_tuning_v2, mam): closed-form parameter counts
on meta-device BERT-base / RoBERTa-base, and behaviour on a tiny random BERT."""

import pytest
import torch

from autopeft.composition.recipe import RecipeError, build_model, count_recipe, recipe_from_dict
from conftest import tiny_inputs, tiny_recipe

BASE = {"bert-base": {"preset": "bert-base"}, "roberta-base": {"preset": "roberta-base"}}
D, L = 768, 12  # width and depth of both base models


def _count(backbone: str, component: dict):
    return count_recipe(recipe_from_dict({"backbone": BASE[backbone], "components": [component]}))


# ----- closed-form counts -------------------------------------------------------------------------
def prefix_mlp(p, h, layers=L, d=D):
    """Li & Liang eq. 5 reparametrisation: Embedding(P, d) -> Linear(d, h) -> tanh -> Linear(h, 2 L d)."""
    return p * d + (d * h + h) + (h * 2 * layers * d + 2 * layers * d)


def prefix_table(p, layers=L, d=D):
    """A trained (P, 2 L d) table (P-Tuning v2, or prefix tuning without projection)."""
    return p * 2 * layers * d


def lstm(d_in, h, n):
    """Bidirectional LSTM: per direction and layer 4h(d_in + h) weights and two 4h biases."""
    first = 2 * (4 * h * (d_in + h) + 8 * h)
    rest = 2 * (4 * h * (2 * h + h) + 8 * h)
    return first + (n - 1) * rest


def p_tuning_lstm(p, h, n=2, d=D):
    return p * d + lstm(d, h, n) + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def p_tuning_mlp(p, h, d=D):
    return p * d + (d * h + h) + (h * h + h) + (h * d + d)


def parallel_adapter(r, layers=L, d=D):
    return layers * (2 * d * r + r + d)


GATE = D + 1  # one UniPELT gate: Linear(d, 1)

CASES = [
    # prefix tuning: defaults P=10, h=64, projection on
    ({"method": "prefix_tuning"}, prefix_mlp(10, 64)),
    ({"method": "prefix_tuning", "num_virtual_tokens": 20, "encoder_hidden_size": 512}, prefix_mlp(20, 512)),
    ({"method": "prefix_tuning", "prefix_projection": False, "num_virtual_tokens": 7}, prefix_table(7)),
    ({"method": "prefix_tuning", "layers": "upper_half", "gated": True}, prefix_mlp(10, 64, layers=6) + 6 * GATE),
    # P-Tuning: defaults P=20, bi-LSTM with h = d/2 = 384, 2 layers
    ({"method": "p_tuning"}, p_tuning_lstm(20, 384)),
    ({"method": "p_tuning", "encoder_num_layers": 3, "encoder_hidden_size": 100, "num_virtual_tokens": 5},
     p_tuning_lstm(5, 100, n=3)),
    ({"method": "p_tuning", "encoder_reparameterization_type": "mlp"}, p_tuning_mlp(20, 768)),
    ({"method": "p_tuning", "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 128, "position": 1},
     p_tuning_mlp(20, 128)),
    # P-Tuning v2: defaults P=16 in all 12 layers, no reparametrisation
    ({"method": "p_tuning_v2"}, prefix_table(16)),
    ({"method": "p_tuning_v2", "num_virtual_tokens": 100, "layers": [0, -1]}, prefix_table(100, layers=2)),
    ({"method": "p_tuning_v2", "gated": True}, prefix_table(16) + L * GATE),
    # MAM: defaults l=30 prefix with MLP width 800 + parallel FFN adapter r=512 (scaling has no parameter)
    ({"method": "mam"}, prefix_mlp(30, 800) + parallel_adapter(512)),
    ({"method": "mam", "prefix_projection": False, "bottleneck_size": 64}, prefix_table(30) + parallel_adapter(64)),
    ({"method": "mam", "scaling": "learned", "bottleneck_size": 16, "num_virtual_tokens": 4, "encoder_hidden_size": 32},
     prefix_mlp(4, 32) + parallel_adapter(16) + L),
    ({"method": "mam", "gated": True, "layers": [3]},
     prefix_mlp(30, 800, layers=1) + parallel_adapter(512, layers=1) + 2 * GATE),
]


@pytest.mark.parametrize("backbone", list(BASE))
@pytest.mark.parametrize("component,expected", CASES, ids=lambda x: x.get("method") if isinstance(x, dict) else None)
def test_closed_form_counts(backbone, component, expected):
    count = _count(backbone, component)
    assert count.trainable_params == expected
    # the task head is counted apart: BERT Linear(d, 2); RoBERTa dense(d, d) + out_proj(d, 2)
    assert count.head_params == (D * 2 + 2 if backbone == "bert-base" else D * D + D + D * 2 + 2)


def test_mam_defaults_are_the_papers():
    from autopeft.methods.mam import MAMConfig

    cfg = MAMConfig()
    assert (cfg.num_virtual_tokens, cfg.bottleneck_size, cfg.scaling) == (30, 512, 4.0)
    prefix, adapter = cfg.parts()
    assert (prefix.method, adapter.method, adapter.placement, adapter.resolved_sublayers()) == (
        "prefix_tuning", "adapter", "parallel", ["ffn"])


def test_invalid_configs_are_one_line_errors():
    bad = [
        {"method": "p_tuning", "layers": [0]},
        {"method": "p_tuning", "gated": True},
        {"method": "p_tuning", "encoder_reparameterization_type": "gru"},
        {"method": "p_tuning", "encoder_reparameterization_type": "mlp", "encoder_num_layers": 3},
        {"method": "p_tuning", "position": -1},
        {"method": "p_tuning_v2", "num_virtual_tokens": 0},
        {"method": "p_tuning_v2", "encoder_hidden_size": 64},  # no reparametrisation in P-Tuning v2
        {"method": "mam", "non_linearity": "nope"},
        {"method": "mam", "bottleneck_size": 0},
    ]
    for component in bad:
        with pytest.raises(RecipeError) as err:
            tiny_recipe([component])
        assert "\n" not in str(err.value)


def test_prefix_methods_conflict_in_the_same_layer():
    from autopeft.composition.model import CompositionError

    with pytest.raises(CompositionError, match="p_tuning_v2 and mam"):
        build_model(tiny_recipe([{"method": "mam"}, {"method": "p_tuning_v2"}]))
    # different layers are fine
    build_model(tiny_recipe([{"method": "mam", "layers": [0]}, {"method": "p_tuning_v2", "layers": [1]}]))
    with pytest.raises(CompositionError, match="p_tuning and p_tuning"):
        build_model(tiny_recipe([{"method": "p_tuning"}, {"method": "p_tuning", "position": 1}]))


# ----- behaviour on the tiny BERT ---------------------------------------------------------------------
def _run(model, ids, mask, **kw):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)


def test_p_tuning_position_inserts_after_the_first_tokens():
    p = 3
    ids, mask = tiny_inputs()
    plain = build_model(tiny_recipe([]))
    at0 = build_model(tiny_recipe([{"method": "p_tuning", "num_virtual_tokens": p, "encoder_hidden_size": 8}]))
    at1 = build_model(tiny_recipe([{"method": "p_tuning", "num_virtual_tokens": p, "encoder_hidden_size": 8,
                                    "position": 1}]))
    enc = at1.extras["p_tuning_0"]
    assert torch.equal(enc.embedding.weight, at0.extras["p_tuning_0"].embedding.weight)  # same seed, same prompt
    base, out0, out1 = _run(plain, ids, mask), _run(at0, ids, mask), _run(at1, ids, mask)
    e_plain, e1 = base.hidden_states[0], out1.hidden_states[0]  # embedding-layer outputs
    assert e1.shape == (3, 7 + p, 32)
    emb = plain.backbone.bert.embeddings
    with torch.no_grad():
        prompt = enc.prompts()  # (P, d)
        pos, typ = emb.position_embeddings.weight, emb.token_type_embeddings.weight[0]
        expect_prompt = emb.LayerNorm(prompt + pos[1:1 + p] + typ)
        expect_rest = emb.LayerNorm(emb.word_embeddings(ids[:, 1:]) + pos[1 + p:7 + p] + typ)
    # [CLS] (token 0) is untouched, the prompt fills slots 1..P, the remaining tokens follow
    torch.testing.assert_close(e1[:, 0], e_plain[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(e1[:, 1:1 + p], expect_prompt.expand(3, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(e1[:, 1 + p:], expect_rest, atol=1e-5, rtol=0)
    # with position 0 the first slot is the prompt, not [CLS]
    assert (out0.hidden_states[0][:, 0] - e_plain[:, 0]).abs().max() > 1e-2
    assert (out1.logits - out0.logits).abs().max() > 1e-5
    # padding stays masked after the shift: changing the padded tokens changes nothing
    ids2 = ids.clone()
    ids2[-1, -2:] = torch.tensor([7, 8])
    torch.testing.assert_close(_run(at1, ids2, mask).logits, out1.logits, atol=1e-6, rtol=0)
    # equivalent to inserting the prompt embeddings by hand and calling the backbone
    with torch.no_grad():
        words = emb.word_embeddings(ids)
        embeds = torch.cat([words[:, :1], prompt.expand(3, -1, -1), words[:, 1:]], dim=1)
        ext = torch.cat([mask[:, :1], torch.ones(3, p, dtype=mask.dtype), mask[:, 1:]], dim=1)
        ref = at1.backbone(inputs_embeds=embeds, attention_mask=ext).logits
    torch.testing.assert_close(out1.logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", [
    {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 8},
    {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_reparameterization_type": "mlp", "position": 1},
    {"method": "p_tuning_v2", "num_virtual_tokens": 4},
    {"method": "mam", "num_virtual_tokens": 4, "encoder_hidden_size": 16, "bottleneck_size": 8},
])
def test_only_method_parameters_train_and_get_gradients(component):
    model = build_model(tiny_recipe([component]))
    model.train()
    ids, mask = tiny_inputs()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    method = {n for n in trainable if not n.startswith("backbone.classifier")}
    assert method and all(n.startswith(("extras.", "backbone.bert.encoder.")) for n in method)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads


def test_mam_equals_prefix_tuning_plus_scaled_parallel_adapter():
    mam = build_model(tiny_recipe([{"method": "mam", "num_virtual_tokens": 5, "encoder_hidden_size": 16,
                                    "bottleneck_size": 8}]))
    parts = build_model(tiny_recipe([
        {"method": "prefix_tuning", "num_virtual_tokens": 5, "encoder_hidden_size": 16},
        {"method": "adapter", "placement": "parallel", "sublayers": ["ffn"], "bottleneck_size": 8, "scaling": 4.0},
    ]))
    adapter = mam.sublayer(0, "ffn").parallel["mam"]
    assert float(adapter.scaling) == 4.0 and not adapter.residual
    assert not mam.sublayer(0, "attention").parallel and not mam.sublayer(0, "attention").serial
    a = [p for p in mam.parameters() if p.requires_grad]
    b = [p for p in parts.parameters() if p.requires_grad]
    assert [p.shape for p in a] == [p.shape for p in b]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, q in zip(a, b):
            assert torch.equal(p, q)  # same seed, same order: same initial values
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # non-zero W_up so the adapter acts
            q.copy_(p)
    ids, mask = tiny_inputs()
    out = _run(mam, ids, mask)
    torch.testing.assert_close(out.logits, _run(parts, ids, mask).logits, atol=1e-6, rtol=0)
    # and the scaled adapter matters: s = 4 differs from s = 1
    adapter.scaling.fill_(1.0)
    assert (_run(mam, ids, mask).hidden_states[-1] - out.hidden_states[-1]).abs().max() > 1e-3
