"""AdapterDrop speed on MiniLM-L6: time per batch with the adapters of the lowest n layers dropped.

Rücklé et al., "AdapterDrop", arXiv:2010.11918, section 3 (adapters) and section 4 (AdapterFusion).
For n = 0..L this builds one model (real all-MiniLM-L6-v2 weights, serial Pfeiffer adapters with
random non-zero weights, an ``adapter_drop`` component) and times, on one batch of real SST-2
validation sentences:

* ``infer``: a forward pass under ``torch.inference_mode`` (model in eval mode);
* ``train``: forward + backward of the cross-entropy loss (what a training step costs before the
  optimiser; run in eval mode so that n is fixed and dropout does not add noise). With the lowest n
  layers dropped nothing below layer n is trainable, so backpropagation stops there.

All n are measured side by side: every repeat runs each n once, in a rotating order, and the table
gives medians and the speed-up versus n = 0. ``--fusion K`` (default 3) adds the same table for an
AdapterFusion model over K adapters (random stage-1 weights, no training), whose dropped layers skip
the adapters and the fusion attention. Only the skipped adapter/fusion computation is saved here: the
paper's larger multi-task inference speed-ups also share the lower layers' outputs across tasks,
which autopeft does not implement.

Usage: ``python benchmarks/adapter_drop_speed.py [--batch-size 16] [--repeats 7] [--fusion 3] [--threads 1]``
(about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from autopeft.backbones import load_tokenizer  # noqa: E402
from autopeft.training.fusion import stage2_recipe  # noqa: E402
from autopeft.methods.adapter_drop import set_adapter_drop  # noqa: E402
from autopeft.composition.recipe import build_model, recipe_from_dict  # noqa: E402
from autopeft.data.tasks import get_task, load_split  # noqa: E402
from autopeft.training.saved import save_trained  # noqa: E402


def randomize_adapters(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".serial." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def time_all(model, batch, labels, num_layers: int, repeats: int, train: bool) -> dict[int, dict[str, float]]:
    """Median seconds per batch for every n, measured interleaved (warm-up round not counted)."""
    ns = list(range(num_layers + 1))
    times: dict[int, dict[str, list[float]]] = {n: {"infer": [], "train": []} for n in ns}
    model.eval()
    for r in range(repeats + 1):
        order = ns[r % len(ns):] + ns[: r % len(ns)]
        for n in order:
            set_adapter_drop(model, n)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(**batch)
            t1 = time.perf_counter()
            if train:
                loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
                loss.backward()
                t2 = time.perf_counter()
                model.zero_grad(set_to_none=True)
            if r:  # round 0 is warm-up
                times[n]["infer"].append(t1 - t0)
                if train:
                    times[n]["train"].append(t2 - t1)
    return {n: {k: statistics.median(v) if v else float("nan") for k, v in d.items()} for n, d in times.items()}


def print_table(title: str, res: dict[int, dict[str, float]], num_layers: int, train: bool) -> None:
    print(f"\n{title}")
    head = f"{'n dropped':>9} {'adapter layers':>14} {'infer ms':>9} {'speed-up':>8}"
    if train:
        head += f" {'train ms':>9} {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    for n, d in res.items():
        line = f"{n:>9} {num_layers - n:>14} {1000 * d['infer']:>9.1f} {res[0]['infer'] / d['infer']:>7.2f}x"
        if train:
            line += f" {1000 * d['train']:>9.1f} {res[0]['train'] / d['train']:>7.2f}x"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--reduction-factor", type=float, default=16.0)
    ap.add_argument("--fusion", type=int, default=3, help="also time an AdapterFusion over K adapters (0: skip)")
    ap.add_argument("--no-train", action="store_true", help="time inference only")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: stable timings on a small shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train = not args.no_train

    task = get_task("sst2")
    split = load_split(task, "validation", args.data_dir)
    texts = [t[0] for t in split.texts[: args.batch_size]]
    tok = load_tokenizer("minilm-l6")
    batch = dict(tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))
    labels = torch.as_tensor(split.labels[: args.batch_size])
    print(f"MiniLM-L6, {len(texts)} SST-2 validation sentences, padded length {batch['input_ids'].shape[1]}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats")

    adapter = {"method": "adapter", "variant": "pfeiffer", "placement": "serial", "reduction_factor": args.reduction_factor}
    recipe = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2",
                               "components": [adapter, {"method": "adapter_drop", "n": 0}]})
    model = build_model(recipe)
    randomize_adapters(model, 0)
    num_layers = model.encoder.num_layers
    res = time_all(model, batch, labels, num_layers, args.repeats, train)
    print_table(f"Pfeiffer adapters (serial, FFN, reduction factor {args.reduction_factor:g})", res, num_layers, train)

    if args.fusion > 0:
        with tempfile.TemporaryDirectory() as tmp:
            stage1 = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2", "components": [adapter]})
            src = build_model(stage1)
            folders = []
            for k in range(args.fusion):
                randomize_adapters(src, k + 1)
                folders.append(save_trained(src, stage1, None, Path(tmp) / f"source{k}"))
            del src
            fusion_recipe = stage2_recipe(folders, "sst2", {"components": [{"method": "adapter_drop", "n": 0}]},
                                          names=[f"source{k}" for k in range(args.fusion)])
            fmodel = build_model(fusion_recipe)
            res = time_all(fmodel, batch, labels, num_layers, args.repeats, train)
        print_table(f"AdapterFusion over {args.fusion} frozen adapters", res, num_layers, train)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
