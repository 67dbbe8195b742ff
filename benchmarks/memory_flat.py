"""Does resident memory stay flat over many trials in one process? Twenty sequential trials, measured.

A Ray worker runs trial after trial in the same process, so anything a trial leaves behind (models,
optimisers, cached tokenisers, autograd graphs, hooks) would grow the worker until it is killed.
This script runs ``--trials`` trials with :func:`autopeft.training.trainer.run_trial` one after another in
this process (the methods cycle through LoRA, a parallel adapter, prefix tuning, BitFit and a gated
LoRA + adapter mix, so each trial builds a different model on MiniLM-L6) and prints the resident set
size (RSS, MiB) after every trial; the figure to read is the ratio of RSS after the last trial to
RSS after the first. It must stay within 10% (exit status 1 otherwise). After each trial it calls
:func:`autopeft.backbones.memory.release_memory`, as the Ray trial function does; ``--no-release`` shows what
happens without it (glibc keeps freed pages: RSS grows by tens of MiB per trial).

    python benchmarks/memory_flat.py --data-dir ../shared/data/glue

The first trial pays the one-off costs (imports, the tokenised-data cache, allocator arenas), so
the baseline is after it, not before.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

RECIPES = [
    [{"method": "lora", "r": 8, "target_modules": ["query", "value"]}],
    [{"method": "adapter", "placement": "parallel", "reduction_factor": 16}],
    [{"method": "prefix_tuning", "num_virtual_tokens": 8}],
    [{"method": "bitfit"}],
    [{"method": "lora", "r": 4, "target_modules": ["query", "value"]},
     {"method": "adapter", "placement": "parallel", "reduction_factor": 32}],
]


def rss_mib() -> float:
    """Resident set size of this process, MiB (after a full garbage collection)."""
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--examples", type=int, default=256, help="training examples per trial")
    ap.add_argument("--eval-examples", type=int, default=128)
    ap.add_argument("--no-release", action="store_true", help="skip release_memory() after each trial")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    args = ap.parse_args()
    from autopeft.backbones.memory import release_memory
    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.training.trainer import run_trial

    t0 = time.perf_counter()
    rss = []
    for i in range(args.trials):
        components = RECIPES[i % len(RECIPES)]
        recipe = recipe_from_dict({"task": "sst2", "pooling": "mean", "components": components,
                                   "gating": i % len(RECIPES) == len(RECIPES) - 1,
                                   "training": {"learning_rate": 3e-3, "max_train_examples": args.examples,
                                                "max_eval_examples": args.eval_examples, "seed": i}})
        result, model = run_trial(recipe, os.path.abspath(args.data_dir), device="cpu")
        del model, result
        if not args.no_release:
            release_memory()
        rss.append(rss_mib())
        print(f"trial {i + 1:2d} {'+'.join(c['method'] for c in components):<20} RSS {rss[-1]:7.1f} MiB", flush=True)
    ratio = rss[-1] / rss[0]
    print(f"RSS after trial 1: {rss[0]:.1f} MiB; after trial {args.trials}: {rss[-1]:.1f} MiB; "
          f"ratio {ratio:.3f} (max over trials {max(rss):.1f} MiB); "
          f"{'without' if args.no_release else 'with'} release_memory; {time.perf_counter() - t0:.0f} s")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
