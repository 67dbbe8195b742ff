"""Hugging Face ``peft`` as the oracle: same backbone weights, same method weights, same logits.

Every test builds an autopeft model on a tiny random BERT, deep-copies the *unmodified* backbone
for peft (so the frozen weights match), copies the method weights across and compares logits in
eval mode on inputs with a padded attention mask (max abs difference < 1e-5, float32).

peft details handled here:
* ``task_type="SEQ_CLS"`` wraps the classifier in ``ModulesToSaveWrapper`` (a copy of the head,
  taken when peft wraps the deep copy, so it matches ours);
* prompt learning (P-Tuning) prepends the prompt at position 0, extends the attention mask with
  ones and the token type ids with zeros - autopeft's ``position: 0``.

Prefix tuning: peft 0.21's own forward does not work with transformers 5 BERT. peft checks
``"past_key_values" in inspect.signature(forward).parameters``; transformers 5 renamed the argument
to ``cache`` (``past_key_values`` survives only through a ``deprecate_kwarg`` wrapper, invisible to
``inspect``), so ``PeftModel.forward`` raises "Model does not support past key values which are
required for prefix tuning." The oracle therefore uses peft's prefix encoder and its ``get_prompt``
(which builds the per-layer ``DynamicCache`` exactly as peft would feed it) and runs transformers'
own BERT with ``cache=`` - BERT's attention then concatenates the cached prefix keys/values before
the sequence, i.e. eq. 5 of He et al. (arXiv:2110.04366) computed by transformers, not by autopeft.
Position ids are passed explicitly as ``0..T-1``: given a cache, BERT (like transformers 4 with
``past_key_values``, hence peft and the P-Tuning v2 reference code) would offset them by the prefix
length P, while autopeft's prefixes leave the input positions unchanged.
"""

import copy

import pytest
import torch

from autopeft.methods.base import parse_component
from autopeft.methods.lora import LoraLinear, merge_lora, unmerge_lora
from autopeft.composition.recipe import build_model
from conftest import tiny_inputs, tiny_recipe

peft = pytest.importorskip("peft")

TOL = 1e-5


