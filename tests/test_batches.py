"""Length-grouped batches and the on-disk token cache: less padding, the same examples, the same tokens."""

import numpy as np
import pytest
import torch

from autopeft.data.tasks import Split
from autopeft.training.batches import Batches, encode_split, length_grouped_order, padding_fraction, train_order


def test_length_grouped_order_sees_every_example_once_per_epoch_and_is_seeded():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    order = length_grouped_order(lengths, 2500, 32, seed=5)
    assert len(order) == 2500
    assert sorted(order[:1000]) == list(range(1000)) and sorted(order[1000:2000]) == list(range(1000))
    assert np.array_equal(order, length_grouped_order(lengths, 2500, 32, seed=5))
    assert not np.array_equal(order, length_grouped_order(lengths, 2500, 32, seed=6))


def test_length_grouping_cuts_padding_on_real_sst2(glue_dir):
    from autopeft.backbones import load_tokenizer
    from autopeft.data.tasks import get_task, load_split

    split = load_split(get_task("sst2"), "train", glue_dir)
    lengths = encode_split(split, load_tokenizer("minilm-l6"), 128).lengths
    random_pad = padding_fraction(lengths, train_order(len(lengths), 24000, 0), 32)
    grouped_pad = padding_fraction(lengths, length_grouped_order(lengths, 24000, 32, 0), 32)
    assert random_pad > 0.6  # measured: 67% of padded tokens are padding with random batches
    assert grouped_pad < 0.15


def test_cached_tokens_equal_the_tokenizer_and_batches_pad_like_it(tmp_path, monkeypatch):
    from autopeft.backbones import load_tokenizer

    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path))
    tok = load_tokenizer("minilm-l6")
    split = Split([("a short one", "and its pair"), ("a much longer first sentence here", "b"), ("x", "y z")],
                  np.array([0, 1, 0]))
    first = encode_split(split, tok, 16)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = encode_split(split, tok, 16)  # read back from the cache
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.types, again.types)
    b = Batches(split, tok, 16, torch.device("cpu")).batch([0, 1, 2])
    ref = tok(["a short one", "a much longer first sentence here", "x"], ["and its pair", "b", "y z"],
              truncation=True, max_length=16, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(b[k], ref[k]), k
    assert b["labels"].tolist() == [0, 1, 0]


def test_evaluation_order_does_not_change_the_score(glue_dir):
    """Evaluation runs length-sorted batches; predictions land back on their examples."""
    from autopeft.backbones import load_tokenizer
    from autopeft.composition.recipe import build_model, recipe_from_dict
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.scoring import evaluate

    task = get_task("sst2")
    split = load_split(task, "validation", glue_dir)
    model = build_model(recipe_from_dict({"task": "sst2", "pooling": "mean"}))
    batches = Batches(split, load_tokenizer("minilm-l6"), 128, torch.device("cpu"))
    score = evaluate(model, task, batches, 64, 96)["accuracy"]
    model.eval()
    with torch.no_grad():
        b = batches.batch(range(96))
        labels = b.pop("labels")
        direct = int((model(**b).logits.argmax(-1) == labels).sum()) / 96
    assert score == direct
