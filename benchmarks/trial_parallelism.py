"""Two 1-core trials side by side, or one 2-core trial after another? Measured in one run.

Trains the same two recipes (LoRA r=8 on W_q/W_v, MiniLM-L6, SST-2, mean pooling, length-grouped
batches) both ways on this machine and prints the wall time of each way and their ratio. The CPU
default of ``autopeft search`` (``api.default_resources``) follows this measurement.

    python benchmarks/trial_parallelism.py --examples 1600 --data-dir ../shared/data/glue

Run it on a quiet machine: anything else on the cores skews both ways.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _recipe(examples: int, seed: int):
    from autopeft.composition.recipe import recipe_from_dict

    return recipe_from_dict({"task": "sst2", "pooling": "mean",
                             "components": [{"method": "lora", "r": 8, "target_modules": ["query", "value"]}],
                             "training": {"learning_rate": 3e-3, "max_train_examples": examples, "seed": seed}})


def _one(args: tuple[int, int, int, str]) -> float:
    examples, seed, threads, data_dir = args
    import torch

    torch.set_num_threads(threads)
    from autopeft.training.trainer import run_trial

    t0 = time.perf_counter()
    run_trial(_recipe(examples, seed), data_dir)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1600, help="training examples per trial")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    data_dir = os.path.abspath(args.data_dir)
    _one((32, 0, cores, data_dir))  # warm the token cache and the file system cache
    t0 = time.perf_counter()
    for seed in (0, 1):
        _one((args.examples, seed, cores, data_dir))
    sequential = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(2) as pool:
        pool.map(_one, [(args.examples, seed, max(1, cores // 2), data_dir) for seed in (0, 1)])
    parallel = time.perf_counter() - t0
    out = {"cores": cores, "examples_per_trial": args.examples, "sequential_s": round(sequential, 1),
           "parallel_s": round(parallel, 1), "parallel_over_sequential": round(parallel / sequential, 3)}
    print(json.dumps(out))
    print(f"two trials, {cores} threads each, one after another: {sequential:.1f}s; "
          f"side by side with {max(1, cores // 2)} thread(s) each: {parallel:.1f}s "
          f"(ratio {parallel / sequential:.2f}: {'side by side wins' if parallel < sequential else 'one at a time wins'})")


if __name__ == "__main__":
    main()
