"""Architecture families (autopeft.backbones.arch.FAMILIES): closed-form counts at real sizes on the meta
device, equality with Hugging Face ``peft`` on tiny random models of each family, and every method on
every family (build, one training step, save, reload into a fresh backbone, identical logits)."""

import copy
import math

import pytest
import torch

from autopeft.backbones.arch import ArchitectureError, family_of
from autopeft.backbones import load_model
from autopeft.methods.base import parse_component
from autopeft.methods.lora import LoraLinear
from autopeft.composition.model import count_parameters
from autopeft.composition.recipe import RecipeError, build_model, count_recipe, recipe_from_dict

#: Tiny random backbones, one per family member (d=32, 2 layers, 4 query heads; GQA: 2 key/value heads).
TINY = {
    "distilbert": {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37,
                   "vocab_size": 120, "max_position_embeddings": 160},
    "deberta-v2": {"model_type": "deberta-v2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 160,
                   "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"],
                   "position_biased_input": False, "type_vocab_size": 0, "norm_rel_ebd": "layer_norm",
                   "share_att_key": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 120, "n_positions": 200,
             "bos_token_id": 1, "eos_token_id": 2},
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 200,
              "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 200,
              "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"model_type": "mistral", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 200,
                "bos_token_id": 1, "eos_token_id": 2},
}
TOL = 1e-5
PAD = 0


def _recipe(backbone, components, **kw):
    return recipe_from_dict({"backbone": backbone, "task": "sst2", "components": components,
                             "training": {"max_seq_length": 32}, **kw})


