"""Single-recipe probes behind the default search space's priors (MiniLM-L6, SST-2, seed 0 unless given).

    python experiments/probes_sst2.py --data-dir ../shared/data/glue [--only NAME ...]

Prints one line per probe: name, trainable parameters, validation accuracy, training seconds. The
numbers quoted in ``default_search_sst2.md`` (2026-11-30, 2 CPU cores) came from these recipes; each
8,064-example probe takes ~40 s here, the 64,000-example one ~7 min.
"""

from __future__ import annotations

import argparse
import os

import torch

LORA8 = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}


def _adapter(rf: int) -> dict:
    return {"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": rf,
            "sublayers": ["ffn"]}


#: name -> (components, recipe overrides, training overrides)
PROBES: dict[str, tuple[list, dict, dict]] = {
    "lora8_mean_lr3e-3": ([LORA8], {}, {}),
    "lora8_mean_lr1e-3": ([LORA8], {}, {"learning_rate": 1e-3}),
    "lora8_mean_lr6e-3": ([LORA8], {}, {"learning_rate": 6e-3}),
    "lora8_pooler": ([LORA8], {"pooling": "pooler"}, {}),
    "lora8_mean_random_batches": ([LORA8], {}, {"group_by_length": False}),
    "lora8_mean_seed1": ([LORA8], {}, {"seed": 1}),
    "adapter_rf16": ([_adapter(16)], {}, {}),
    "lora4qv_adapter_rf32": ([{**LORA8, "r": 4}, _adapter(32)], {}, {}),
    "lora4_qv_ffn_out": ([{**LORA8, "r": 4, "target_modules": ["query", "value", "ffn_out"]}], {}, {}),
    "lora8_alpha32": ([{**LORA8, "lora_alpha": 32}], {}, {}),
    "lora8_head_lr1e-2": ([LORA8], {}, {"head_learning_rate": 1e-2}),
    "lora8_no_dropout": ([LORA8], {"_no_dropout": True}, {}),
    "lora8_64k": ([LORA8], {}, {"max_train_examples": 64000}),
}


def run_trial_probe(recipe, data_dir: str, no_dropout: bool = False):
    """:func:`autopeft.training.trainer.run_trial` of ``recipe``; with ``no_dropout``, the frozen backbone's
    dropout is switched off (not a recipe field: a probe only)."""
    import autopeft.training.trainer as trainer
    from autopeft.composition.recipe import build_model

    original = trainer.build_model
    if no_dropout:
        def build_without_dropout(r, device="cpu"):
            model = build_model(r, device)
            for m in model.backbone.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            return model

        trainer.build_model = build_without_dropout
    try:
        return trainer.run_trial(recipe, data_dir)
    finally:
        trainer.build_model = original


def run(name: str, data_dir: str) -> str:
    from autopeft.composition.recipe import recipe_from_dict

    components, over, train_over = PROBES[name]
    over = dict(over)
    no_dropout = over.pop("_no_dropout", False)
    recipe = recipe_from_dict({"task": "sst2", "pooling": "mean", **over, "components": components,
                               "training": {"learning_rate": 3e-3, "max_train_examples": 8064, "seed": 0, **train_over}})
    result, _ = run_trial_probe(recipe, data_dir, no_dropout)
    return f"{name}: {result.trainable_params:,} params, accuracy {result.score:.4f}, {result.train_time_s:.1f}s training"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--only", nargs="*", choices=sorted(PROBES), help="run these probes only")
    args = ap.parse_args()
    for name in args.only or PROBES:
        print(run(name, os.path.abspath(args.data_dir)), flush=True)


if __name__ == "__main__":
    main()
