"""The CLI: one-line errors with exit code 2 before anything starts; count and export outputs."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from autopeft.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args,msg", [
    (["--budget", "-1"], "invalid budget '-1': it must be positive"),
    (["--budget", "0"], "it must be positive"),
    (["--budget", "150%"], "cannot exceed 100%"),
    (["--budget", "lots"], "invalid budget 'lots'"),
    (["--task", "imdb"], "unknown task 'imdb'; valid: sst2, cola"),
    (["--space", "nope"], "search space 'nope' not found"),
    (["--time-budget", "soon"], "invalid time budget"),
])
def test_search_rejects_bad_input_with_one_line_and_exit_2(args, msg, tmp_path):
    res = runner.invoke(app, ["search", *args, "--output-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert msg in res.output and len(res.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing was started


def test_count_json_for_lora_r8_query_value_on_minilm(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"backbone": "minilm-l6", "task": "sst2",
                                    "components": [{"method": "lora", "r": 8, "target_modules": ["query", "value"]}]}))
    res = subprocess.run([sys.executable, "-m", "autopeft.cli", "count", str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"trainable_params": 73728, "backbone_params": 22713216,
                                      "trainable_percent": pytest.approx(0.3246039662547), "head_params": 770,
                                      "pooling": "pooler",
                                      # 22,713,986 weights; nf4: 6 layers x 6 Linear + the pooler's at 4.127 bits
                                      "weight_bytes": {"fp32": 90_855_944, "bf16": 45_427_972, "nf4": 29_452_360}}


@pytest.mark.parametrize("content,msg", [
    ({"components": [{"method": "lorax"}]}, "unknown method 'lorax'; valid:"),
    ({"task": "sst3"}, "unknown task 'sst3'"),
    ({"components": [{"method": "lora"}, {"method": "lora"}]}, "both claim"),
    ("not: [valid", "not valid YAML"),
    # PyYAML keeps the last of two equal keys silently: this recipe would have trained r=16
    ("components:\n  - method: lora\n    r: 4\n    r: 16\n", "key 'r' appears twice in one mapping (line 4)"),
    # any hashable key, not only strings and numbers: `~` is null too
    ("null: 1\n~: 2\n", "key None appears twice in one mapping (line 2)"),
])
def test_count_bad_recipes_exit_2(content, msg, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    res = runner.invoke(app, ["count", str(path)])
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_recipe_file_and_missing_search(tmp_path):
    res = runner.invoke(app, ["train", "--recipe", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["export", "nosuch", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "no finished search 'nosuch'" in res.output


@pytest.mark.parametrize("args,msg", [(["--trials", "0"], "--trials must be at least 1, got 0"),
                                      (["--max-train-examples", "-5"], "--max-train-examples must be at least 1")])
def test_non_positive_counts_are_one_line_errors(args, msg, tmp_path):
    res = runner.invoke(app, ["search", *args, "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1


def test_max_train_examples_scales_the_rungs():
    from dataclasses import replace

    from autopeft.searching.space import SearchSpace

    fid = SearchSpace.load("default").fidelity
    assert replace(fid, max_train_examples=3000, min_train_examples=round(3000 / 9)).rungs() == [333, 999, 3000]


def test_searcher_help_names_every_registered_searcher():
    """The --searcher help is written by hand (importing the registry would load Optuna for every
    CLI call): it must name exactly the registered searchers."""
    import inspect
    import re

    from autopeft import cli
    from autopeft.searching.searchers import SEARCHERS

    help_text = inspect.signature(cli.search).parameters["searcher"].default.help
    listed = [re.match(r"\w+", item).group() for item in help_text.split(":", 1)[1].strip().split(", ")]
    assert listed == list(SEARCHERS), help_text


@pytest.mark.parametrize("argv,line", [
    (["search", "--bogus"], "error: No such option: --bogus; see `root search --help`"),
    (["export"], "error: Missing argument 'search'; see `root export --help`"),
    (["search", "--trials", "many"], "error: Invalid value for '--trials': *; see `root search --help`"),
    (["fusion", "stage1"], "error: Missing argument 'tasks'; see `root fusion stage1 --help`"),
])
def test_usage_errors_are_one_line_like_every_other_bad_input(argv, line, tmp_path, monkeypatch):
    """The option parser's own errors were click's boxed usage panel (5+ lines); now one ``error:`` line."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, argv)
    head, _, tail = line.partition("*")  # * : the parser's own wording, which differs between typer versions
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(head) and res.output.endswith((tail or "") + "\n"), res.output
    assert list(tmp_path.iterdir()) == []


def test_help_and_a_bare_command_still_print_the_help():
    res = runner.invoke(app, ["search", "--help"])
    assert res.exit_code == 0 and "--budget" in res.output and "--searcher" in res.output
    res = runner.invoke(app, [])
    assert res.exit_code == 2 and "search" in res.output and "export" in res.output and "error:" not in res.output


def test_data_dir_and_tracking_uri_fall_back_to_their_environment_variables(tmp_path, monkeypatch):
    """``--data-dir`` reads ``AUTOPEFT_DATA_DIR`` and ``--tracking-uri`` reads ``MLFLOW_TRACKING_URI``
    when not given (README); each is seen in the one-line error it leads to, before any trial."""
    from pathlib import Path

    from conftest import GLUE_DIR

    monkeypatch.setenv("AUTOPEFT_DATA_DIR", str(tmp_path / "no-glue"))
    res = runner.invoke(app, ["search", "--task", "rte", "--output-dir", str(tmp_path / "runs")])
    assert (res.exit_code, res.output) == (2, f"error: data dir '{tmp_path / 'no-glue'}' does not exist\n")
    monkeypatch.setenv("AUTOPEFT_DATA_DIR", str(GLUE_DIR))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlit:///typo.db")
    space = Path(__file__).parent / "data" / "tiny_space.yaml"
    res = runner.invoke(app, ["search", "--task", "rte", "--budget", "50k", "--space", str(space),
                              "--output-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and res.output.startswith(
        "error: cannot open MLflow experiment 'autopeft' at tracking URI 'sqlit:///typo.db': "), res.output
    assert not (tmp_path / "runs").exists()


def test_methods_lists_every_method_with_its_paper():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    rows = [line.split() for line in res.output.strip().splitlines()]
    assert rows == [["bitfit", "arXiv:2106.10199"], ["prefix_tuning", "arXiv:2101.00190"],
                    ["p_tuning", "arXiv:2103.10385"], ["p_tuning_v2", "arXiv:2110.07602"],
                    ["adapter", "arXiv:1902.00751"], ["adapter_fusion", "arXiv:2005.00247"],
                    ["adapter_drop", "arXiv:2010.11918"], ["lora", "arXiv:2106.09685"],
                    ["adalora", "arXiv:2303.10512"], ["qlora", "arXiv:2305.14314"], ["mam", "arXiv:2110.04366"],
                    ["unipelt", "arXiv:2110.07577"], ["full_finetuning", "arXiv:1810.04805"]]
