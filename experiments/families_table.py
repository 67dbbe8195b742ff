"""Every method at its default setting on every architecture family, counted on the meta device.

For each method (the rows of ``methods_table.md``) and each family preset at its real size, the
trainable parameters (head excluded) and their share of the backbone, counted without weights
(``autopeft.composition.recipe.count_recipe``: the recipe is built on the meta device), or the one-line reason
the method is not supported there. Writes the "Other families" section of ``methods_table.md``
(and ``families_table.json``); the trained MiniLM table above it is left as it is.

``adapter_fusion`` needs trained stage-1 folders, which a meta-device count cannot have: its count is
the closed form of its trainable fusion layers, ``L (3 d^2 + 2 d)`` over two default (Pfeiffer, FFN)
stage-1 adapters (the adapters themselves are frozen).

    python experiments/families_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autopeft.backbones import PRESETS, load_config
from autopeft.methods import CANONICAL_METHODS
from autopeft.methods.base import BackboneLimits
from autopeft.composition.recipe import RecipeError, count_recipe, recipe_from_dict

HERE = Path(__file__).resolve().parent
FAMILY_PRESETS = ["minilm-l6", "distilbert-base", "deberta-v3-base", "gpt2", "llama-2-7b", "qwen2.5-0.5b",
                  "mistral-7b"]
START, END = "<!-- families:start -->", "<!-- families:end -->"


def cell(preset: str, method: str) -> dict:
    """Count of ``method`` at its defaults on ``preset``: ``{"supported", "trainable_params", "percent"}``
    or ``{"supported": False, "why": ...}``."""
    config = load_config({"preset": preset}, 2)
    limits = BackboneLimits.of(config)
    why = dict(limits.unsupported).get(method)
    if why:
        return {"supported": False, "why": why}
    comps = {"adapter_drop": [{"method": "adapter"}, {"method": "adapter_drop"}],
             "full_finetuning": [{"method": "full_finetuning"}]}.get(method, [{"method": method}])
    if method == "adapter_fusion":
        base = count_recipe(recipe_from_dict({"backbone": {"preset": preset}, "task": "sst2", "components": []}))
        d, n = limits.hidden_size, limits.num_layers
        params = n * (3 * d * d + 2 * d)
        return {"supported": True, "trainable_params": params, "percent": 100 * params / base.backbone_params,
                "closed_form": True}
    try:
        c = count_recipe(recipe_from_dict({"backbone": {"preset": preset}, "task": "sst2", "components": comps}))
    except RecipeError as exc:
        return {"supported": False, "why": str(exc)}
    return {"supported": True, "trainable_params": c.trainable_params, "percent": c.trainable_percent}


def main() -> int:
    methods = ["full_finetuning", *CANONICAL_METHODS]
    table = {p: {m: cell(p, m) for m in methods} for p in FAMILY_PRESETS}
    sizes = {p: count_recipe(recipe_from_dict({"backbone": {"preset": p}, "task": "sst2", "components": []})).backbone_params
             for p in FAMILY_PRESETS}
    lines = [START, "## Other families: trainable parameters at the defaults, counted on the meta device", "",
             "Command: `python experiments/families_table.py` (no weights: each recipe is built on the meta device at the",
             "preset's real size). ✓ supported (trainable parameters, % of the backbone without its head); ✗ not",
             "supported, with the reason below. `minilm-l6` is the backbone of the trained table above.", "",
             "| method | " + " | ".join(f"{p} ({PRESETS[p]['model_type']}, {sizes[p] / 1e6:,.1f}M)" for p in FAMILY_PRESETS) + " |",
             "|---|" + "---:|" * len(FAMILY_PRESETS)]
    reasons: dict[str, str] = {}
    for m in methods:
        cells = []
        for p in FAMILY_PRESETS:
            c = table[p][m]
            if c["supported"]:
                star = "*" if c.get("closed_form") else ""
                cells.append(f"✓ {c['trainable_params']:,}{star} ({c['percent']:.3f}%)")
            else:
                cells.append("✗")
                reasons.setdefault(f"{m} on {PRESETS[p]['model_type']}", c["why"])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "\\* closed form of the trainable fusion layers, `L (3 d^2 + 2 d)` (stage-1 folders cannot exist on the meta device).", ""]
    lines += [f"- ✗ {k}: {v}" for k, v in reasons.items()]
    lines += [END, ""]
    md = HERE / "methods_table.md"
    text = md.read_text() if md.exists() else ""
    if START in text:
        text = text[:text.index(START)] + text[text.index(END) + len(END):].lstrip("\n")
    md.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    (HERE / "families_table.json").write_text(json.dumps({"backbone_params": sizes, "table": table}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
