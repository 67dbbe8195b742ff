"""LoRA's zero inference cost: after merging ``W + (alpha/r) B A`` the model runs as fast as the base.

Times, side by side in one run on MiniLM-L6 (real weights) and a batch of real SST-2 validation
sentences: the base model, LoRA unmerged (extra ``B A x`` per wrapped Linear) and LoRA merged.
Prints median milliseconds per batch and ratios to the base model; also checks merged == unmerged.

    python benchmarks/lora_merge_speed.py --data-dir ../shared/data/glue [--targets query value ffn_in ffn_out]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from autopeft.backbones import load_tokenizer
from autopeft.methods.lora import merge_lora
from autopeft.composition.recipe import build_model, recipe_from_dict
from autopeft.data.tasks import get_task, load_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["query", "key", "value", "attention_output", "ffn_in", "ffn_out"])
    a = p.parse_args(argv)
    torch.manual_seed(0)
    split = load_split(get_task("sst2"), "validation", a.data_dir)
    tok = load_tokenizer("minilm-l6")
    enc = tok([t[0] for t in split.texts[: a.batch]], padding=True, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    base = build_model(recipe_from_dict({"components": []})).eval()
    lora = build_model(recipe_from_dict({"components": [{"method": "lora", "r": a.r, "target_modules": a.targets}]})).eval()
    with torch.no_grad():  # train-like LoRA weights: B non-zero
        for n, prm in lora.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    merged = build_model(recipe_from_dict({"components": [{"method": "lora", "r": a.r, "target_modules": a.targets}]})).eval()
    merged.load_state_dict(lora.state_dict())
    merge_lora(merged)
    models = {"base": base, "lora unmerged": lora, "lora merged": merged}
    times = {k: [] for k in models}
    with torch.no_grad():
        diff = (lora(**inputs).logits - merged(**inputs).logits).abs().max().item()
        for m in models.values():  # warm-up
            m(**inputs)
        for _ in range(a.repeats):  # interleaved, so drifts in machine load hit every variant alike
            for k, m in models.items():
                t = time.perf_counter()
                m(**inputs)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"MiniLM-L6, batch {a.batch} x {inputs['input_ids'].shape[1]} tokens, LoRA r={a.r} on {', '.join(a.targets)}, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'variant':16s} {'ms/batch':>9s} {'vs base':>8s}")
    for k, v in med.items():
        print(f"{k:16s} {v:9.1f} {v / med['base']:7.2f}x")
    print(f"max |merged - unmerged| logits: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
