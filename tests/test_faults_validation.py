"""Validation faults: recipes that cannot run, names that break MLflow, advice on an empty front.

A. Constraints that depend on the backbone, the task or the training length are checked when a recipe
   is loaded or counted (``check_recipe``), so ``count_recipe`` / ``check_composition`` /
   ``load_recipe`` / the CLI reject them with one line instead of training crashing at the first batch.
B. Names a user writes in a search space become MLflow parameter keys: invalid or too long names are
   rejected at load, and the tracker never sends invalid or duplicate keys.
C. When every sampled configuration is over budget, the CLI names the budget and the space's smallest
   configuration (``SearchSpace.smallest_point``).
D. ``train``'s output folder and device are checked before training: a file in the ``-o`` path failed
   at the save, after training (the weights lost), and ``--device tpu`` gave torch's RuntimeError (exit 1).
"""

import types

import pytest
import torch
import yaml
from typer.testing import CliRunner

from autopeft.cli import app, empty_front_advice
from autopeft.searching.space import SearchSpace, SearchSpaceError
from autopeft.composition.recipe import (
    RecipeError, build_model, check_composition, check_recipe, count_recipe, load_recipe, recipe_from_dict,
)
from conftest import TINY_BERT, TINY_ROBERTA

runner = CliRunner()
MINILM = {"preset": "minilm-l6"}  # d=384, 6 layers, d_ff=1536, 512 positions (meta device: no weights)
D, L, FF = 384, 6, 1536


def lstm_prompt(p, d=D):
    """P-Tuning's LSTM prompt encoder (h = d/2, 2 layers): see tests/test_methods_prompt.py."""
    h = d // 2
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    return p * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def recipe(components, backbone="minilm-l6", task="rte", **training):
    return recipe_from_dict({"backbone": backbone, "task": task, "components": components, "training": training})


def one_line_error(res, *parts):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# ----- A. limits of the backbone / task / training, checked at load ---------------------------------------
P_TUNING_400 = {"task": "rte", "components": [{"method": "p_tuning", "num_virtual_tokens": 400}],
                "training": {"max_seq_length": 128}}
PROMPT_MSG = ("components[0] p_tuning: prompt length 400 (num_virtual_tokens) + training.max_seq_length 128 = 528 "
              "exceeds the backbone's 512 positions (max_position_embeddings 512); the largest prompt that fits is 384")


def test_prompt_plus_sequence_beyond_the_positions_is_rejected_by_count_check_and_load(tmp_path):
    r = recipe_from_dict(P_TUNING_400)
    for fn in (count_recipe, check_composition, check_recipe):
        with pytest.raises(RecipeError) as exc:
            fn(r)
        assert str(exc.value) == PROMPT_MSG
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(P_TUNING_400))
    with pytest.raises(RecipeError, match="the largest prompt that fits is 384"):
        load_recipe(path)
    # the largest valid prompt counts, and costs 16 prompt rows (d each) less than the 400 one would
    ok = recipe([{"method": "p_tuning", "num_virtual_tokens": 384}], max_seq_length=128)
    assert count_recipe(ok).trainable_params == lstm_prompt(384) == 2_218_752
    assert lstm_prompt(400) == 2_224_896  # what `autopeft count` used to print for the bad recipe


def test_cli_count_and_train_print_one_error_line_and_exit_2(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(P_TUNING_400))
    one_line_error(runner.invoke(app, ["count", str(path)]), PROMPT_MSG)
    one_line_error(runner.invoke(app, ["train", "--recipe", str(path), "--data-dir", str(tmp_path)]), PROMPT_MSG)


