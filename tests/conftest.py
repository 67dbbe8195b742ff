"""Shared test fixtures: tiny random-initialised backbones built from configs (no download)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: A tiny BERT: 2 layers, d=32, 4 heads, FFN 37 (odd on purpose: catches d/d_ff mix-ups). Its 160
#: positions hold the default training.max_seq_length (128) plus a 32-token prompt, so recipes on it
#: pass ``check_recipe`` (RoBERTa: 170 embeddings less the padding offset 2 = 168 positions).
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 160}
TINY_ROBERTA = {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 37, "vocab_size": 120, "max_position_embeddings": 170,
                "pad_token_id": 1, "type_vocab_size": 1}

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def tiny_recipe(components, backbone=None, **kw):
    """A validated recipe on a tiny random backbone."""
    from autopeft.composition.recipe import recipe_from_dict

    return recipe_from_dict({"backbone": backbone or TINY_BERT, "task": "sst2", "components": components, **kw})


def tiny_inputs(batch=3, length=7, vocab=120, seed=0):
    """Random ``input_ids`` (B, T) and an attention mask with padding in the last example."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return ids, mask


@pytest.fixture
def glue_dir():
    if not (GLUE_DIR / "sst2" / "train.tsv").exists():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR
