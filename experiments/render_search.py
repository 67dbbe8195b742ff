"""Render a finished search folder as Markdown: settings, counts, Pareto front, every trial and sample.

    python experiments/render_search.py autopeft_runs/<search> --title "Default search" \
        --command "autopeft search --task sst2 --budget 0.5% --data-dir ../shared/data/glue" > out.md

Every number comes from the folder's ``search.json``, ``result.json``, ``trials.json`` and ``pareto.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _summary(recipe: dict | None) -> str:
    if not recipe:
        return "(invalid)"
    parts = []
    for c in recipe.get("components", []):
        keys = [k for k in ("r", "lora_alpha", "target_modules", "placement", "reduction_factor", "sublayers",
                            "num_virtual_tokens") if c.get(k) is not None]
        parts.append(c["method"] + "(" + ", ".join(f"{k}={c[k]}" for k in keys) + ")")
    text = " + ".join(parts) or "head only"
    if recipe.get("gating"):
        text += ", gated"
    return f"{text}; {recipe.get('pooling', 'pooler')} pooling"


def _ci(row: dict, key: str, low: str, high: str) -> str:
    """``0.8761 [0.8543, 0.8968]``; the score alone without an interval; empty without a score."""
    v, lo, hi = row.get(key), row.get(low), row.get(high)
    if not isinstance(v, (int, float)):
        return ""
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else f"{v:.4f}"


def render(folder: Path, title: str, command: str) -> str:
    settings = json.loads((folder / "search.json").read_text())
    result = json.loads((folder / "result.json").read_text())
    trials = json.loads((folder / "trials.json").read_text())
    front = json.loads((folder / "pareto.json").read_text())
    out = [f"# {title}", "", "Command:", "", "```", command, "```", ""]
    out.append(f"Settings: space `{settings['space']}`, searcher `{settings.get('searcher', 'tpe')}` (seed "
               f"{settings['seed']}), scheduler {settings.get('scheduler', 'ASHA')}, rungs "
               f"{', '.join(f'{r:,}' for r in settings['rungs'])} training examples, up to {settings['trials']} trials, "
               f"time cap {settings['time_budget_s'] / 60:.0f} min, {settings['cpus_per_trial']:g} CPU per trial. "
               f"Budget {settings['budget']} of {settings['backbone_params']:,} = {settings['param_limit']:,} "
               "trainable parameters (head excluded).")
    out.append("")
    counts = ", ".join(f"{v} {k}" for k, v in result["counts"].items() if v)
    out.append(f"**Wall time: {result['wall_time_s'] / 60:.1f} min.** Trials and samples: {counts}. "
               f"Hypervolume {result['hypervolume']:.4f}. MLflow parent run `{result['mlflow_run_id']}`.")
    splits = settings.get("splits")
    where = (f"dev: {splits['dev']:,} examples carved from train, read by every search decision; test: "
             f"{splits['test']:,} examples ({splits['test_source']}), read once after the search" if splits
             else "full validation split")
    out += ["", f"## Pareto front ({result['fidelity']:,} training examples; {where}; 95% intervals)", "",
            "| # | trial | dev score | test score | trainable params | % | peak memory (MiB) | configuration | lr |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for i, r in enumerate(front):
        lr = (r.get("recipe") or {}).get("training", {}).get("learning_rate")
        out.append(f"| {i} | {r['trial_id']} | {_ci(r, 'score', 'score_low', 'score_high')} | "
                   f"{_ci(r, 'test_score', 'test_low', 'test_high')} | {r['trainable_params']:,} | "
                   f"{r['trainable_percent']:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} | {_summary(r.get('recipe'))} | "
                   f"{lr:.2g} |")
    if not front:
        out.append("| | (empty) | | | | | | | |")
    ref_file = folder / "reference.json"
    if ref_file.is_file():
        ref = json.loads(ref_file.read_text())
        out += ["", f"Reference ({ref['kind']} fine-tuning, {ref['trainable_params']:,} parameters, "
                f"{ref['examples_seen']:,} examples, same splits): dev {_ci(ref, 'score', 'score_low', 'score_high')}, "
                f"test {_ci(ref, 'test_score', 'test_low', 'test_high')}."]
    out += ["", "## Every trial and rejected sample, in order", "",
            "| id | configuration | lr | trainable params | status | score per rung (examples: score) |",
            "|---|---|---:|---:|---|---|"]
    for t in trials:
        lr = (t.get("recipe") or {}).get("training", {}).get("learning_rate")
        rungs = ", ".join(f"{row['examples_seen']}: {row['score']:.4f}" for row in t.get("rows", []))
        params = f"{t['trainable_params']:,}" if t.get("trainable_params") is not None else ""
        status = t["status"] + (f" ({t['error'][:80]})" if t.get("error") else "") + (
            f" of {t['duplicate_of']}" if t.get("duplicate_of") else "")
        out.append(f"| {t['trial_id']} | {_summary(t.get('recipe'))} | {lr:.2g} | {params} | {status} | {rungs} |"
                   if lr else f"| {t['trial_id']} | {_summary(t.get('recipe'))} | | {params} | {status} | {rungs} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--title", default="Search")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    print(render(args.folder, args.title, args.command), end="")


if __name__ == "__main__":
    main()
