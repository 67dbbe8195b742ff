"""How much does grouping training batches by length save? Padding and step time, side by side.

    python benchmarks/length_grouping.py [--data-dir ../shared/data/glue] [--examples 24000] [--steps 30]

On SST-2's training split (less nothing: every row), tokenised as the trainer tokenises it, compares the
trainer's two example orders for one trial of ``--examples`` examples in batches of 32:
:func:`autopeft.training.batches.length_grouped_order` (the default, ``training.group_by_length``) and
:func:`autopeft.training.batches.train_order` (a plain shuffle). It prints each order's padding share
(padded token slots / all slots, over the whole trial) and the median time of one LoRA r=8 q/v training
step (forward, loss, backward, AdamW; MiniLM-L6, fp32) over ``--steps`` batches of each order, taken in
turn (one grouped step, one shuffled step, ...) so that the machine's drift hits both alike, and their
ratio. Runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--examples", type=int, default=24000, help="one trial's training examples (the default top fidelity)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each order")
    args = ap.parse_args()

    import torch

    from autopeft.backbones import MINILM, load_tokenizer
    from autopeft.composition.recipe import build_model, recipe_from_dict
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches, length_grouped_order, padding_fraction, train_order

    batch = 32
    split = load_split(get_task("sst2"), "train", os.path.abspath(args.data_dir))
    b = Batches(split, load_tokenizer(MINILM), 128, torch.device("cpu"))
    orders = {"grouped by length": length_grouped_order(b.lengths, args.examples, batch, 0),
              "shuffled": train_order(len(split), args.examples, 0)}
    recipe = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2", "pooling": "mean",
                               "components": [{"method": "lora", "r": 8, "target_modules": ["query", "value"]}]})
    model = build_model(recipe).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(idx) -> float:
        t0 = time.perf_counter()
        model(**b.batch(idx)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in orders}
    for name, order in orders.items():  # warm-up: one step of each
        step(order[:batch])
    for i in range(1, args.steps + 1):
        for name, order in orders.items():
            times[name].append(step(order[i * batch:(i + 1) * batch]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SST-2 train ({len(split):,} rows), {args.examples:,} examples in batches of {batch}, LoRA r=8 q/v, "
          f"MiniLM-L6, fp32, {torch.get_num_threads()} threads, {args.steps} steps of each order taken in turn\n")
    print("| order | padding | median step |\n|---|---:|---:|")
    for name, order in orders.items():
        print(f"| {name} | {padding_fraction(b.lengths, order, batch):.1%} | {med[name] * 1000:.0f} ms |")
    print(f"\nshuffled / grouped step time: **{med['shuffled'] / med['grouped by length']:.2f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