def test_roberta_positions_exclude_the_padding_offset():
    roberta = {"preset": "roberta-base"}  # 514 position embeddings, padding_idx 1: 512 usable
    assert count_recipe(recipe([{"method": "p_tuning", "num_virtual_tokens": 384}], roberta)).trainable_params == \
        lstm_prompt(384, d=768)
    with pytest.raises(RecipeError, match=r"= 513 exceeds the backbone's 512 positions \(max_position_embeddings 514 "
                                          r"less roberta's padding offset 2\); the largest prompt that fits is 384"):
        count_recipe(recipe([{"method": "p_tuning", "num_virtual_tokens": 385}], roberta))
    with pytest.raises(RecipeError, match="training.max_seq_length 513 exceeds the backbone's 512 positions"):
        count_recipe(recipe([], roberta, max_seq_length=513))


@pytest.mark.parametrize("base,usable", [(TINY_BERT, 24), (TINY_ROBERTA, 24)], ids=["bert", "roberta"])
def test_the_checked_limit_is_exactly_where_the_model_breaks(base, usable):
    """T + P = usable positions runs; one token more is rejected by the check and crashes the model."""
    backbone = {**base, "max_position_embeddings": 26 if base is TINY_ROBERTA else 24}
    p = 4
    comp = [{"method": "p_tuning", "num_virtual_tokens": p, "encoder_hidden_size": 8}]
    fits, over = recipe(comp, backbone, max_seq_length=usable - p), recipe(comp, backbone, max_seq_length=usable - p + 1)
    check_recipe(fits)
    with pytest.raises(RecipeError, match=f"exceeds the backbone's {usable} positions"):
        check_recipe(over)
    model = build_model(fits).eval()
    ids = torch.randint(5, 120, (2, usable - p))
    with torch.no_grad():
        assert model(ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 2)
        ids = torch.randint(5, 120, (2, usable - p + 1))
        with pytest.raises((IndexError, RuntimeError)):
            model(ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("component,msg", [
    ({"method": "lora", "layers": [6]}, "components[0] lora: layer index 6 out of range for a 6-layer model"),
    ({"method": "prefix_tuning", "layers": [0, -7]}, "prefix_tuning: layer index -7 out of range"),
    ({"method": "bitfit", "layers": "top"}, "unknown layers 'top'"),
    # was: a component in no layer, 0 trainable parameters, trained as if it were there
    ({"method": "lora", "layers": []}, "components[0] lora: layers [] puts the component in no layer"),
    ({"method": "adapter", "layers": []}, "components[0] adapter: layers [] puts the component in no layer"),
    ({"method": "lora", "r": 385}, "r=385 exceeds the rank 384 of the query matrix (384 x 384) on this backbone: use r <= 384"),
    ({"method": "lora", "r": 385, "target_modules": ["ffn_in"]}, "r=385 exceeds the rank 384 of the ffn_in matrix (384 x 1536)"),
    ({"method": "qlora", "r": 400}, "components[0] qlora: r=400 exceeds the rank 384"),
    ({"method": "adalora", "init_r": 400, "target_r": 8}, "components[0] adalora: init_r=400 exceeds the rank 384"),
    ({"method": "unipelt", "r": 400}, "components[0] unipelt: r=400 exceeds the rank 384"),
    ({"method": "adapter", "reduction_factor": 500}, "reduction_factor=500 gives a 0-wide bottleneck on hidden size 384"),
    ({"method": "unipelt", "reduction_factor": 385}, "unipelt: reduction_factor=385 gives a 0-wide bottleneck"),
    ({"method": "p_tuning", "position": 128}, "position=128 is beyond the input"),
])
def test_backbone_dependent_limits_are_recipe_errors_at_count(component, msg):
    with pytest.raises(RecipeError) as exc:
        count_recipe(recipe([component]))
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_largest_valid_settings_still_count():
    assert count_recipe(recipe([{"method": "lora", "r": 384, "target_modules": ["query"], "layers": [5]}])
                        ).trainable_params == 384 * (D + D)
    assert count_recipe(recipe([{"method": "adapter", "reduction_factor": 384}])).trainable_params == L * (2 * D + 1 + D)
    assert count_recipe(recipe([{"method": "p_tuning", "num_virtual_tokens": 5, "position": 127}])).trainable_params \
        == lstm_prompt(5)


def test_adapter_drop_deeper_than_the_backbone_is_a_recipe_error():
    adapter = {"method": "adapter", "placement": "serial"}
    with pytest.raises(RecipeError, match="components\\[1\\] adapter_drop: n=7 exceeds the model's 6 layers"):
        count_recipe(recipe([adapter, {"method": "adapter_drop", "n": 7}]))
    with pytest.raises(RecipeError, match="max_train_drop=9 exceeds"):
        check_composition(recipe([adapter, {"method": "adapter_drop", "n": 1, "max_train_drop": 9}]))


def test_adalora_schedule_must_fit_the_training_steps():
    # 3,200 examples / batch 32 = 100 steps: tinit 100 leaves no shrinking phase (run_trial failed at step 1)
    bad = recipe([{"method": "adalora", "tinit": 100}], max_train_examples=3200, batch_size=32)
    with pytest.raises(RecipeError, match="tinit=100 and tfinal=0 leave no budget-shrinking phase in the 100 "
                                          "training steps"):
        count_recipe(bad)
    assert count_recipe(recipe([{"method": "adalora", "tinit": 99}], max_train_examples=3200, batch_size=32)
                        ).trainable_params > 0
    # the schedule horizon is schedule_examples when given
    with pytest.raises(RecipeError, match="in the 10 training steps"):
        count_recipe(recipe([{"method": "adalora", "tinit": 5, "tfinal": 5}], max_train_examples=3200,
                            schedule_examples=320, batch_size=32))


def test_heads_that_do_not_divide_the_width_are_a_recipe_error():
    with pytest.raises(RecipeError, match="backbone: hidden_size 100 is not a multiple of num_attention_heads 12"):
        count_recipe(recipe([{"method": "lora"}], {"preset": "minilm-l6", "hidden_size": 100}))


def test_training_only_limits_of_bare_configs(tmp_path):
    """Bare configs tokenise with the BERT tokenizer: a smaller vocabulary or one token type on a pair
    task would crash the first batch; counting them stays possible."""
    small_vocab = recipe([{"method": "lora", "r": 2}], TINY_BERT, task="sst2")
    assert count_recipe(small_vocab).trainable_params == 2 * 2 * 2 * (32 + 32)
    with pytest.raises(RecipeError, match="vocab_size 120 is smaller than the 30,522 tokens"):
        check_recipe(small_vocab, for_training=True)
    from autopeft.backbones import PRESETS

    roberta = dict(PRESETS["roberta-base"])  # the sizes as a bare config (random weights, trainable)
    roberta_pairs = recipe([], roberta, task="rte")
    with pytest.raises(RecipeError, match="type_vocab_size 1 cannot embed the second segment of rte"):
        check_recipe(roberta_pairs, for_training=True)
    check_recipe(recipe([], roberta, task="sst2"), for_training=True)  # one segment: fine
    # a preset counts, never trains: one line, before any weight exists (a 7B preset would fill memory)
    llama = recipe([{"method": "lora"}], {"preset": "llama-2-7b"}, task="sst2")
    assert count_recipe(llama).trainable_params == 32 * 2 * 8 * (4096 + 4096)
    with pytest.raises(RecipeError, match=r"preset 'llama-2-7b' describes sizes for counting only .* use its Hugging "
                                          r"Face id or a local folder"):
        check_recipe(llama, for_training=True)
    from autopeft import api

    with pytest.raises(RecipeError, match="vocab_size 120"):  # before any data is read (tmp_path has none)
        api.train(small_vocab, data_dir=str(tmp_path), log=None)


def test_search_points_that_break_a_limit_are_rejected_when_counted():
    space = SearchSpace.from_dict({"components": {"p_tuning": {"enabled": [True], "num_virtual_tokens": [20, 400]}}})
    base = {"backbone": MINILM, "task": "rte", "training": {"max_seq_length": 128}}
    assert count_recipe(space.to_recipe({"p_tuning.num_virtual_tokens": 20}, base)).trainable_params == lstm_prompt(20)
    with pytest.raises(RecipeError, match="528 exceeds the backbone's 512 positions"):
        count_recipe(space.to_recipe({"p_tuning.num_virtual_tokens": 400}, base))


# ----- B. names that flow into MLflow ---------------------------------------------------------------------
def _adapter_space(key):
    return {"components": {key: {"method": "adapter", "enabled": [True], "placement": "parallel",
                                 "reduction_factor": [16, 32]}}}


def test_a_component_name_too_long_for_mlflow_is_rejected_at_load():
    key = "adapter_" + "x" * 250
    with pytest.raises(SearchSpaceError) as exc:
        SearchSpace.from_dict(_adapter_space(key))
    msg = str(exc.value)
    assert msg.startswith(f"component name {key[:40]!r}... (258 characters) is too long: its MLflow parameter key")
    assert "would have 281 characters, MLflow allows 250; use at most 227 characters" in msg and "\n" not in msg
    # 'space.' + key + '.reduction_factor' is exactly 250 characters at 227
    SearchSpace.from_dict(_adapter_space("a" * 227))
    with pytest.raises(SearchSpaceError, match="use at most 227 characters"):
        SearchSpace.from_dict(_adapter_space("a" * 228))


@pytest.mark.parametrize("data,msg", [
    (_adapter_space("my adapter"), "component name 'my adapter' may only contain letters, digits, '_' and '-'"),
    (_adapter_space("a.b"), "component name 'a.b' may only contain"),
    (_adapter_space("a/b"), "component name 'a/b' may only contain"),
    (_adapter_space("a:b"), "component name 'a:b' may only contain"),
    (_adapter_space("training"), "component name 'training' is reserved"),
    ({"components": {"lora": {}}, "one_of": {"low rank": ["lora"]}}, "one_of group name 'low rank' may only contain"),
    ({"components": {"lora": {}}, "one_of": {"g" * 250: ["lora"]}}, "one_of group name 'gggg"),
    ({"components": {"lora": {}, "adalora": {}}, "one_of": {"a": ["lora"], "b": ["lora", "adalora"]}},
     "'lora' is in two one_of groups (a and b)"),
    ({"components": {"lora": {}}, "training": {"learning rate": [0.1, 0.2]}}, "training has no setting 'learning rate'"),
    ({"components": {"lora": {}}, "fidelity": {"max_examples": 10}}, "fidelity: "),
])
def test_invalid_names_are_search_space_errors(data, msg):
    with pytest.raises(SearchSpaceError) as exc:
        SearchSpace.from_dict(data)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_cli_search_rejects_the_long_component_name_before_starting(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(_adapter_space("adapter_" + "x" * 250)))
    out = tmp_path / "runs"
    res = runner.invoke(app, ["search", "--space", str(path), "--trials", "2", "--max-train-examples", "300",
                              "--output-dir", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    one_line_error(res, "component name 'adapter_xxxx", "is too long")
    assert not out.exists() or not any(out.iterdir())


def test_tracker_logs_long_colliding_and_odd_keys_without_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from autopeft.searching.tracking import SearchTracker, safe_param_items

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    long = "adapter_" + "x" * 250
    tracker = SearchTracker(uri, "faults", "s", {"backbone": {"model_type": "bert", "odd key/with:chars": 1},
                                                    "training": {"seed": 0}, "space": "x" * 7000})
    config = {f"{long}.enabled": True, f"{long}.reduction_factor": 16, "lora.r": 8, "a:b": 1, "a_b": 2}
    run_id = tracker.start_trial("t1", config, {"task": "sst2", "components": [{"method": "lora", "r": 8}]})
    params = MlflowClient(uri).get_run(run_id).data.params
    assert len(params) == len(config) + 2  # recipe.task, recipe.components.0.lora.r
    assert all(len(k) <= 250 for k in params) and len({k for k in params if k.startswith("space.adapter_")}) == 2
    assert params["space.lora.r"] == "8" and params["recipe.components.0.lora.r"] == "8"
    assert params["space.a_b"] == "2" and sum(v == "1" for k, v in params.items() if k.startswith("space.a_b")) == 1
    parent = MlflowClient(uri).get_run(tracker.parent_id).data.params
    # a value over MLflow's 6,000 characters: cut with a visible marker, whole as an artifact (issue 14)
    assert parent["space"].startswith("x" * 5000) and len(parent["space"]) == 6000
    assert parent["space"].endswith("…[cut: 7,000 characters in all; whole value: artifact long_values/params/space.txt]")
    assert parent["backbone.odd key_with_chars"] == "1"
    # the helper: valid short keys unchanged, long ones cut to 250 with a distinguishing hash
    items = dict(safe_param_items({"k" * 300: 1, "k" * 301: 2, "ok.key": 3}))
    assert list(items.values()) == ["1", "2", "3"] and all(len(k) == 250 for k in list(items)[:2])
    assert len(set(items)) == 3 and "ok.key" in items


# ----- C. an all-over-budget search names the budget and the smallest configuration -----------------------
SMALLEST = L * (2 * D * 3 + 3 + D)  # a parallel FFN adapter with reduction factor 128: bottleneck 384 // 128 = 3


def test_smallest_point_of_the_default_space_on_minilm():
    space = SearchSpace.load("default")
    base = {"backbone": MINILM, "task": "sst2", "training": {}}
    point, n = space.smallest_point(base)
    assert n == SMALLEST == 16_146
    r = space.to_recipe(point, base)
    (adapter,) = r.components
    assert (adapter.method, adapter.reduction_factor, adapter.resolved_sublayers(), r.gating) == \
        ("adapter", 128, ["ffn"], False)
    assert count_recipe(r).trainable_params == n
    assert space.describe_point(point) == "adapter (placement=parallel, reduction_factor=128, sublayers=[ffn])"


def test_smallest_point_skips_invalid_points_and_respects_one_of():
    space = SearchSpace.from_dict({
        "one_of": {"lowrank": ["lora", "adalora"]},
        "components": {"lora": {"r": [8, 4], "target_modules": [["query", "value"], ["value"]]},
                       "adalora": {"init_r": [4], "target_r": [2], "target_modules": [["value"]]},
                       "p_tuning": {"num_virtual_tokens": [600, 1]}},  # 600 breaks the 512 positions
        "gating": [True, False]})
    point, n = space.smallest_point({"backbone": MINILM, "task": "sst2", "training": {}})
    # lora r=4 on value: 6 * 4 * 768 = 18,432 < adalora 6 * 4 * 769 = 18,456 < p_tuning(1) = 1,088,640
    assert n == 6 * 4 * (D + D) == 18_432
    assert space.describe_point(point) == "lora (r=4, target_modules=[value])"


def _result(statuses, tmp_path, errors=None, settings=None):
    trials = [{"trial_id": str(i), "status": s, "error": (errors or {}).get(i)} for i, s in enumerate(statuses)]
    return types.SimpleNamespace(trials=trials, pareto=[], param_limit=10_000, fidelity=3000, path=tmp_path,
                                 settings=settings or {}, hypervolume=0.0, wall_time_s=60.0, mlflow_run_id="r")


def test_empty_front_advice_names_the_cause(tmp_path):
    summary = "adapter (placement=parallel, reduction_factor=128, sublayers=[ffn])"
    assert empty_front_advice(_result(["over_budget"] * 3, tmp_path), (summary, 16_146)) == (
        "every sampled configuration exceeded the budget of 10,000 parameters; the smallest configuration of this "
        f"space, {summary}, has 16,146 trainable parameters: raise --budget to at least 16,146 (--budget 16146)")
    assert empty_front_advice(_result(["over_budget", "invalid", "over_budget"], tmp_path), (summary, 16_146)).startswith(
        "no sampled configuration fit the budget of 10,000 parameters (2 over it, 1 invalid); the smallest")
    assert empty_front_advice(_result(["over_budget"], tmp_path), (summary, 9_000)).endswith(
        "has 9,000 trainable parameters, within it: sample more configurations (--trials)")
    failed = _result(["failed", "over_budget", "failed"], tmp_path, errors={0: "ValueError: boom\ntrace"})
    assert empty_front_advice(failed) == f"every trained trial failed (first: ValueError: boom); see {tmp_path / 'trials.json'}"
    invalid = _result(["invalid", "empty"], tmp_path, errors={0: "RecipeError: too long"})
    assert empty_front_advice(invalid) == ("every sampled configuration was rejected before training (1 invalid, 1 empty) "
                                           f"(first: RecipeError: too long); see {tmp_path / 'trials.json'}")
    assert empty_front_advice(_result(["stopped_early", "over_budget"], tmp_path)) == (
        "no trial reached 3,000 training examples within budget: raise --time-budget or lower --max-train-examples")
    assert empty_front_advice(_result([], tmp_path)) == "no trial ran within the time budget: raise --time-budget"


def test_all_over_budget_search_prints_the_smallest_configuration(tmp_path, capsys):
    from autopeft.cli import _print_front

    settings = {"space": "default", "backbone": MINILM, "task": "sst2", "training": {}, "budget": "10k"}
    _print_front(_result(["over_budget"] * 4, tmp_path, settings=settings))
    out = capsys.readouterr().out
    assert ("every sampled configuration exceeded the budget of 10,000 parameters; the smallest configuration of this "
            "space, adapter (placement=parallel, reduction_factor=128, sublayers=[ffn]), has 16,146 trainable "
            "parameters: raise --budget to at least 16,146") in out
    assert "--time-budget" not in out


def test_a_tracking_store_that_cannot_open_is_one_line_and_leaves_no_search_folder(tmp_path):
    """A mistyped --tracking-uri used to leave search.json behind without resume.json: the same --name
    was then refused ("already exists") and --resume refused too ("started by an autopeft without resume")."""
    from pathlib import Path

    from conftest import GLUE_DIR

    space = Path(__file__).parent / "data" / "tiny_space.yaml"
    res = runner.invoke(app, ["search", "--task", "rte", "--budget", "50k", "--space", str(space), "--trials", "1",
                              "--max-train-examples", "64", "--data-dir", str(GLUE_DIR), "--name", "typo",
                              "--output-dir", str(tmp_path), "--tracking-uri", "sqlit:///m.db", "--quiet"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: cannot open MLflow experiment 'autopeft' at tracking URI 'sqlit:///m.db': "), res.output
    assert not (tmp_path / "typo").exists()  # nothing half-made: the same command with the right URI runs


def test_error_lines_never_raise_on_an_empty_message():
    """``str(exc).splitlines()[0]`` raised IndexError on an exception without a message (an ``OSError()``
    from a backbone's weights): the one-line error became a traceback. One helper now, everywhere."""
    from autopeft.errors import first_line, one_line

    assert first_line(OSError()) == "OSError" and first_line(OSError(), with_type=True) == "OSError"
    assert first_line(ValueError("\n  bad value \nmore")) == "bad value"
    assert first_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert first_line("  \n") == "" and first_line("x\ny") == "x"
    assert one_line(RuntimeError("loss became nan\n  at step 2")) == "RuntimeError: loss became nan at step 2"
    assert one_line(KeyError()) == "KeyError"


def test_weights_that_fail_to_load_without_a_message_are_one_line(monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from autopeft.backbones import BackboneError, load_model

    def broken(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", broken)
    with pytest.raises(BackboneError) as err:
        load_model("minilm-l6", 2)
    assert str(err.value) == "cannot load weights of 'minilm-l6': OSError"


def test_no_module_cuts_an_error_to_its_first_line_by_hand():
    """The kind stays fixed: every place that shortens an error uses errors.first_line / one_line."""
    import re
    from pathlib import Path

    import autopeft

    root = Path(autopeft.__file__).parent
    files = [*root.rglob("*.py"), *(p for d in ("benchmarks", "experiments", "dashboards")
                                    for p in (root.parent / d).glob("*.py"))]
    cut = re.compile(r"(?<!__doc__)\.splitlines\(\)\[0\]")  # a module's own docstring is never empty
    offenders = [str(p.relative_to(root.parent)) for p in files if p.name != "errors.py" and cut.search(p.read_text())]
    assert offenders == []


def test_the_summary_says_which_trials_the_time_budget_cut(tmp_path, capsys):
    from autopeft import cli

    result = _result(["stopped_early", "finished", "stopped_early"], tmp_path, settings={"task": "sst2", "budget": "0.5%"})
    result.trials[0]["cut"] = {"examples_seen": 20_000, "train_time_s": 90.0}
    result.pareto, result.reference = [], None
    cli._print_front(result)
    out = capsys.readouterr().out
    assert "trials: 1 finished, 2 stopped_early (1 cut by the time budget, at 20,000 examples); hypervolume" in out


def test_a_recipe_error_names_every_bad_field_in_one_line(tmp_path):
    """A recipe with four bad fields: one line naming all four, not the first one per try."""
    bad = {"backbone": MINILM, "task": "sst2", "components": [{"method": "lora", "r": -4, "bogus": 1}],
           "training": {"learning_rate": -1, "batch_size": 0}}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    assert str(err.value) == ("components: [0] lora.r: Input should be greater than or equal to 1; "
                              "[0] lora.bogus: Extra inputs are not permitted; "
                              "training.learning_rate: Input should be greater than 0; "
                              "training.batch_size: Input should be greater than or equal to 1")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    res = runner.invoke(app, ["count", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "lora.bogus" in res.output and "training.batch_size" in res.output


@pytest.mark.parametrize("task, msg", [
    ({"name": "x", "source": "a.csv", "text_columns": ["t"], "labels": ["a", "b"], "regression": "maybe"},
     "task: regression: Input should be a valid boolean, unable to interpret input"),
    (5, "task: a task name or a task spec mapping, got int 5"),
])
def test_a_bad_task_spec_names_the_spec_field_not_the_union_member(task, msg):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"backbone": MINILM, "task": task, "components": []})
    assert str(err.value) == msg


# --- D. train's output folder and device, before any training ---

def _trainable_recipe_file(tmp_path):
    from test_precision import recipe as trainable  # a backbone with the tokenizer's 30,522 ids: trainable

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(trainable().model_dump(mode="json")))
    return path


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_train_refuses_an_output_under_a_file_before_training(tmp_path, monkeypatch, where):
    import autopeft.training.trainer as trainer

    path = _trainable_recipe_file(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(trainer, "run_trial", lambda *a, **k: pytest.fail("trained before the output was checked"))
    res = runner.invoke(app, ["train", "--recipe", str(path), "-o", str(tmp_path / where)])
    why = "is a file, not a folder" if where == "afile" else f"cannot be created: {str(tmp_path / 'afile')!r} is a file"
    one_line_error(res, f"output folder {str(tmp_path / where)!r} {why}" + ("" if where == "afile" else ", not a folder"))


@pytest.mark.parametrize("device,msg", [("tpu", "unknown device 'tpu': use cpu, cuda or cuda:N"),
                                        ("cuda:99", "device 'cuda:99': ")])
def test_train_refuses_a_device_it_cannot_use_in_one_line(tmp_path, device, msg):
    from autopeft.training.setup import DeviceError, pick_device

    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match=msg):
        pick_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees no CUDA GPU; use --device cpu"):
            pick_device("cuda")
    path = _trainable_recipe_file(tmp_path)
    res = runner.invoke(app, ["train", "--recipe", str(path), "--device", device, "--data-dir", str(tmp_path),
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()
