"""Export to the ecosystem (issue 9, deliverable 4): peft adapter folders and merged transformers models.

Every test trains nothing: it builds a tiny random BERT model, gives every trainable tensor
non-trivial values (as training would), saves it with ``save_trained`` (what ``autopeft train``
writes), exports it, and loads the export the way a user does - the tiny backbone saved with
``save_pretrained`` into ``tmp_path``, ``AutoModelForSequenceClassification.from_pretrained`` on it,
then ``peft.PeftModel.from_pretrained`` - and compares logits with autopeft's reloaded model on a
padded batch (max abs difference < 1e-5, float32).
"""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from autopeft.backbones import load_model
from autopeft.cli import app
from autopeft.exporting.hf_export import ExportError, export_model, peft_logits
from autopeft.composition.recipe import build_model
from autopeft.training.saved import load_trained, save_trained
from conftest import TINY_BERT, TINY_ROBERTA, tiny_inputs, tiny_recipe
from test_families import TINY

peft = pytest.importorskip("peft")
from transformers import AutoModelForSequenceClassification  # noqa: E402

runner = CliRunner()
TOL = 1e-5


def _trained(tmp_path, components, backbone=None, **kw):
    """A 'trained' folder: the recipe's model with every trainable tensor moved off its init."""
    recipe = tiny_recipe(components, backbone=backbone, **kw)
    model = build_model(recipe)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return save_trained(model, recipe, None, tmp_path / "trained")


def _base(tmp_path, backbone=None):
    """The tiny backbone saved as a user's base model folder (same seeded weights autopeft built on)."""
    path = tmp_path / "base"
    if not path.exists():
        load_model(backbone or TINY_BERT, 2, seed=0).save_pretrained(str(path))
    return path


def _ours(trained, ids, mask):
    model = load_trained(trained)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _head_only(tmp_path, trained, ids, mask):
    """Logits of the base with autopeft's trained head but without the method: what a lost adapter gives."""
    base = AutoModelForSequenceClassification.from_pretrained(str(_base(tmp_path))).eval()
    head = {k.removeprefix("backbone.classifier."): v for k, v in load_trained(trained).state_dict().items()
            if k.startswith("backbone.classifier.")}
    base.classifier.load_state_dict(head)
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=mask).logits


PEFT_CASES = {
    "lora": ([{"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "ffn_out"]}], "LORA"),
    "lora_some_layers": ([{"method": "lora", "r": 2, "target_modules": ["key", "ffn_in"], "layers": [1]}], "LORA"),
    "lora+bitfit": ([{"method": "lora", "r": 4}, {"method": "bitfit"}], "LORA"),
    "bitfit": ([{"method": "bitfit", "biases": ["query", "ffn_in", "ffn_layernorm"]}], "LORA"),
    "adalora": ([{"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10,
                  "target_modules": ["query", "value", "attention_output"]}], "ADALORA"),
    "prefix_tuning": ([{"method": "prefix_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16}], "PREFIX_TUNING"),
    "p_tuning_v2": ([{"method": "p_tuning_v2", "num_virtual_tokens": 3}], "PREFIX_TUNING"),
    "p_tuning_mlp": ([{"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 12,
                       "encoder_reparameterization_type": "mlp"}], "P_TUNING"),
    "p_tuning_lstm": ([{"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 12}], "P_TUNING"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_from_pretrained_gives_autopeft_logits(case, tmp_path):
    components, peft_type = PEFT_CASES[case]
    trained = _trained(tmp_path, components)
    out = tmp_path / "peft"
    res = runner.invoke(app, ["export", str(trained), "--format", "peft", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]  # once (peft appends classifier, score), only BERT's
    assert config["base_model_name_or_path"] is None  # a bare config has no base to name

    base = AutoModelForSequenceClassification.from_pretrained(str(_base(tmp_path)))
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids, mask = tiny_inputs()
    ours = _ours(trained, ids, mask)
    if peft_type == "PREFIX_TUNING":
        try:  # peft's own forward: refused by peft 0.21 on transformers 5; peft 0.22 runs it, with the
            with torch.no_grad():  # encoder's position ids shifted by the prefix (0.36 off autopeft's here)
                pm(input_ids=ids, attention_mask=mask)
        except ValueError as exc:
            assert "does not support past key values" in str(exc)
        theirs = peft_logits(pm, ids, mask)
    else:
        with torch.no_grad():
            theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max() < TOL
    assert (ours - _head_only(tmp_path, trained, ids, mask)).abs().max() > 1e-3  # the method's weights matter
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "## Recipe" in card and yaml.safe_load(
        card.split("```yaml\n")[1].split("```")[0])["components"][0]["method"] == components[0]["method"]


def test_adalora_pruned_ranks_export_as_zero_singular_values(tmp_path):
    """A pruned triplet (rank_mask False, E zeroed by the allocator) stays pruned in peft's copy
    (12 matrices: AdaLoRA's default targets are the 6 Linear slots of each of the 2 layers)."""
    recipe = tiny_recipe([{"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10}])
    model = build_model(recipe)
    g = torch.Generator().manual_seed(3)
    from autopeft.methods.adalora import adalora_modules

    with torch.no_grad():
        for m in adalora_modules(model).values():
            m.lora_E.copy_(torch.randn(m.lora_E.shape, generator=g))
            m.rank_mask[:2] = False
            m.apply_mask()
    trained = save_trained(model, recipe, None, tmp_path / "trained")
    out = export_model(trained, fmt="peft", output=tmp_path / "peft", log=None).path
    pm = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(_base(tmp_path))), str(out)).eval()
    es = [p for n, p in pm.named_parameters() if "lora_E" in n]
    assert len(es) == 12 and all(torch.equal(e[:2], torch.zeros(2, 1)) and (e[2:] != 0).all() for e in es)
    ids, mask = tiny_inputs()
    with torch.no_grad():
        assert (_ours(trained, ids, mask) - pm(input_ids=ids, attention_mask=mask).logits).abs().max() < TOL


def test_roberta_cls_pooling_is_its_own_head_and_exports(tmp_path):
    """RoBERTa's head reads the first token itself, so ``pooling: cls`` is exact there."""
    trained = _trained(tmp_path, [{"method": "lora", "r": 2}], backbone=TINY_ROBERTA, pooling="cls")
    out = export_model(trained, fmt="peft", output=tmp_path / "peft", log=None).path
    base = AutoModelForSequenceClassification.from_pretrained(str(_base(tmp_path, TINY_ROBERTA)))
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids, mask = tiny_inputs()
    with torch.no_grad():
        assert (_ours(trained, ids, mask) - pm(input_ids=ids, attention_mask=mask).logits).abs().max() < TOL


MERGE_CASES = {
    "lora": [{"method": "lora", "r": 4, "target_modules": ["query", "value", "ffn_out"]}],
    "adalora": [{"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10}],
    "bitfit": [{"method": "bitfit"}],
    "full_finetuning": [{"method": "full_finetuning"}],
    "lora+lora+bitfit": [{"method": "lora", "r": 2, "target_modules": ["query"]},
                         {"method": "lora", "r": 3, "target_modules": ["ffn_in"]}, {"method": "bitfit"}],
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merged_model_loads_with_transformers_and_gives_autopeft_logits(case, tmp_path):
    trained = _trained(tmp_path, MERGE_CASES[case])
    out = tmp_path / "merged"
    res = runner.invoke(app, ["export", str(trained), "--merge", "-o", str(out)])
    assert res.exit_code == 0, res.output
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())  # a plain transformers model
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # built-in SST-2: transformers' defaults
    ids, mask = tiny_inputs()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    ours = _ours(trained, ids, mask)
    assert (ours - theirs).abs().max() < TOL
    assert (ours - _head_only(tmp_path, trained, ids, mask)).abs().max() > 1e-3
    assert "library_name: transformers" in (out / "README.md").read_text()


@pytest.mark.parametrize("pooling,backbone", [("mean", None), ("cls", None), ("mean", TINY_ROBERTA),
                                              ("mean", TINY["distilbert"])])
def test_merged_model_ships_a_pooling_its_class_lacks_as_code(pooling, backbone, tmp_path):
    """A head reading the masked mean (or, under BERT's bare Linear head, the first token) merges into a
    folder whose config points at shipped code: transformers loads it with ``trust_remote_code=True``
    and gives autopeft's logits; without it, transformers refuses the folder (never the backbone's own
    head with other logits)."""
    trained = _trained(tmp_path, [{"method": "lora", "r": 2}], backbone=backbone, pooling=pooling)
    out = tmp_path / "merged"
    res = runner.invoke(app, ["export", str(trained), "--merge", "-o", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["autopeft_pooling"] == pooling and cfg["model_type"].startswith("autopeft_pooled_")
    model = AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(model).__name__.startswith("AutopeftPooled")
    ids, mask = tiny_inputs()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        theirs_labels = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    ours = load_trained(trained)
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    assert (want.logits - theirs).abs().max() < TOL
    assert abs(float(want.loss) - float(theirs_labels)) < TOL
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=False)


@pytest.mark.parametrize("components,kw,args,msg", [
    ([{"method": "adapter", "placement": "parallel", "sublayers": ["ffn"]}], {}, ["--format", "peft"],
     "peft cannot hold this recipe: peft has no bottleneck adapters"),
    ([{"method": "adapter", "placement": "parallel", "sublayers": ["ffn"]}], {}, ["--merge"],
     "cannot merge this recipe: a bottleneck adapter has a non-linearity"),
    ([{"method": "lora"}], {"pooling": "mean"}, ["--format", "peft"],
     "(pooling: mean), but the backbone's own head, which peft and transformers run, reads its pooler (or "
     "first/last token); use --merge for a transformers model that ships this head as code (load it with "
     "trust_remote_code=True)"),
    ([{"method": "adapter", "placement": "parallel", "sublayers": ["ffn"]}], {"pooling": "mean"}, ["--merge"],
     "cannot merge this recipe: a bottleneck adapter has a non-linearity"),
    ([{"method": "lora"}], {"gating": True}, ["--format", "peft"], "UniPELT gates (lora gated)"),
    ([{"method": "lora"}, {"method": "p_tuning_v2"}], {}, ["--format", "peft"], "mixes lora + p_tuning_v2"),
    ([{"method": "lora", "target_modules": ["query"]}, {"method": "lora", "target_modules": ["value"]}], {},
     ["--format", "peft"], "mixes lora + lora; use --merge"),
    ([{"method": "p_tuning_v2", "layers": [1]}], {}, ["--format", "peft"], "prefix in every layer"),
    ([{"method": "p_tuning", "position": 1}], {}, ["--format", "peft"], "peft prepends it"),
    ([{"method": "prefix_tuning"}], {}, ["--merge"], "use --format peft"),
    ([{"method": "mam"}], {}, ["--format", "peft"], "MAM is a prefix plus a parallel adapter"),
    ([{"method": "unipelt"}], {}, ["--merge"], "UniPELT's gates depend on the input"),
    ([{"method": "full_finetuning"}], {}, ["--format", "peft"], "not an adapter; use --merge"),
    ([{"method": "p_tuning_v2"}], {"backbone": TINY["distilbert"]}, ["--format", "peft"], "takes no key/value cache"),
    ([{"method": "p_tuning"}], {"backbone": {**TINY["gpt2"], "pad_token_id": 0}}, ["--format", "peft"],
     "cannot find the last real token"),
])
def test_what_cannot_be_exported_is_one_line_and_exit_2(components, kw, args, msg, tmp_path):
    trained = _trained(tmp_path, components, **kw)
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", str(trained), *args, "-o", str(out)])
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_existing_output_folder_is_kept_unless_overwrite(tmp_path):
    trained = _trained(tmp_path, [{"method": "lora", "r": 2}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    res = runner.invoke(app, ["export", str(trained), "--format", "peft", "-o", str(out)])
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert (out / "mine.txt").read_text() == "keep me"
    res = runner.invoke(app, ["export", str(trained), "--format", "peft", "-o", str(out), "--overwrite"])
    assert res.exit_code == 0 and not (out / "mine.txt").exists() and (out / "adapter_config.json").is_file()


def _search(tmp_path, recipe, score=0.8123, trial_id="abc123"):
    """A finished search folder whose front holds one point (as ``autopeft search`` writes it)."""
    folder = tmp_path / "runs" / "mysearch"
    folder.mkdir(parents=True)
    (tmp_path / "glue").mkdir(exist_ok=True)
    row = {"trial_id": trial_id, "score": score, "trainable_params": 1234, "trainable_percent": 0.5,
           "peak_memory_bytes": 1, "examples_seen": 320, "recipe": recipe.model_dump(mode="json")}
    (folder / "pareto.json").write_text(json.dumps([row]))
    (folder / "search.json").write_text(json.dumps({"searcher": "tpe", "seed": 7, "budget": "0.5%",
                                                    "space": "default", "data_dir": str(tmp_path / "glue")}))
    return folder


def test_search_point_is_trained_first_then_exported_with_its_provenance(tmp_path, monkeypatch):
    """From a search: the point's recipe is trained (here a stand-in for api.train that saves a model
    with moved weights) into <search>/trained/<trial>, with the search's data folder; a second export
    reuses those weights; the card names the search, searcher, seed, trial and score."""
    from autopeft import api

    recipe = tiny_recipe([{"method": "lora", "r": 2}])
    folder = _search(tmp_path, recipe)
    calls = []

    def fake_train(r, data_dir=None, output_dir=None, log=None, **kw):
        calls.append((r, data_dir, output_dir))
        model = build_model(r)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2)
        save_trained(model, r, None, output_dir)

    monkeypatch.setattr(api, "train", fake_train)
    monkeypatch.delenv("AUTOPEFT_DATA_DIR", raising=False)
    res = runner.invoke(app, ["export", "mysearch", "--output-dir", str(tmp_path / "runs"), "--format", "peft",
                              "--train", "--output", str(tmp_path / "peft")])  # the long spellings
    assert res.exit_code == 0, res.output
    assert "no kept weights for trial abc123: training its recipe" in res.output
    assert [(c[0], c[1], c[2]) for c in calls] == [(recipe, str(tmp_path / "glue"), folder / "trained" / "abc123")]
    card = (tmp_path / "peft" / "README.md").read_text()
    for text in ("search: `mysearch`", "searcher: tpe, seed 7", "trial: `abc123`", "accuracy 0.8123 at 320 training"):
        assert text in card, text
    res = runner.invoke(app, ["export", str(folder), "--merge", "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0 and len(calls) == 1 and "using the trained weights" in res.output
    ids, mask = tiny_inputs()
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        diff = (merged(input_ids=ids, attention_mask=mask).logits - _ours(folder / "trained" / "abc123", ids, mask))
    assert diff.abs().max() < TOL
    res = runner.invoke(app, ["export", str(folder), "--format", "merged", "-o", str(tmp_path / "merged2")])
    assert res.exit_code == 0 and len(calls) == 1, res.output  # --format merged is --merge: the same files
    assert (tmp_path / "merged2" / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()


def test_search_point_that_cannot_be_exported_fails_before_training(tmp_path, monkeypatch):
    from autopeft import api

    recipe = tiny_recipe([{"method": "adapter", "placement": "parallel", "sublayers": ["ffn"]}])
    folder = _search(tmp_path, recipe)
    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("trained a point that cannot be exported"))
    res = runner.invoke(app, ["export", str(folder), "--format", "peft", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "peft has no bottleneck adapters" in res.output
    assert "autopeft train --recipe best.yaml" in res.output and not (folder / "trained").exists()


def test_no_train_flag_says_the_search_needs_trained_weights(tmp_path):
    folder = _search(tmp_path, tiny_recipe([{"method": "lora", "r": 2}]))
    res = runner.invoke(app, ["export", str(folder), "--format", "peft", "--no-train", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "keeps no trained weights for trial abc123" in res.output


def test_every_pick_on_the_command_line_writes_its_own_point(tmp_path):
    """``export --pick`` as a user types it, on a front of three points where each pick names another:
    a (best dev score, most parameters), b (least memory, within a's dev interval), c (fewest parameters)."""
    folder = _search(tmp_path, tiny_recipe([{"method": "lora", "r": 2}]))
    rows = [{"trial_id": t, "score": sc, "score_low": lo, "score_high": hi, "trainable_params": n,
             "trainable_percent": 0.5, "peak_memory_bytes": mem, "examples_seen": 320,
             "recipe": tiny_recipe([{"method": "lora", "r": r}]).model_dump(mode="json")}
            for t, sc, lo, hi, n, mem, r in [("a", 0.88, 0.86, 0.90, 9_000, 3, 8), ("b", 0.865, 0.84, 0.88, 4_000, 1, 4),
                                             ("c", 0.85, 0.83, 0.87, 1_000, 2, 1)]]
    (folder / "pareto.json").write_text(json.dumps(rows))
    want = {None: 8, "best": 8, "smallest": 1, "leanest": 4, "smallest-within-noise": 4, "2": 1, "b": 4}
    for pick, r in want.items():
        out = tmp_path / f"{pick}.yaml"
        res = runner.invoke(app, ["export", str(folder), *(["--pick", pick] if pick else []), "--output", str(out)])
        assert res.exit_code == 0, res.output
        assert yaml.safe_load(out.read_text())["components"][0]["r"] == r, pick
    res = runner.invoke(app, ["export", str(folder), "--pick", "3", "-o", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2 and "pick 3 is out of range: the front has 3 points (0-2)" in res.output


def test_recipe_export_is_unchanged_and_pick_is_for_searches(tmp_path):
    recipe = tiny_recipe([{"method": "lora", "r": 2}])
    folder = _search(tmp_path, recipe)
    res = runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "best.yaml")])
    assert res.exit_code == 0 and yaml.safe_load((tmp_path / "best.yaml").read_text())["components"][0]["r"] == 2
    head = (tmp_path / "best.yaml").read_text().splitlines()[:2]  # the recipe's model card: two comment lines
    assert head == ["# exported by autopeft from search mysearch (searcher tpe, seed 7, budget 0.5%)",
                    "# trial abc123: validation score 0.8123 at 320 training examples, 1,234 trainable parameters "
                    "without the head"]
    from autopeft.composition.recipe import load_recipe

    assert load_recipe(tmp_path / "best.yaml") == recipe
    res = runner.invoke(app, ["export", str(folder), "--format", "recipe", "-o", str(tmp_path / "best2.yaml")])
    assert res.exit_code == 0 and (tmp_path / "best2.yaml").read_text() == (tmp_path / "best.yaml").read_text()
    trained = _trained(tmp_path, [{"method": "lora", "r": 2}])
    with pytest.raises(ExportError, match="--pick applies to searches"):
        export_model(trained, fmt="peft", output=tmp_path / "x", pick="smallest", log=None)


def test_real_minilm_lora_search_point_exports_to_peft_and_merged(glue_dir, tmp_path):
    """The done-when check on the real backbone. The default search's best point (LoRA on the FFN
    with a mean-pooling head, experiments/runs/default-run-tpe.pareto.json) cannot be held by peft nor
    merged: one line, exit 2. A LoRA point (the default space's LoRA start point, r=8 on W_q/W_v, with the
    backbone's own pooler head, trained on 256 SST-2 examples) is trained from its search folder,
    exported, and loads with peft and with transformers to autopeft's logits on real sentences."""
    from pathlib import Path

    from autopeft.backbones import load_tokenizer, minilm_path
    from autopeft.composition.recipe import Recipe
    from autopeft.data.tasks import get_task, load_split

    recorded = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "default-run-tpe.pareto.json"
    default = tmp_path / "default"
    default.mkdir()
    (default / "pareto.json").write_text(recorded.read_text())
    res = runner.invoke(app, ["export", str(default), "--pick", "best", "--format", "peft", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "(pooling: mean)" in res.output and "use --merge" in res.output, res.output

    recipe = Recipe.model_validate({
        "backbone": "minilm-l6", "task": "sst2", "pooling": "pooler",
        "components": [{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}],
        "training": {"learning_rate": 3e-3, "max_train_examples": 256, "max_eval_examples": 64, "seed": 0}})
    folder = _search(tmp_path, recipe, score=0.5, trial_id="lora1")
    res = runner.invoke(app, ["export", str(folder), "--format", "peft", "--data-dir", str(glue_dir),
                              "-o", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(folder), "--merge", "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "using the trained weights" in res.output, res.output

    sentences = [t[0] for t in load_split(get_task("sst2"), "validation", glue_dir).texts[:16]]
    tok = load_tokenizer("minilm-l6")
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = _ours(folder / "trained" / "lora1", ids, mask)
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (pm(input_ids=ids, attention_mask=mask).logits - ours).abs().max() < TOL
        assert (merged(input_ids=ids, attention_mask=mask).logits - ours).abs().max() < TOL
    assert ours.abs().max() > 0.1  # real logits, not a degenerate head
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2" and cfg["r"] == 8

    # the default best point's kind: LoRA on the FFN, mean pooling -> --merge ships the head as code
    mean = recipe.model_copy(update={"pooling": "mean", "components": [
        recipe.components[0].model_copy(update={"r": 4, "target_modules": ["ffn_in", "ffn_out"]})]})
    folder = _search(tmp_path / "m", mean, score=0.5, trial_id="mean1")
    res = runner.invoke(app, ["export", str(folder), "--merge", "--data-dir", str(glue_dir),
                              "-o", str(tmp_path / "merged_mean")])
    assert res.exit_code == 0 and "trust_remote_code=True" in res.output, res.output
    ours = _ours(folder / "trained" / "mean1", ids, mask)
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged_mean"),
                                                                trust_remote_code=True).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids, attention_mask=mask).logits - ours).abs().max() < TOL


FAMILY_CASES = [("distilbert", "lora"), ("deberta-v2", "lora"), ("gpt2", "lora"), ("llama", "lora"),
                ("gpt2", "p_tuning_v2"), ("llama", "p_tuning_v2"), ("deberta-v2", "p_tuning")]


@pytest.mark.parametrize("family,method", FAMILY_CASES)
def test_other_families_export_exactly(family, method, tmp_path):
    """Module paths come from the model's own tree: DistilBERT, DeBERTa-v2, GPT-2 (Conv1D, stored
    transposed: peft's fan_in_fan_out) and Llama export as they do for BERT; decoders pool the last
    real token, found by the pad token."""
    from autopeft.exporting.hf_export import probe_inputs

    spec = {**TINY[family], **({"pad_token_id": 0} if family in ("gpt2", "llama") else {})}
    component = {"lora": {"method": "lora", "r": 2, "target_modules": ["query", "value", "ffn_out"]},
                 "p_tuning_v2": {"method": "p_tuning_v2", "num_virtual_tokens": 3},
                 "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 3}}[method]
    trained = _trained(tmp_path, [component], backbone=spec)
    base = _base(tmp_path, spec)
    ids, mask = probe_inputs(120, spec.get("pad_token_id"), seed=5)
    ours = _ours(trained, ids, mask)
    out = export_model(trained, fmt="peft", output=tmp_path / "peft", log=None).path
    heads = {"distilbert": ["classifier", "pre_classifier"], "deberta-v2": ["classifier", "pooler"],
             "gpt2": ["score"], "llama": ["score"]}[family]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == heads
    pm = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base)), str(out))
    assert (peft_logits(pm, ids, mask) - ours).abs().max() < TOL
    if method == "lora":
        merged = export_model(trained, fmt="merged", output=tmp_path / "merged", log=None).path
        model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
        with torch.no_grad():
            assert (model(input_ids=ids, attention_mask=mask).logits - ours).abs().max() < TOL


def _user_task(tmp_path):
    """A recipe's task on user data with string labels, as a search on a CSV writes it (sorted names)."""
    return {"name": "reviews", "source": str(tmp_path / "reviews.csv"), "text_columns": ["text"],
            "label_column": "label", "labels": ["bad", "good"]}


def test_merged_config_holds_the_label_names_of_user_data(tmp_path):
    """config.json gets id2label / label2id from the task's labels, so transformers (and its
    pipelines) answer "bad" / "good", not LABEL_0 / LABEL_1."""
    from transformers import AutoConfig

    trained = _trained(tmp_path, [{"method": "lora", "r": 2}], task=_user_task(tmp_path))
    out = export_model(trained, fmt="merged", output=tmp_path / "merged", log=None).path
    config = AutoConfig.from_pretrained(str(out))
    assert config.id2label == {0: "bad", 1: "good"} and config.label2id == {"bad": 0, "good": 1}
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    ids, mask = tiny_inputs()
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - _ours(trained, ids, mask)).abs().max() < TOL
    assert "labels (id: name): 0: bad, 1: good" in (out / "README.md").read_text()


def test_peft_card_loads_the_adapter_with_the_label_names(tmp_path):
    """The peft folder holds no transformers config; the card's "Load it" code, run as written (BASE:
    the saved tiny backbone, THIS_FOLDER: the export), gives a model whose config names the labels
    and whose logits are autopeft's."""
    trained = _trained(tmp_path, [{"method": "lora", "r": 2}], task=_user_task(tmp_path))
    out = export_model(trained, fmt="peft", output=tmp_path / "peft", log=None).path
    card = (out / "README.md").read_text()
    code = card.split("## Load it")[1].split("```python\n")[1].split("```")[0]
    assert "id2label = {0: 'bad', 1: 'good'}" in code
    namespace = {"BASE": str(_base(tmp_path))}
    exec(code.replace("'THIS_FOLDER'", repr(str(out))), namespace)  # noqa: S102 - the card's own code
    model = namespace["model"]
    assert model.config.id2label == {0: "bad", 1: "good"} and model.config.label2id == {"bad": 0, "good": 1}
    ids, mask = tiny_inputs()
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - _ours(trained, ids, mask)).abs().max() < TOL


def test_bundled_minilm_is_named_by_its_hub_id(tmp_path):
    """base_model_name_or_path is the hub id of the bundled weights, not a path inside the venv; the
    card says which local copy autopeft used; the export's own reload check ran offline on that copy."""
    from autopeft.backbones import minilm_path
    from autopeft.composition.recipe import Recipe

    recipe = Recipe.model_validate({"backbone": "minilm-l6", "task": "sst2", "pooling": "pooler",
                                    "components": [{"method": "lora", "r": 2, "target_modules": ["query"],
                                                    "layers": [0]}]})
    model = build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    trained = save_trained(model, recipe, None, tmp_path / "trained")
    res = export_model(trained, fmt="peft", output=tmp_path / "peft", log=None)
    config = json.loads((res.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert res.max_abs_diff is not None and res.max_abs_diff < TOL
    card = (res.path / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and str(minilm_path()) in card
    assert "from_pretrained('sentence-transformers/all-MiniLM-L6-v2', num_labels=2)" in card


def test_the_folder_formats_checked_are_the_formats_written():
    """checks.py refuses a format by the same list hf_export writes (they live in two modules)."""
    from autopeft.exporting import checks, hf_export

    assert tuple(hf_export._WRITERS) == checks.FOLDER_FORMATS == ("peft", "merged")
    with pytest.raises(ExportError, match="unknown export format 'onnx' for a model; valid: peft, merged"):
        checks.check_exportable(tiny_recipe([{"method": "lora", "r": 2}]), "onnx", "hint")
