"""Why PEFT at 0.5% sits under full fine-tuning on SST-2: one lever at a time, 2 seeds, scored on dev.

    python experiments/gap_probes.py --data-dir ../shared/data/glue [--only NAME ...] [--seeds 0 1]
        [--examples 24000] [--out experiments/gap_probes.jsonl]

Every probe is a fixed recipe (MiniLM-L6, mean pooling, batch 32, its own linear schedule over
``--examples`` training examples) trained with :func:`autopeft.training.trainer.run_trial` on SST-2's train
split less a seeded, stratified dev split of 2,000 examples (the dev split every search uses), and
scored on that dev split with a 95% bootstrap interval. The task's validation split (the test split)
is never read here: the default space's changes are decided on dev alone. One JSON line per probe and
seed is appended to ``--out``; ``experiments/gap_to_full_ft.md`` is written from those lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def lora(r: int, targets: list[str], **kw) -> dict:
    return {"method": "lora", "r": r, "lora_alpha": 2 * r if kw.pop("alpha_2r", False) else 16,
            "target_modules": targets, **kw}


def adapter(rf: int, sublayers=("ffn",)) -> dict:
    return {"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": rf,
            "sublayers": list(sublayers)}


FFN = ["ffn_in", "ffn_out"]
ALL6 = ["query", "key", "value", "attention_output", "ffn_in", "ffn_out"]

#: name -> (what the lever is, components, recipe overrides, training overrides). Order = run order.
PROBES: dict[str, tuple[str, list, dict, dict]] = {
    "full_ft": ("reference: full fine-tuning, lr 5e-5", [{"method": "full_finetuning"}], {}, {"learning_rate": 5e-5}),
    "lora8_qv": ("today's first start point: LoRA r=8 on W_q, W_v", [lora(8, ["query", "value"])], {}, {}),
    "lora4_ffn": ("placement: LoRA r=4 on the FFN (ffn_in + ffn_out)", [lora(4, FFN)], {}, {}),
    "adapter_rf32": ("today's best: parallel FFN adapter rf 32", [adapter(32)], {}, {}),
    "lora4_ffn_lr1e-3": ("learning rate 1e-3 (LoRA r=4 FFN)", [lora(4, FFN)], {}, {"learning_rate": 1e-3}),
    "lora2_all6_lr1e-3": ("placement: LoRA r=2 on all six matrices, lr 1e-3", [lora(2, ALL6)], {}, {"learning_rate": 1e-3}),
    "lora4_ffn_head1e-2": ("head learning rate 1e-2 (LoRA r=4 FFN)", [lora(4, FFN)], {}, {"head_learning_rate": 1e-2}),
    "lora3_ffn_bitfit": ("LayerNorm and bias tuning: LoRA r=3 FFN + BitFit (all biases)",
                         [lora(3, FFN), {"method": "bitfit"}], {}, {}),
    "lora4_ffn_nodrop": ("backbone dropout off (LoRA r=4 FFN)", [lora(4, FFN)], {}, {"backbone_dropout": 0.0}),
    "lora8_ffn_top3": ("per-layer placement: LoRA r=8 FFN on layers 3-5 only", [lora(8, FFN, layers=[3, 4, 5])], {}, {}),
    "adapter_rf16": ("capacity: parallel FFN adapter rf 16 (113,040)", [adapter(16)], {}, {}),
    "lora4_ffn_lr6e-3": ("learning rate 6e-3 (LoRA r=4 FFN)", [lora(4, FFN)], {}, {"learning_rate": 6e-3}),
    "lora4_ffn_warmup0": ("no warm-up (LoRA r=4 FFN)", [lora(4, FFN)], {}, {"warmup_ratio": 0.0}),
    "lora4_ffn_nodrop_warmup0": ("backbone dropout off and no warm-up (LoRA r=4 FFN)", [lora(4, FFN)], {},
                                 {"backbone_dropout": 0.0, "warmup_ratio": 0.0}),
    "adapter_rf32_nodrop": ("backbone dropout off (parallel FFN adapter rf 32)", [adapter(32)], {},
                            {"backbone_dropout": 0.0}),
}


def recipe_of(name: str, seed: int, examples: int) -> tuple[dict, bool]:
    """The probe's recipe mapping and whether the backbone's dropout is switched off."""
    from autopeft.data.tasks import DevSplit, default_dev_examples

    _, components, over, train_over = PROBES[name]
    over = dict(over)
    no_dropout = over.pop("_no_dropout", False)
    return ({"task": "sst2", "pooling": "mean", **over, "components": components,
             "dev": DevSplit(examples=default_dev_examples(67349), seed=0).model_dump(),
             "training": {"learning_rate": 3e-3, "max_train_examples": examples, "seed": seed, **train_over}},
            no_dropout)


def run(name: str, seed: int, examples: int, data_dir: str) -> dict:
    from autopeft.composition.recipe import recipe_from_dict
    from probes_sst2 import run_trial_probe  # experiments/ is on sys.path when run as a script

    data, no_dropout = recipe_of(name, seed, examples)
    recipe = recipe_from_dict(data)
    t0 = time.time()
    result, _ = run_trial_probe(recipe, data_dir, no_dropout)
    return {"probe": name, "lever": PROBES[name][0], "seed": seed, "examples": examples,
            "trainable_params": result.trainable_params, "dev_score": result.score,
            "dev_low": result.score_low, "dev_high": result.score_high, "dev_examples": result.eval_examples,
            "train_time_s": round(result.train_time_s, 1), "wall_s": round(time.time() - t0, 1), "recipe": data}


def table(rows: list[dict]) -> str:
    """Markdown table of the probes in ``rows`` (JSON lines): per probe, dev score per seed, the mean,
    and the mean paired difference to ``lora8_qv`` (today's first start point) over the seeds both ran."""
    import statistics

    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["probe"], {})[r["seed"]] = r
    ref = by.get("lora8_qv", {})
    out = ["| probe | lever | trainable params | examples | dev score per seed (95% interval) | mean | vs LoRA r=8 q/v (paired, same seeds) |",
           "|---|---|---:|---:|---|---:|---:|"]
    for name in [n for n in PROBES if n in by]:
        seeds = by[name]
        first = next(iter(seeds.values()))
        per = "; ".join(f"s{s}: {r['dev_score']:.4f} [{r['dev_low']:.4f}, {r['dev_high']:.4f}]" for s, r in sorted(seeds.items()))
        mean = statistics.fmean(r["dev_score"] for r in seeds.values())
        common = [s for s in seeds if s in ref]
        diff = (f"{statistics.fmean(seeds[s]['dev_score'] - ref[s]['dev_score'] for s in common):+.4f} ({len(common)})"
                if common and name != "lora8_qv" else "")
        out.append(f"| {name} | {first['lever']} | {first['trainable_params']:,} | {first['examples']:,} | {per} | "
                   f"{mean:.4f} | {diff} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--only", nargs="*", choices=sorted(PROBES), help="run these probes only")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--examples", type=int, default=24000, help="training examples per probe (its schedule too)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("gap_probes.jsonl")))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out's probes and exit")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only or PROBES:
        for seed in args.seeds:
            row = run(name, seed, args.examples, os.path.abspath(args.data_dir))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: {row['trainable_params']:,} params, dev {row['dev_score']:.4f} "
                  f"[{row['dev_low']:.4f}, {row['dev_high']:.4f}], {row['train_time_s']}s training", flush=True)


if __name__ == "__main__":
    main()