def _inputs(batch=3, length=7, seed=0):
    """Right-padded inputs: ``input_ids`` (B, T) with PAD where ``attention_mask`` is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _count(preset, component):
    return count_recipe(_recipe({"preset": preset}, [component])).trainable_params


# ----- closed-form counts at real sizes (meta device) ---------------------------------------------
def test_lora_on_llama_2_7b_q_v_counts_4194304():
    # 32 layers x 2 matrices x r (d_in + d_out) = 32 * 2 * 8 * (4096 + 4096)
    assert _count("llama-2-7b", {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}) == 4_194_304


def test_real_size_counts_per_family_by_hand():
    # Mistral-7B: GQA, v_proj is 4096 -> 8 kv heads * 128 = 1024 wide.
    assert _count("mistral-7b", {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}) \
        == 32 * 8 * ((4096 + 4096) + (4096 + 1024)) == 3_407_872
    # Qwen2.5-0.5B: 24 layers, d=896, 2 kv heads * 64 = 128.
    assert _count("qwen2.5-0.5b", {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}) \
        == 24 * 8 * ((896 + 896) + (896 + 128)) == 540_672
    # GPT-2: query/value mean the fused c_attn (768 -> 2304), wrapped once per layer.
    assert _count("gpt2", {"method": "lora", "r": 8, "target_modules": ["query", "value"]}) \
        == 12 * 8 * (768 + 2304) == 294_912
    assert _count("gpt2", {"method": "lora", "r": 8, "target_modules": ["c_attn"]}) == 294_912
    # DeBERTa-v3-base: query_proj/value_proj 768 x 768.
    assert _count("deberta-v3-base", {"method": "lora", "r": 8, "target_modules": ["query_proj", "value_proj"]}) \
        == 12 * 2 * 8 * (768 + 768) == 294_912
    # Parallel FFN adapter, bottleneck 48 (768 / 16), on GPT-2 and Llama-2-7B (4096 / 16 = 256).
    assert _count("gpt2", {"method": "adapter", "placement": "parallel", "reduction_factor": 16}) \
        == 12 * (2 * 768 * 48 + 48 + 768)
    assert _count("llama-2-7b", {"method": "adapter", "placement": "parallel", "reduction_factor": 16}) \
        == 32 * (2 * 4096 * 256 + 256 + 4096)
    # Prefix tuning without reparametrisation (P-Tuning v2), P=10: L * P * 2 * kv_width.
    assert _count("qwen2.5-0.5b", {"method": "p_tuning_v2", "num_virtual_tokens": 10}) == 24 * 10 * 2 * 128
    assert _count("llama-2-7b", {"method": "p_tuning_v2", "num_virtual_tokens": 10}) == 32 * 10 * 2 * 4096
    # BitFit on Qwen2: only the q/k/v biases exist: 896 + 128 + 128 per layer, plus nothing else.
    assert _count("qwen2.5-0.5b", {"method": "bitfit"}) == 24 * (896 + 128 + 128)
    # DistilBERT: every Linear + both LayerNorm biases per layer (4 d + d_ff + d + 2 d) + embedding LN.
    assert _count("distilbert-base", {"method": "bitfit"}) == 6 * (5 * 768 + 3072 + 2 * 768) + 768


def test_backbone_size_of_llama_2_7b_is_the_published_one_less_the_lm_head():
    count = count_recipe(_recipe({"preset": "llama-2-7b"}, [{"method": "lora"}]))
    # 6,738,415,616 (Llama-2-7b-hf) - 32,000 x 4,096 (lm_head, not in the classification model)
    assert count.backbone_params == 6_738_415_616 - 32_000 * 4_096


def test_unsupported_method_is_a_one_line_error_at_load():
    with pytest.raises(RecipeError, match=r"prefix_tuning is not supported on deberta-v2 backbones: DeBERTa"):
        count_recipe(_recipe({"preset": "deberta-v3-base"}, [{"method": "prefix_tuning"}]))
    with pytest.raises(RecipeError, match=r"bitfit is not supported on llama backbones: no bias terms"):
        count_recipe(_recipe({"preset": "llama-2-7b"}, [{"method": "bitfit"}]))
    with pytest.raises(RecipeError, match=r"does not exist on gpt2 backbones; valid: qkv, attention_output"):
        count_recipe(_recipe({"preset": "gpt2"}, [{"method": "lora", "target_modules": ["ffn_gate"]}]))
    with pytest.raises(RecipeError, match="pooling 'cls' reads the first token"):
        count_recipe(_recipe({"preset": "gpt2"}, [{"method": "lora"}], pooling="cls"))
    with pytest.raises(ArchitectureError, match="model type 't5' is not supported"):
        family_of("t5")


# ----- equality with peft on tiny random models -----------------------------------------------------
peft = pytest.importorskip("peft")

PEFT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                "mistral": ["q_proj", "v_proj"], "deberta-v2": ["query_proj", "value_proj"],
                "distilbert": ["q_lin", "v_lin"]}


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _pair(fam, component):
    """(autopeft model, the same backbone freshly loaded for peft - GPT-2 keeps its Conv1D layers)."""
    model = build_model(_recipe(TINY[fam], [component]))
    clean = load_model(TINY[fam], 2, seed=0).eval()
    return model, clean


def _ours(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("fam", list(PEFT_TARGETS))
def test_lora_matches_peft_on_every_family(fam):
    model, clean = _pair(fam, {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": PEFT_TARGETS[fam]})
    for m in model.modules():
        if isinstance(m, LoraLinear):
            _randomise(m.lora_B, seed=2)
    plain = copy.deepcopy(clean)
    pm = peft.get_peft_model(clean, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                    target_modules=PEFT_TARGETS[fam]))
    ours = {n.removeprefix("backbone."): p for n, p in model.named_parameters() if ".lora_" in n}
    theirs = {n: p for n, p in pm.named_parameters() if ".lora_" in n}
    assert len(ours) == len(theirs) > 0
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(ours[name.removeprefix("base_model.model.").replace(".default.", ".")])
    ids, mask = _inputs()
    a = _ours(model, ids, mask)
    pm.eval()
    with torch.no_grad():
        b = pm(input_ids=ids, attention_mask=mask).logits
        c = plain(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() < TOL
    assert (a - c).abs().max() > 1e-4  # the update matters


@pytest.mark.parametrize("fam", ["gpt2", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_matches_peft_on_decoders(fam, method):
    """peft's prefixes (``get_prompt`` -> a DynamicCache of P past tokens, GQA-sized) through
    transformers' own decoder: real tokens at positions P.., every prefix slot visible."""
    p = 3
    if method == "prefix_tuning":
        component = {"method": method, "num_virtual_tokens": p, "encoder_hidden_size": 16}
        cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p, prefix_projection=True,
                                      encoder_hidden_size=16)
    else:
        component = {"method": method, "num_virtual_tokens": p}
        cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p)
    model, clean = _pair(fam, component)
    enc = model.extras[f"{method}_0"]
    _randomise(enc, seed=3)
    plain = copy.deepcopy(clean)
    pm = peft.get_peft_model(clean, cfg)
    theirs = pm.prompt_encoder["default"]
    assert set(theirs.state_dict()) == set(enc.state_dict())
    theirs.load_state_dict(enc.state_dict())
    ids, mask = _inputs()
    a = _ours(model, ids, mask)
    pm.eval()
    with torch.no_grad():
        cache = pm.get_prompt(ids.shape[0])
        full = torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], dim=1)
        b = pm.base_model(input_ids=ids, attention_mask=full, cache=cache).logits
        c = plain(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() < TOL
    assert (a - c).abs().max() > 1e-4


# ----- every method x every family: build, one training step, save, reload, identical logits -------
METHODS = {
    "bitfit": [{"method": "bitfit"}],
    "lora": [{"method": "lora", "r": 4}],
    "adalora": [{"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "total_step": 4}],
    "qlora": [{"method": "qlora", "r": 4, "compute_dtype": "float32"}],
    "prefix_tuning": [{"method": "prefix_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 8}],
    "p_tuning": [{"method": "p_tuning", "num_virtual_tokens": 3}],
    "p_tuning_v2": [{"method": "p_tuning_v2", "num_virtual_tokens": 3}],
    "adapter_houlsby": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 8}],
    "adapter_parallel": [{"method": "adapter", "placement": "parallel", "reduction_factor": 8}],
    "adapter_drop": [{"method": "adapter", "reduction_factor": 8}, {"method": "adapter_drop", "n": 1}],
    "adapter_fusion": None,  # built from two stage-1 folders in the test
    "mam": [{"method": "mam", "num_virtual_tokens": 3, "bottleneck_size": 4, "encoder_hidden_size": 8}],
    "unipelt": [{"method": "unipelt", "num_virtual_tokens": 3, "r": 2}],
}


def _supported(fam, method):
    from autopeft.backbones import load_config
    from autopeft.methods.base import BackboneLimits

    name = "adapter" if method.startswith("adapter_") and method not in ("adapter_drop", "adapter_fusion") else method
    return name not in dict(BackboneLimits.of(load_config(TINY[fam], 2)).unsupported)


def _train_step(model, seed=0):
    model.train()
    ids, mask = _inputs(seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    loss = out.loss
    reg = model.regularization()
    if reg is not None:
        loss = loss + reg
    loss.backward()
    opt.step()
    model.after_step(1)
    return float(out.loss.detach())


def _stage1(fam, tmp_path, name):
    from autopeft.training.saved import save_trained

    recipe = _recipe(TINY[fam], [{"method": "adapter", "variant": "pfeiffer", "placement": "serial",
                                          "reduction_factor": 8}])
    model = build_model(recipe)
    _train_step(model, seed=1)
    return save_trained(model, recipe, None, tmp_path / name)


@pytest.mark.parametrize("fam", list(TINY))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_saves_and_reloads_on_every_family(fam, method, tmp_path):
    from autopeft.training.saved import load_trained, save_trained

    components = METHODS[method]
    if method == "adapter_fusion":
        components = [{"method": "adapter_fusion",
                       "adapters": [str(_stage1(fam, tmp_path, "a")), str(_stage1(fam, tmp_path, "b"))]}]
    recipe = _recipe(TINY[fam], components)
    if not _supported(fam, method):
        with pytest.raises(RecipeError, match="is not supported on"):
            count_recipe(recipe)
        return
    count = count_recipe(recipe)
    model = build_model(recipe)
    assert count_parameters(model).trainable_params == count.trainable_params > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = _train_step(model)
    assert math.isfinite(loss)  # was loss == loss, which inf passes
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "one step changed no trainable tensor"
    ids, mask = _inputs(seed=5)
    a = _ours(model, ids, mask)
    out = save_trained(model, recipe, None, tmp_path / "trained")
    reloaded = load_trained(out)
    b = _ours(reloaded, ids, mask)
    assert torch.equal(a, b) or (a - b).abs().max() < 1e-6


def test_qlora_on_a_decoder_quantises_every_projection_and_counts_like_fp32():
    from autopeft.backbones.quantization import is_quantized

    recipe = _recipe(TINY["llama"], [{"method": "qlora", "r": 4, "compute_dtype": "bfloat16"}])
    model = build_model(recipe)
    layer = model.backbone.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert is_quantized(getattr(layer.self_attn, name).base_layer)
    for name in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(layer.mlp, name)
        assert is_quantized(getattr(module, "base_layer", module))
    assert getattr(layer.self_attn, "q_proj").base_layer.compute_dtype == torch.bfloat16
    fp32 = build_model(_recipe(TINY["llama"], [{"method": "lora", "r": 4,
                                               "target_modules": ["query", "key", "value", "attention_output",
                                                                  "ffn_in", "ffn_out"]}]))
    assert count_parameters(model).backbone_params == count_parameters(fp32).backbone_params
    assert count_parameters(model).trainable_params == count_parameters(fp32).trainable_params
    assert count_recipe(recipe).backbone_params == count_parameters(fp32).backbone_params


# ----- the search space follows the backbone --------------------------------------------------------
def test_space_drops_what_the_backbone_cannot_run_and_says_so_once():
    from autopeft.backbones import load_config
    from autopeft.searching.space import SearchSpace

    space = SearchSpace.load("default")
    assert "prefix_tuning" in space.methods and "bitfit" in space.methods
    same, notes = space.for_backbone(load_config({"preset": "bert-base"}, 2))
    assert same is space and notes == []
    deberta, notes = space.for_backbone(load_config({"preset": "deberta-v3-base"}, 2))
    assert "prefix_tuning" not in deberta.methods and not any(k.startswith("prefix_tuning.") for k in deberta.dims)
    assert notes == [n for n in notes if n.startswith("prefix_tuning left out of the search: prefix_tuning is not "
                                                      "supported on deberta-v2 backbones")] and len(notes) == 1
    llama, notes = space.for_backbone(load_config({"preset": "llama-2-7b"}, 2))
    assert "bitfit" not in llama.methods and "prefix_tuning" in llama.methods
    assert "cls" not in llama.dims["pooling"].values and len(notes) == 2
    assert all(p.get("pooling") != "cls" for p in llama.start_points)
    full = SearchSpace.load("full")
    deb_full, notes = full.for_backbone(load_config({"preset": "deberta-v3-base"}, 2))
    dropped = {"prefix_tuning", "p_tuning_v2", "mam", "unipelt"} & set(full.methods)
    assert dropped and not dropped & set(deb_full.methods) and len(notes) == len(dropped)
    for group in set(deb_full.groups.values()):
        assert not dropped & set(deb_full.dims[f"one_of.{group}"].values)
    # every start point that survives still makes a valid recipe on that backbone
    base = {"backbone": {"preset": "deberta-v3-base"}, "task": "sst2"}
    for point in deb_full.start_points:
        count_recipe(deb_full.to_recipe(deb_full.complete_point(point), base))


def test_cli_count_on_the_llama_preset_prints_4194304(tmp_path):
    from typer.testing import CliRunner

    from autopeft.cli import app

    path = tmp_path / "llama.yaml"
    path.write_text("backbone: {preset: llama-2-7b}\ntask: sst2\ncomponents:\n"
                    "  - {method: lora, r: 8, target_modules: [q_proj, v_proj]}\n")
    result = CliRunner().invoke(app, ["count", str(path)])
    assert result.exit_code == 0, result.output
    assert "4194304" in result.output.replace(",", "")


def test_method_modules_reach_only_the_composition_layer():
    """Methods stay leaves: a method module imports autopeft.methods, autopeft.composition.model and
    autopeft.backbones.arch (or .quantization) only (never recipe, backbone loading, tasks, trainer, fusion), so adding a family never touches them;
    the foundation below every layer (autopeft.errors, the one error base) is allowed too."""
    import ast
    from pathlib import Path

    import autopeft.methods

    allowed = ("autopeft.methods", "autopeft.composition.model", "autopeft.backbones.arch",
               "autopeft.backbones.quantization", "autopeft.errors")
    offenders = []
    for path in Path(autopeft.methods.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("autopeft") and not n.startswith(allowed)]
    assert offenders == []


def test_a_misspelt_target_suggests_the_close_name_and_lists_the_models_own_names():
    with pytest.raises(RecipeError, match=r"unknown target module 'q_prj' \(did you mean 'q_proj'\?\); valid: query, "
                                          r"key, .*or the model's own names \(q_proj, k_proj, .*c_fc\)"):
        count_recipe(_recipe({"preset": "llama-2-7b"}, [{"method": "lora", "target_modules": ["q_prj"]}]))
