"""Caches answer only for inputs they saw (issue 14, case 3; huggingface/datasets PR#7982, #3847).

The on-disk token cache was keyed by the tokenizer's class name, ``name_or_path``, vocabulary size
and max length plus the texts joined by control characters: a folder's tokenizer made cased and
reloaded from the same path read the uncased tokens back, a tokenizer truncating on the left read
the right-truncated ones, and a text holding the join character read a pair's tokens. The other
caches and memos: the per-process table cache did not see the files of a local ``hf:`` folder
change, and the checkpoint memo skipped writing a checkpoint that was not there.
"""

import json
import shutil

import numpy as np
import pytest

from autopeft.backbones import load_tokenizer, minilm_path
from autopeft.data.tasks import Split
from autopeft.training.batches import encode_split


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path / "tokens"))
    return tmp_path / "tokens"


@pytest.fixture
def tok_folder(tmp_path):
    """A backbone folder's tokenizer files (the bundled MiniLM's: BERT, uncased)."""
    folder = tmp_path / "backbone"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def _split(*texts) -> Split:
    return Split([t if isinstance(t, tuple) else (t,) for t in texts], np.zeros(len(texts), dtype=np.int64))


def _tokens(tokenizer, enc) -> list[list[str]]:
    return [tokenizer.convert_ids_to_tokens(enc.ids[a:b].tolist()) for a, b in zip(enc.offsets, enc.offsets[1:])]


def test_a_folder_tokenizer_made_cased_does_not_read_the_uncased_tokens(cache, tok_folder):
    split = _split("Great movie , Paris")
    uncased = load_tokenizer(str(tok_folder))
    assert _tokens(uncased, encode_split(split, uncased, 32)) == [["[CLS]", "great", "movie", ",", "paris", "[SEP]"]]
    config = json.loads((tok_folder / "tokenizer_config.json").read_text())
    (tok_folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    cased = load_tokenizer(str(tok_folder))  # the same path, class, vocabulary size
    # the cased vocabulary-less words are unknown: what the tokenizer itself says, not the cache
    assert _tokens(cased, encode_split(split, cased, 32)) == [["[CLS]", "[UNK]", "movie", ",", "[UNK]", "[SEP]"]]
    assert len(list(cache.glob("*.npz"))) == 2


def test_truncation_side_and_pair_handling_are_part_of_the_key(cache):
    tok = load_tokenizer("minilm-l6")
    long = _split("one two three four five six seven")
    assert _tokens(tok, encode_split(long, tok, 5)) == [["[CLS]", "one", "two", "three", "[SEP]"]]
    left = load_tokenizer("minilm-l6")
    left.truncation_side = "left"
    assert _tokens(left, encode_split(long, left, 5)) == [["[CLS]", "five", "six", "seven", "[SEP]"]]
    # a pair, then the single text that its parts joined by the old key's separator make
    pair = _split(("good", "film"))
    assert _tokens(tok, encode_split(pair, tok, 16)) == [["[CLS]", "good", "[SEP]", "film", "[SEP]"]]
    single = _split("good\x1ffilm")
    assert _tokens(tok, encode_split(single, tok, 16)) == _tokens(tok, encode_split(single, tok, 16, cache=False))
    assert encode_split(single, tok, 16).types.tolist() == [0] * len(encode_split(single, tok, 16).ids)


def test_the_same_tokenizer_and_texts_still_hit_the_cache(cache, tok_folder, monkeypatch):
    split = _split("a good film", "a bad one")
    first = encode_split(split, load_tokenizer(str(tok_folder)), 32)
    copy = tok_folder.parent / "copy"
    shutil.copytree(tok_folder, copy)
    tok = load_tokenizer(str(copy))  # another folder, the same tokenizer: same key
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenised again"))
    again = encode_split(split, tok, 32)
    assert again.ids.tolist() == first.ids.tolist() and len(list(cache.glob("*.npz"))) == 1


def test_the_table_cache_sees_a_local_hf_folder_change(tmp_path, monkeypatch):
    import datasets

    from autopeft.data.userdata import read_tables

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\nfirst,a\nsecond,b\n")
    assert read_tables(f"hf:{folder}")["train"]["text"].tolist() == ["first", "second"]
    (folder / "train.csv").write_text("text,label\nthird,a\nfourth,b\nfifth,a\n")
    assert read_tables(f"hf:{folder}")["train"]["text"].tolist() == ["third", "fourth", "fifth"]


def test_the_checkpoint_memo_writes_a_checkpoint_that_is_not_there(tmp_path):
    """A search removed and started again under its name, in one process, within the memo's 5 s."""
    from types import SimpleNamespace

    from autopeft.searching.resume import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    state = SimpleNamespace(get_state=lambda: {}, resume_state=lambda: {})
    assert save_checkpoint(tmp_path, {}, state, state, state, 1.0)
    (tmp_path / CHECKPOINT_FILE).unlink()
    assert save_checkpoint(tmp_path, {}, state, state, state, 2.0)
    assert load_checkpoint(tmp_path)["elapsed_s"] == 2.0


def test_a_search_points_trained_weights_are_reused_only_for_the_data_they_were_trained_on(tmp_path, monkeypatch):
    """``export --format peft`` trains a search point into <search>/trained/<trial> and reuses it; with
    another --data-dir (other sst2 files) it reused the weights of the first data."""
    from typer.testing import CliRunner

    from autopeft import api
    from autopeft.cli import app
    from autopeft.composition.recipe import build_model
    from autopeft.training.saved import save_trained
    from conftest import tiny_recipe

    recipe = tiny_recipe([{"method": "lora", "r": 2}])
    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    row = {"trial_id": "t1", "score": 0.8, "trainable_params": 1, "trainable_percent": 0.1, "peak_memory_bytes": 1,
           "examples_seen": 32, "recipe": recipe.model_dump(mode="json")}
    (folder / "pareto.json").write_text(json.dumps([row]))
    (folder / "search.json").write_text(json.dumps({"searcher": "tpe", "seed": 0, "budget": "1%"}))
    data = {}
    for name, word in (("a", "good"), ("b", "bad")):
        (tmp_path / name / "sst2").mkdir(parents=True)
        for split in ("train", "validation"):
            (tmp_path / name / "sst2" / f"{split}.tsv").write_text(f"sentence\tlabel\n{word}\t1\n{word} film\t0\n")
        data[name] = str(tmp_path / name)
    calls = []

    def fake_train(r, data_dir=None, output_dir=None, log=None, **kw):
        calls.append(data_dir)
        save_trained(build_model(r), r, None, output_dir)

    monkeypatch.setattr(api, "train", fake_train)
    monkeypatch.delenv("AUTOPEFT_DATA_DIR", raising=False)
    runner = CliRunner()

    def export(name, out):
        res = runner.invoke(app, ["export", str(folder), "--format", "peft", "--data-dir", data[name],
                                  "-o", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
        return res.output

    export("a", "p1")
    assert "using the trained weights" in export("a", "p2") and calls == [data["a"]]  # same data: reused
    assert "trained on other data" in export("b", "p3")
    assert calls == [data["a"], data["b"]]  # other data: trained again, not the weights of "a"
    assert "using the trained weights" in export("b", "p4") and len(calls) == 2
