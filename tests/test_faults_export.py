"""Export faults found by trying it as a user (each kept as a test that fails without its fix): an
``--overwrite`` export onto its own source deleted the model; the recipe export replaced an existing
file silently and gave exit 1 for a folder; a broken ``pareto.json`` and odd ``--pick`` values gave
raw errors; folders and binary files given as recipes were "missing" or a decode error."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autopeft.cli import app
from autopeft.composition.recipe import build_model
from autopeft.training.saved import is_trained_folder, save_trained
from conftest import tiny_recipe

runner = CliRunner()
LORA = [{"method": "lora", "r": 2, "target_modules": ["query", "value"]}]


def _trained(tmp_path, name="trained"):
    recipe = tiny_recipe(LORA, pooling="mean")
    model = build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    return save_trained(model, recipe, None, tmp_path / name)


def _search(tmp_path, rows=None):
    folder = tmp_path / "runs" / "s1"
    folder.mkdir(parents=True)
    recipe = tiny_recipe(LORA).model_dump(mode="json")
    rows = rows if rows is not None else [
        {"trial_id": "trial_0001", "score": 0.8, "trainable_params": 100, "peak_memory_bytes": 5, "recipe": recipe},
        {"trial_id": "trial_0002", "score": 0.7, "trainable_params": 50, "recipe": recipe}]  # an older row: no memory
    (folder / "pareto.json").write_text(json.dumps(rows) if not isinstance(rows, str) else rows)
    (folder / "search.json").write_text(json.dumps({"searcher": "tpe", "seed": 0}))
    return folder


def _one_error_line(res, code=2):
    lines = res.output.strip().splitlines()
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_an_overwrite_export_onto_its_own_source_is_refused_and_the_model_kept(tmp_path):
    src = _trained(tmp_path)
    for out in (src, tmp_path):  # the source itself, and a folder holding it
        line = _one_error_line(runner.invoke(app, ["export", str(src), "--merge", "-o", str(out), "--overwrite"]))
        assert "which is being exported: pick another -o" in line
        assert is_trained_folder(src)  # was: deleted, exit 0


def test_an_export_into_the_search_folder_is_refused_before_training(tmp_path):
    folder = _search(tmp_path)
    line = _one_error_line(runner.invoke(app, ["export", str(folder), "--format", "peft",
                                               "-o", str(folder / "trained"), "--overwrite", "--no-train"]))
    assert line == f"error: -o {folder / 'trained'} is inside the search folder {folder}: pick a folder outside it"


def test_the_recipe_export_keeps_an_existing_file_unless_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _search(tmp_path)
    (tmp_path / "best.yaml").write_text("keep me\n")
    line = _one_error_line(runner.invoke(app, ["export", str(folder)]))
    assert line == "error: best.yaml exists: pick another -o, or pass --overwrite to replace it"
    assert (tmp_path / "best.yaml").read_text() == "keep me\n"  # was: replaced, exit 0
    res = runner.invoke(app, ["export", str(folder), "--overwrite"])
    assert res.exit_code == 0 and "trial trial_0001" in (tmp_path / "best.yaml").read_text()
    (tmp_path / "taken").mkdir()
    line = _one_error_line(runner.invoke(app, ["export", str(folder), "-o", "taken"]))  # was: IsADirectoryError, exit 1
    assert line == "error: -o taken is a folder: give the recipe file to write (e.g. taken/best.yaml)"


def test_pick_on_a_trained_folder_is_refused_in_every_format(tmp_path):
    src = _trained(tmp_path)
    for fmt in ("recipe", "peft"):  # was: the recipe format ignored --pick, exit 0
        line = _one_error_line(runner.invoke(app, ["export", str(src), "--format", fmt, "--pick", "3",
                                                   "-o", str(tmp_path / f"out-{fmt}")]))
        assert line.endswith("holds one trained model; --pick applies to searches")


@pytest.mark.parametrize("content,what", [("{", "Expecting property name"), ('{"a": 1}', "not a list of records"),
                                          ('["x"]', "not a list of records")])
def test_a_broken_pareto_json_is_named_in_one_line(tmp_path, content, what):
    folder = _search(tmp_path, content)
    line = _one_error_line(runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "x.yaml")]))
    assert line.startswith(f"error: cannot read {folder / 'pareto.json'}: ") and what in line


@pytest.mark.parametrize("fmt,out", [("recipe", "file/x.yaml"), ("peft", "file/x"), ("peft", "file")])
def test_an_export_under_a_file_is_one_line_naming_the_file(tmp_path, fmt, out):
    """Was: ``FileExistsError: [Errno 17] File exists: '.../file'`` (exit 1) for a file in the -o path."""
    (tmp_path / "file").write_text("x")
    line = _one_error_line(runner.invoke(app, ["export", str(_trained(tmp_path)), "--format", fmt, "--overwrite",
                                               "-o", str(tmp_path / out)]))
    assert line.endswith("is a file, not a folder") and repr(str(tmp_path / "file")) in line, line
    assert (tmp_path / "file").read_text() == "x"


def test_odd_picks(tmp_path):
    from autopeft.searching.runs import pick_point

    folder = _search(tmp_path)
    line = _one_error_line(runner.invoke(app, ["export", str(folder), "--pick", "²", "-o", str(tmp_path / "x.yaml")]))
    assert line.startswith("error: unknown pick '²'")  # was: int() of a Unicode digit
    assert pick_point(folder, "leanest")[1]["trial_id"] == "trial_0001"  # was: KeyError on the row without memory
    assert pick_point(folder, "1")[1]["trial_id"] == "trial_0002"


def test_folders_and_binary_files_given_as_recipes(tmp_path):
    src = _trained(tmp_path)
    line = _one_error_line(runner.invoke(app, ["count", str(src)]))
    assert line == (f"error: recipe file '{src}' is a folder: give the YAML file (a trained output: its recipe is "
                    "recipe.yaml inside it)")  # was: "does not exist"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    for cmd in (["count", str(binary)], ["train", "--recipe", str(binary)]):
        line = _one_error_line(runner.invoke(app, cmd))
        assert line.startswith(f"error: {binary}: not a UTF-8 text file (")  # was: the codec's message alone


def test_predict_refuses_to_write_over_its_input(tmp_path):
    src = _trained(tmp_path)
    data = tmp_path / "in.csv"
    data.write_text("sentence,extra\ngood film,1\n")
    line = _one_error_line(runner.invoke(app, ["predict", str(src), "-i", str(data), "-o", str(data)]))
    assert "is the --input file" in line and data.read_text() == "sentence,extra\ngood film,1\n"


def test_a_missing_search_names_an_absolute_path_once(tmp_path):
    line = _one_error_line(runner.invoke(app, ["status", str(tmp_path / "nothing")]))
    assert line.count(str(tmp_path / "nothing" / "search.json")) == 1
