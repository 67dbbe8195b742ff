"""At which fidelity does a GLUE task learn on MiniLM-L6? Learning curves scored on dev, never on test.

    python experiments/fidelity_probes.py --task cola [--epochs 3] [--probes lora4_ffn full_ft]
        [--seeds 0] [--data-dir ../shared/data/glue] [--out experiments/fidelity_probes.jsonl]
    python experiments/fidelity_probes.py --table

Issue 13's rule: a benchmark task counts only at a fidelity where its models learn (a score near the
majority class or chance means the fidelity is too low). Each probe is one fixed recipe (mean pooling,
batch 32, the probe's learning rate) trained with :func:`autopeft.training.trainer.run_trial` for
``--epochs`` epochs of the task's train split less the seeded, stratified dev split every search
carves (:func:`autopeft.data.tasks.default_dev_examples`), with its linear schedule over all of them,
and scored on that dev split (95% bootstrap interval) at rungs of 1/9, 1/3, 1, 2, ... epochs: the
scores a search's successive-halving rungs would see if the top fidelity were ``--epochs`` epochs.
The task's validation split (the benchmark's test split) is never read. One JSON line per probe and
seed is appended to ``--out``; ``--table`` prints them as Markdown beside the dev split's
majority-class score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gap_probes import FFN, adapter, lora  # noqa: E402

#: name -> (components, training overrides). The learning rates are each family's default.
PROBES: dict[str, tuple[list, dict]] = {
    "lora8_qv": ([lora(8, ["query", "value"])], {"learning_rate": 3e-3}),
    "lora4_ffn": ([lora(4, FFN)], {"learning_rate": 3e-3}),
    "adapter_rf32": ([adapter(32)], {"learning_rate": 3e-3}),
    "full_ft": ([{"method": "full_finetuning"}], {"learning_rate": 5e-5}),
}
RUNG_EPOCHS = [Fraction(1, 9), Fraction(1, 3), Fraction(1, 1), Fraction(2, 1), Fraction(3, 1), Fraction(5, 1)]


def task_sizes(task: str, data_dir: str) -> tuple[int, int]:
    """``(train examples after the dev carve, dev examples)`` of ``task``."""
    from autopeft.data.tasks import default_dev_examples, get_task, load_split

    n = len(load_split(get_task(task), "train", data_dir))
    d = default_dev_examples(n)
    return n - d, d


def dev_majority(task: str, data_dir: str, dev_examples: int) -> float | None:
    """The majority class's score on the carved dev split (``None`` for regression: a constant has no
    correlation)."""
    import numpy as np

    from autopeft.data.tasks import DevSplit, carve_dev, get_task, load_split

    t = get_task(task)
    if t.num_labels == 1:
        return None
    _, dev = carve_dev(load_split(t, "train", data_dir), DevSplit(examples=dev_examples, seed=0))
    labels = np.asarray(dev.labels)
    major = np.bincount(labels).argmax()
    return float(t.score(np.full_like(labels, major), labels)[t.metric])


def run(task: str, name: str, seed: int, epochs: float, data_dir: str, lr: float | None = None) -> dict:
    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.data.tasks import DevSplit, get_task
    from autopeft.training.trainer import run_trial

    n_train, n_dev = task_sizes(task, data_dir)
    top = int(round(epochs * n_train))
    rungs = sorted({int(round(float(e) * n_train)) for e in RUNG_EPOCHS if e < epochs} | {top})
    components, train_over = PROBES[name]
    train_over = {**train_over, **({"learning_rate": lr} if lr else {})}
    data = {"task": task, "pooling": "mean", "components": components,
            "dev": DevSplit(examples=n_dev, seed=0).model_dump(),
            "training": {"max_train_examples": top, "seed": seed, **train_over}}
    curve: list[dict] = []
    keep = {"examples_seen", "score", "score_low", "score_high", "train_time_s", *get_task(task).metrics}
    t0 = time.time()
    result, _ = run_trial(recipe_from_dict(data), data_dir, rungs=rungs,
                          report=lambda row: curve.append({k: row[k] for k in row if k in keep}))
    return {"task": task, "probe": name, "learning_rate": train_over["learning_rate"], "seed": seed, "epochs": epochs, "train_examples": n_train,
            "dev_examples": n_dev, "trainable_params": result.trainable_params, "curve": curve,
            "wall_s": round(time.time() - t0, 1), "recipe": data}


def table(rows: list[dict], data_dir: str) -> str:
    """Markdown: one line per (task, probe, seed), the dev score at each rung in epochs."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        n_train, n_dev = trs[0]["train_examples"], trs[0]["dev_examples"]
        maj = dev_majority(task, data_dir, n_dev)
        eps = sorted({round(p["examples_seen"] / n_train, 3) for r in trs for p in r["curve"]})
        out += [f"**{task}**: {n_train:,} training examples an epoch, dev {n_dev:,}; majority class on dev: "
                + ("n/a (regression)" if maj is None else f"{maj:.4f}"), "",
                "| probe | lr | seed | params | " + " | ".join(f"{e:g} ep" for e in eps) + " | wall |",
                "|---|---:|---:|---:|" + "---:|" * len(eps) + "---:|"]
        for r in trs:
            by = {round(p["examples_seen"] / n_train, 3): p for p in r["curve"]}
            cells = [f"{by[e]['score']:.4f} [{by[e]['score_low']:.3f}, {by[e]['score_high']:.3f}]" if e in by else ""
                     for e in eps]
            out.append(f"| {r['probe']} | {r['recipe']['training']['learning_rate']:g} | {r['seed']} | {r['trainable_params']:,} | " + " | ".join(cells)
                       + f" | {r['wall_s'] / 60:.1f} min |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="cola")
    ap.add_argument("--epochs", type=float, default=3.0, help="top fidelity in epochs (the schedule's length)")
    ap.add_argument("--probes", nargs="*", choices=sorted(PROBES), default=["lora4_ffn", "full_ft"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--learning-rate", type=float, default=None, help="override every probe's learning rate")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("fidelity_probes.jsonl")))
    ap.add_argument("--table", action="store_true", help="print the Markdown tables of --out and exit")
    args = ap.parse_args()
    data_dir = os.path.abspath(args.data_dir)
    if args.table:
        print(table([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()], data_dir))
        return
    for name in args.probes:
        for seed in args.seeds:
            row = run(args.task, name, seed, args.epochs, data_dir, args.learning_rate)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{args.task} {name} lr {row['learning_rate']:g} seed {seed}: " + ", ".join(
                f"{p['examples_seen']:,} ex {p['score']:.4f}" for p in row["curve"]) + f" ({row['wall_s']:.0f} s)",
                flush=True)


if __name__ == "__main__":
    main()
