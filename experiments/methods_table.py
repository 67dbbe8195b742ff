"""Every method at its default setting on MiniLM-L6 and SST-2, at one training fidelity, side by side.

For each of the twelve methods (and full fine-tuning as the reference, run first in the same
process) this trains ``--train-examples`` SST-2 examples, evaluates on the full validation split (872
sentences), and records trainable parameters (without the head), their percentage of the backbone,
validation accuracy, peak training memory (CPU account or CUDA peak, see ``autopeft.training.trainer``) and the
mean training-step time relative to full fine-tuning's, measured in this same run.

Notes on the rows: ``adapter_drop`` drops the adapters of a default ``adapter`` component (AdapterDrop
needs adapters); ``adapter_fusion`` first trains one default serial adapter each on MRPC and RTE
(stage 1, ``--stage1-examples`` each, not counted in its row), then trains the fusion on SST-2.

    python experiments/methods_table.py --data-dir ../shared/data/glue --train-examples 4000
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from autopeft.methods import CANONICAL_METHODS
from autopeft.composition.recipe import recipe_from_dict
from autopeft.training.trainer import run_trial

HERE = Path(__file__).resolve().parent


def components_for(method: str, tmp: Path, data_dir: str, stage1_examples: int, log) -> list[dict]:
    if method == "adapter_drop":
        return [{"method": "adapter"}, {"method": "adapter_drop"}]
    if method == "adapter_fusion":
        from autopeft.training.fusion import train_adapters

        base = {"backbone": "minilm-l6", "training": {"max_train_examples": stage1_examples, "learning_rate": 3e-3}}
        folders = train_adapters(["mrpc", "rte"], base, tmp / "stage1", data_dir, log=log)
        return [{"method": "adapter_fusion", "adapters": [str(f) for f in folders]}]
    return [{"method": method}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--stage1-examples", type=int, default=2000)
    p.add_argument("--learning-rate", type=float, default=3e-3, help="for every PEFT method")
    p.add_argument("--full-learning-rate", type=float, default=5e-5, help="for full fine-tuning")
    p.add_argument("--method-lr", nargs="*", default=[], metavar="METHOD=LR",
                   help="learning rate of single methods, e.g. mam=3e-4 (the paper's range)")
    p.add_argument("--methods", nargs="*", default=list(CANONICAL_METHODS))
    p.add_argument("--out", default=str(HERE / "methods_table.md"))
    a = p.parse_args(argv)
    command = "python experiments/methods_table.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    method_lr = {k: float(v) for k, v in (x.split("=", 1) for x in a.method_lr)}
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["full_finetuning", *a.methods]:
            lr = a.full_learning_rate if method == "full_finetuning" else method_lr.get(method, a.learning_rate)
            comps = components_for(method, Path(tmp), a.data_dir, a.stage1_examples, None)
            recipe = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2", "components": comps,
                                       "training": {"max_train_examples": a.train_examples, "learning_rate": lr}})
            try:
                res, _ = run_trial(recipe, a.data_dir)
            except Exception as exc:  # a method that fails is a row that says so
                rows.append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{method}: FAILED {exc}", flush=True)
                continue
            row = {"method": method, "trainable_params": res.trainable_params, "trainable_percent": res.trainable_percent,
                   "accuracy": res.score, "peak_memory_bytes": res.peak_memory_bytes,
                   "step_time_s": res.train_time_s / res.steps, "steps": res.steps, "learning_rate": lr}
            rows.append(row)
            print(json.dumps(row), flush=True)
    full = next(r for r in rows if r["method"] == "full_finetuning")
    lines = [
        f"# Methods at their defaults: MiniLM-L6 on SST-2, {a.train_examples:,} training examples each",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; total {(time.time() - t0) / 60:.1f} min. Batch 32, max length 128, seed 0;",
        f"Learning rate {a.learning_rate:g} for the PEFT methods (except as listed), {a.full_learning_rate:g} for full fine-tuning.",
        "Accuracy on all 872 validation sentences. Step time relative to full fine-tuning, measured in this run.",
        "",
        "| method | learning rate | trainable params | % of backbone | val. accuracy | peak train memory (MiB) | step time (s) | vs full FT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | {r['accuracy']:.4f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['step_time_s']:.3f} | {r['step_time_s'] / full['step_time_s']:.2f}x |")
    lines += ["", "`adapter_drop`: default adapter (Pfeiffer, parallel, reduction factor 16) with its 2 lowest layers dropped;",
              f"`adapter_fusion`: fusion over serial adapters trained on MRPC and RTE ({a.stage1_examples:,} examples each).", ""]
    Path(a.out).write_text("\n".join(lines))
    Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


def _machine() -> str:
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{dev}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