def _pair(component: dict):
    """(autopeft model with ``component``, clean deep copy of the backbone it started from,
    ``_hidden`` of that clean backbone on :func:`tiny_inputs`). peft modifies the copy in place."""
    model = build_model(tiny_recipe([]))
    clean = copy.deepcopy(model.backbone)
    plain = _hidden(clean, *tiny_inputs())
    model.add_component(parse_component(component))
    return model, clean, plain


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values for every trainable tensor of ``module`` (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _hidden(model, ids, mask, **kw):
    """(logits, last hidden state (B, T', d)): the hidden state is O(1) on a random backbone, where
    the logits are O(0.01) (classifier init std 0.02), so it is the sharper comparison."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    return out.logits, out.hidden_states[-1]


# ----- LoRA ------------------------------------------------------------------------------------
LORA_TARGETS = {  # autopeft name -> peft target (module-name suffix)
    "query": "query", "key": "key", "value": "value", "attention_output": "attention.output.dense",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}


def test_lora_matches_peft():
    targets = list(LORA_TARGETS)
    model, clean, plain = _pair({"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": targets})
    for m in model.modules():
        if isinstance(m, LoraLinear):
            _randomise(m.lora_B, seed=2)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS.values()))
    pm = peft.get_peft_model(clean, cfg)
    ours = {n.removeprefix("backbone."): p for n, p in model.named_parameters() if ".lora_" in n}
    theirs = {n: p for n, p in pm.named_parameters() if ".lora_" in n}
    assert len(ours) == len(theirs) == 2 * 2 * len(targets)  # A and B, 2 layers, 6 targets
    with torch.no_grad():
        for name, p in theirs.items():  # base_model.model.bert....query.lora_A.default.weight
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            p.copy_(ours[key])
    ids, mask = tiny_inputs()
    a, b = _logits(model, ids, mask), _logits(pm, ids, mask)
    assert (a - b).abs().max() < TOL
    assert (a - plain[0]).abs().max() > 1e-3  # the update matters


def test_lora_merge_equals_unmerged_and_round_trips():
    model, _, _ = _pair({"method": "lora", "r": 4, "target_modules": ["query", "value", "ffn_out"]})
    wrappers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in wrappers:
        _randomise(m.lora_B, seed=3)
    base = {id(m): m.base_layer.weight.detach().clone() for m in wrappers}
    ids, mask = tiny_inputs()
    before = _logits(model, ids, mask)
    assert merge_lora(model) == len(wrappers) == 6
    assert all(m.merged for m in wrappers)
    assert any((m.base_layer.weight - base[id(m)]).abs().max() > 1e-3 for m in wrappers)
    merged = _logits(model, ids, mask)
    assert (merged - before).abs().max() < TOL
    assert unmerge_lora(model) == 6
    assert not any(m.merged for m in wrappers)
    for m in wrappers:
        assert torch.allclose(m.base_layer.weight, base[id(m)], atol=1e-6)
    assert (_logits(model, ids, mask) - before).abs().max() < TOL


# ----- prefix tuning / P-Tuning v2 -----------------------------------------------------------------
def _peft_prefix_logits(pm, ids, mask, n_virtual):
    """peft's prefixes (``get_prompt`` -> DynamicCache) through transformers' own BERT attention."""
    pm.eval()
    bsz, t = ids.shape
    with torch.no_grad():
        cache = pm.get_prompt(bsz)
        full_mask = torch.cat([torch.ones(bsz, n_virtual, dtype=mask.dtype), mask], dim=1)  # (B, P+T)
        positions = torch.arange(t).unsqueeze(0).expand(bsz, -1)
        out = pm.base_model.bert(input_ids=ids, attention_mask=full_mask, cache=cache, position_ids=positions)
        head = pm.base_model.classifier  # ModulesToSaveWrapper -> the trained copy
        return head(pm.base_model.dropout(out.pooler_output)), out.last_hidden_state


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_matches_peft(method):
    p = 3
    if method == "prefix_tuning":
        component = {"method": method, "num_virtual_tokens": p, "encoder_hidden_size": 16}
        cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p, prefix_projection=True,
                                      encoder_hidden_size=16)
    else:
        component = {"method": method, "num_virtual_tokens": p}
        cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p, prefix_projection=False)
    model, clean, plain = _pair(component)
    enc = model.extras[f"{method}_0"]
    pm = peft.get_peft_model(clean, cfg)
    theirs = pm.prompt_encoder["default"]
    assert set(theirs.state_dict()) == set(enc.state_dict())  # same layout: embedding (+ transform.0/.2)
    theirs.load_state_dict(enc.state_dict())
    ids, mask = tiny_inputs()
    a, ha = _hidden(model, ids, mask)
    b, hb = _peft_prefix_logits(pm, ids, mask, p)
    assert (a - b).abs().max() < TOL
    assert (ha - hb).abs().max() < TOL
    assert (a - plain[0]).abs().max() > 1e-4  # the prefix matters
    assert (ha - plain[1]).abs().max() > 1e-2


def test_peft_prefix_cache_layout_matches_ours():
    """peft's per-layer (key, value) prefixes equal the ones autopeft hands each layer's attention."""
    model, clean, plain = _pair({"method": "p_tuning_v2", "num_virtual_tokens": 3, "prefix_dropout": 0.0})
    pm = peft.get_peft_model(clean, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    pm.prompt_encoder["default"].load_state_dict(model.extras["p_tuning_v2_0"].state_dict())
    pm.eval()
    with torch.no_grad():
        cache = pm.get_prompt(2)
        for layer in range(2):
            (source, _), = model.backbone.bert.encoder.layer[layer].attention.self._sources
            pk, pv = source(2)  # (B, heads, P, head_dim)
            assert pk.shape == (2, 4, 3, 8)
            assert torch.equal(pk, cache.layers[layer].keys)
            assert torch.equal(pv, cache.layers[layer].values)


# ----- P-Tuning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_p_tuning_matches_peft(kind):
    p, h = 4, 12
    model, clean, plain = _pair({"method": "p_tuning", "num_virtual_tokens": p, "encoder_hidden_size": h,
                          "encoder_reparameterization_type": kind})
    enc = model.extras["p_tuning_0"]
    cfg = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=p, encoder_hidden_size=h,
                                   encoder_reparameterization_type=kind.upper())
    pm = peft.get_peft_model(clean, cfg)
    theirs = pm.prompt_encoder["default"]
    assert set(theirs.state_dict()) == set(enc.state_dict())
    theirs.load_state_dict(enc.state_dict())
    ids, mask = tiny_inputs()
    a, ha = _hidden(model, ids, mask)
    b, hb = _hidden(pm, ids, mask)
    assert ha.shape == hb.shape == (3, p + 7, 32)
    assert (a - b).abs().max() < TOL
    assert (ha - hb).abs().max() < TOL
    assert (a - plain[0]).abs().max() > 1e-3  # the prompt matters
    # with explicit token type ids too (peft extends them with zeros, as autopeft does)
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    model.eval()
    pm.eval()
    with torch.no_grad():
        a2 = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        b2 = pm(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    assert (a2 - b2).abs().max() < TOL
    assert (a2 - a).abs().max() > 1e-6
