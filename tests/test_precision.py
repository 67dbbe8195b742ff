"""Precision (``training.precision``): auto's choice, float32 trainable parameters whatever the
backbone's dtype, bf16 training and scoring under autocast, the float16 checkpoint that used to train
to NaN, reloading as trained, and the CLI option."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from autopeft.backbones import precision as prec
from autopeft.composition.recipe import build_model, recipe_from_dict
from autopeft.training.saved import load_trained, save_trained
from autopeft.training.scoring import predict_ids
from autopeft.training.trainer import run_trial

SMALL_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 128}
LORA = [{"method": "lora", "r": 4, "target_modules": ["query", "value"]}]


def recipe(backbone=None, components=LORA, **training):
    t = {"max_train_examples": 96, "batch_size": 16, "max_eval_examples": 64, "max_seq_length": 32,
         "learning_rate": 5e-3, **training}
    return recipe_from_dict({"backbone": backbone or SMALL_BERT, "task": "sst2", "components": components,
                             "pooling": "mean", "training": t})


def test_auto_resolves_from_the_hardware(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: ())
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    assert prec.resolve_precision("auto", "mps") == "fp32"
    assert [prec.resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        prec.resolve_precision("int8", "cpu")


@pytest.mark.parametrize("cpuinfo,flags", [
    ("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 avx2\n", ("avx512_bf16",)),
    ("flags: amx_bf16 amx_tile avx512_bf16\nflags: amx_bf16\n", ("amx_bf16", "avx512_bf16")),
    ("flags\t: fpu amx_bf16x avx512_bf16_extra\nmodel name: amx_bf16\n", ()),  # whole flags, flags lines only
    (OSError("no /proc"), ()),  # macOS, Windows: auto stays fp32
])
def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, cpuinfo, flags):
    class FakePath:
        def __init__(self, path):
            assert path == "/proc/cpuinfo"

        def read_text(self):
            if isinstance(cpuinfo, Exception):
                raise cpuinfo
            return cpuinfo

    monkeypatch.setattr(prec, "Path", FakePath)
    prec.cpu_bf16_flags.cache_clear()  # read once per process
    try:
        assert prec.cpu_bf16_flags() == flags
    finally:
        prec.cpu_bf16_flags.cache_clear()  # the next caller reads this machine's


def test_cast_keeps_trainable_float32_and_stores_frozen_linears_in_the_compute_dtype():
    model = build_model(recipe())
    model.half()  # as a float16 checkpoint builds it: adapters and head in float16 too
    n_params = sum(p.numel() for p in model.parameters())
    counts = prec.cast_for_training(model, "bf16")
    assert sum(counts.values()) == n_params  # dtype never changes what is counted
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    q = model.backbone.bert.encoder.layer[0].attention.self.query
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    assert model.backbone.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
    assert model.backbone.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert model.backbone.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    prec.cast_for_training(model, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="needs a half precision"):
        prec.cast_for_training(model, "fp32", backbone_dtype="bf16")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_recipe_refuses_half_weights_under_fp32_compute(dtype):
    """Refused when the recipe is read (one line), not at the first matmul of a trial."""
    from autopeft.composition.recipe import RecipeError, TrainingConfig, recipe_from_dict

    with pytest.raises(RecipeError, match=f"backbone_dtype {dtype} needs a half precision"):
        recipe_from_dict({"task": "sst2", "components": [{"method": "bitfit"}],
                          "training": {"precision": "fp32", "backbone_dtype": dtype}})
    assert TrainingConfig(precision="auto", backbone_dtype=dtype).backbone_dtype == dtype  # auto may resolve to half


def test_bf16_trial_trains_scores_and_reloads_as_trained(glue_dir, tmp_path):
    r = recipe(precision="bf16")
    result, model = run_trial(r, glue_dir)
    assert result.precision == "bf16" and result.history[-1]["precision"] == "bf16"
    assert model.compute_dtype == torch.bfloat16
    assert 0.0 <= result.score <= 1.0 and torch.isfinite(torch.tensor(result.score))
    fp32, fp32_model = run_trial(recipe(precision="fp32"), glue_dir)
    assert fp32.precision == "fp32"
    # the same steps in another precision: the trained weights close, not equal. The distance between
    # the two runs' float32 trainables, over the distance the fp32 run moved from the initial weights
    # (measured 0.046 here); bf16 rounding that was not applied would give 0, a broken bf16 path ~1.
    start = {n: p for n, p in build_model(recipe(precision="fp32")).named_parameters() if p.requires_grad}
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p for n, p in fp32_model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in ours.values()} == {torch.float32} and set(ours) == set(ref) == set(start)
    with torch.no_grad():
        apart = torch.sqrt(sum(((ours[n] - ref[n]) ** 2).sum() for n in ref))
        moved = torch.sqrt(sum(((ref[n] - start[n]) ** 2).sum() for n in ref))
    assert 0.01 < float(apart / moved) < 0.5, float(apart / moved)
    folder = save_trained(model, r, result, tmp_path / "bf16")
    again = load_trained(folder)
    assert again.compute_dtype == torch.bfloat16
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches

    task = get_task("sst2")
    b = Batches(load_split(task, "validation", glue_dir), load_tokenizer(SMALL_BERT), 32, torch.device("cpu"))
    assert (predict_ids(model, task, b, 64, 64) == predict_ids(again, task, b, 64, 64)).all()
    as_fp32 = load_trained(folder, precision="fp32")
    assert as_fp32.compute_dtype is None and {p.dtype for p in as_fp32.parameters()} == {torch.float32}


def _half_folder(tmp_path, dtype):
    """A small BERT saved in ``dtype`` with MiniLM's tokenizer: a user's half-precision checkpoint."""
    from autopeft.backbones import load_model, minilm_path

    path = tmp_path / f"bert-{dtype}"
    load_model(SMALL_BERT, 2, seed=0).to(dtype).save_pretrained(str(path))
    for f in minilm_path().iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, path / f.name)
    return str(path)


def test_float16_checkpoint_trains_to_a_finite_score_with_float32_trainables(glue_dir, tmp_path):
    folder = _half_folder(tmp_path, torch.float16)
    result, model = run_trial(recipe(backbone=folder), glue_dir)  # fp32: everything upcast
    assert torch.isfinite(torch.tensor(result.score)) and result.precision == "fp32"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    reference, _ = run_trial(recipe(), glue_dir)  # the same weights, never rounded to float16
    assert abs(result.score - reference.score) <= 0.05


def test_cli_precision_option(glue_dir, tmp_path):
    from autopeft.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--recipe", "x.yaml", "--precision", "int8"])
    assert bad.exit_code == 2 and "--precision must be one of auto, fp32, bf16, fp16" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe().model_dump(mode="json")))
    ok = runner.invoke(app, ["train", "--recipe", str(path), "--precision", "bf16", "--data-dir", str(glue_dir),
                             "-o", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["training"]["precision"] == "bf16"
    assert load_trained(tmp_path / "out").compute_dtype == torch.bfloat16


CHECKPOINTED = {
    "lora": [{"method": "lora", "r": 4, "target_modules": ["query", "value", "ffn_out"]}],
    "adapter": [{"method": "adapter", "variant": "houlsby", "reduction_factor": 8}],
    "prefix_tuning": [{"method": "prefix_tuning", "num_virtual_tokens": 4}],
    "p_tuning": [{"method": "p_tuning", "num_virtual_tokens": 4}],
    "p_tuning_v2": [{"method": "p_tuning_v2", "num_virtual_tokens": 4}],
    "bitfit": [{"method": "bitfit"}],
    "adalora": [{"method": "adalora", "init_r": 4, "target_r": 2}],
    "unipelt": [{"method": "unipelt"}],
    "mam": [{"method": "mam"}],
    "adapter_drop": [{"method": "adapter", "reduction_factor": 8}, {"method": "adapter_drop", "n": 1}],
    "full_finetuning": [{"method": "full_finetuning"}],
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """Every family that trains through the backbone: checkpointed gradients equal the plain ones
    (dropout on: the recomputation draws the same masks)."""
    from conftest import TINY_BERT, tiny_inputs

    from autopeft.training.setup import set_gradient_checkpointing

    def grads(checkpointing: bool):
        r = recipe_from_dict({"backbone": TINY_BERT, "task": "sst2", "components": CHECKPOINTED[name],
                              "training": {"gradient_checkpointing": checkpointing}})
        model = build_model(r).train()
        assert set_gradient_checkpointing(model, r) == checkpointing
        ids, mask = tiny_inputs(batch=4, length=9)
        torch.manual_seed(0)
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain and set(plain) == set(checkpointed)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_checkpointing_defaults_on_above_a_billion_parameters():
    from autopeft.training.setup import CHECKPOINTING_FROM, set_gradient_checkpointing

    r = recipe()
    model = build_model(r)
    assert not set_gradient_checkpointing(model, r)
    model.backbone_params = CHECKPOINTING_FROM + 1  # as a 7B backbone counts
    assert set_gradient_checkpointing(model, r)
    assert model.backbone.is_gradient_checkpointing


def test_count_prints_the_llama_7b_preset_weight_bytes_per_dtype(tmp_path):
    """fp32 / bf16: 4 / 2 bytes a weight (6,607,343,616 backbone + 8,192 head); nf4: the 32 layers'
    seven Linear weights at 4.127 bits (QLoRA's double quantisation), the rest in bf16."""
    import json
    import math

    from autopeft.cli import app

    path = tmp_path / "llama.yaml"
    path.write_text("backbone: {preset: llama-2-7b}\ntask: sst2\n"
                    "components: [{method: lora, r: 8, target_modules: [query, value]}]\n")
    total = 6_607_343_616 + 8_192
    quantised = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    nf4 = math.ceil(quantised * (4 + 8 / 64 + 32 / (64 * 256)) / 8) + 2 * (total - quantised)
    res = CliRunner().invoke(app, ["count", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["weight_bytes"] == {"fp32": 4 * total, "bf16": 2 * total, "nf4": nf4}
    text = CliRunner().invoke(app, ["count", str(path)]).output
    assert "backbone weights: fp32 24.61 GiB, bf16 12.31 GiB, nf4 3.36 GiB" in text


def test_gpu_default_packs_trials_by_estimated_memory(monkeypatch):
    """On GPUs the default gpus_per_trial comes from the trial's estimated peak memory: MiniLM trials
    (~1.4 GiB) pack 8 to an 80 GiB GPU (the cap), BERT-base trials 3 to a 16 GiB one; no GPU: none."""
    from autopeft import api
    from autopeft.backbones.memory import estimate_trial_bytes, trials_per_gpu

    # BERT-base, fp32, batch 32 x 128 tokens: 440 MB of weights; 12 layers x s b h (34 + 5 a s / h) x 2 bytes
    base = 4 * 109_483_778
    act = 12 * 128 * 32 * 768 * (34 + 5 * 12 * 128 / 768) * 2
    assert estimate_trial_bytes(base, 0, 12, 768, 12, 32, 128) == int(base + act)
    assert trials_per_gpu(16 * 2**30, int(base + act)) == 3
    assert trials_per_gpu(80 * 2**30, 10**9) == 8 and trials_per_gpu(2**30, 10**10) == 1

    bare = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2"})
    est = api.trial_bytes_estimate(bare, 113_566)
    assert 1.0 * 2**30 < est < 2.0 * 2**30

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert api.default_resources(est) == (2, 1 / 8)  # 16 trials on 2 GPUs share 32 cores
    assert api.default_resources(None) == (16, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert api.default_resources(est) == (32, 0)


def test_search_cli_passes_precision_and_no_time_cap_to_the_api(monkeypatch, tmp_path):
    """The CLI is thin: `--precision bf16 --time-budget none` reach api.search as the trials'
    training.precision and time_budget_s=inf (no cap); a bad precision is one line, exit 2."""
    import math

    from autopeft import api
    from autopeft.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def fake_search(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(api, "search", fake_search)
    res = CliRunner().invoke(app, ["search", "--precision", "bf16", "--time-budget", "none", "--output-dir",
                                   str(tmp_path)])
    assert res.exit_code == 1 and "Stop" in res.output  # the CLI's one line for an unexpected error
    assert seen["training"] == {"precision": "bf16"} and seen["time_budget_s"] == math.inf
    bad = CliRunner().invoke(app, ["search", "--precision", "fp8", "--output-dir", str(tmp_path)])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--precision must be one of" in bad.output
    # --rung-eval-examples: a count, or all (None: every dev example at every rung); else one line, exit 2
    for value, want in (("200", 200), ("all", None), ("ALL", None)):
        seen.clear()
        CliRunner().invoke(app, ["search", "--rung-eval-examples", value, "--output-dir", str(tmp_path)])
        assert seen["training"] == {"rung_eval_examples": want}
    for value in ("0", "-5", "²", "half"):
        bad = CliRunner().invoke(app, ["search", "--rung-eval-examples", value, "--output-dir", str(tmp_path)])
        assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
        assert "--rung-eval-examples must be a positive number" in bad.output


def test_p_tuning_lstm_encoder_runs_under_bf16_autocast():
    """oneDNN has no bf16 LSTM on CPUs ("could not create a primitive descriptor"): the prompt encoder's
    LSTM runs in float32 outside autocast, so P-Tuning trains in bf16 too."""
    from conftest import TINY_BERT, tiny_inputs

    r = recipe_from_dict({"backbone": TINY_BERT, "task": "sst2", "training": {"precision": "bf16"},
                          "components": [{"method": "p_tuning", "num_virtual_tokens": 4}]})
    model = build_model(r).train()
    from autopeft.training.setup import set_precision

    assert set_precision(model, r, "cpu") == "bf16"
    ids, mask = tiny_inputs()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lstm" in n)


def test_cuda_trials_turn_on_tf32_matmuls(monkeypatch):
    """On CUDA the trainer lets float32 matmuls use TF32 (set_float32_matmul_precision("high")); on the
    CPU it leaves the setting alone. (The model itself never moves here: only the setting is read.)"""
    from autopeft.training.setup import set_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        r = recipe()
        set_precision(build_model(r), r, "cpu")
        assert torch.get_float32_matmul_precision() == "highest"
        set_precision(build_model(r), r, "cuda")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
