"""Issue 9, deliverable 4 on the real backbone: export search points with ``autopeft export`` and load them
with peft / transformers. Prints what experiments/export_peft.md quotes.

1. The default SST-2 search's best point (experiments/runs/default-run-tpe.pareto.json; since issue 13 a LoRA
   on the FFN with a mean-pooling head) through ``--format peft``: refused, one line, exit 2, naming
   ``--merge`` (which ships the head as code; its check from the search's kept weights is
   experiments/export_default_check.py - this copy of the front has no weights, so ``--merge`` here would
   train the point first).
2. A LoRA point (the default space's LoRA start point, r=8 on W_q/W_v, lr 3e-3, with the backbone's own
   pooler head instead of mean pooling, which peft cannot hold) in a search folder: ``--format peft`` trains
   it (4,000 SST-2 examples) and exports it, ``--merge`` reuses the weights; both folders are loaded as a
   user would and run on the whole SST-2 validation split next to autopeft's model.

Run from the project root: ``python experiments/export_peft_check.py [work folder]`` (about 2 minutes on 2 cores).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


def cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "autopeft.cli", *args], capture_output=True, text=True)
    lines = [x for x in (res.stdout + res.stderr).splitlines() if "kernels" not in x and "warn" not in x.lower()]
    print(f"$ autopeft {' '.join(args)}\n  exit {res.returncode}\n  " + "\n  ".join(lines))
    return res


def main(work: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from autopeft.backbones import load_tokenizer, minilm_path
    from autopeft.composition.recipe import Recipe
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.saved import load_trained

    default = work / "default-run-tpe"
    default.mkdir(parents=True, exist_ok=True)
    (default / "pareto.json").write_text((ROOT / "experiments" / "runs" / "default-run-tpe.pareto.json").read_text())
    cli("export", str(default), "--pick", "best", "--format", "peft", "-o", str(work / "default-peft"))

    recipe = Recipe.model_validate({
        "backbone": "minilm-l6", "task": "sst2", "pooling": "pooler",
        "components": [{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}],
        "training": {"learning_rate": 3e-3, "max_train_examples": 4000, "seed": 0}})
    search = work / "lora-search"
    search.mkdir(exist_ok=True)
    row = {"trial_id": "lora-start", "score": None, "trainable_params": 36864, "trainable_percent": 0.1623,
           "peak_memory_bytes": 0, "examples_seen": 4000, "recipe": recipe.model_dump(mode="json")}
    (search / "pareto.json").write_text(json.dumps([{**row, "score": 0.0}]))
    (search / "search.json").write_text(json.dumps({"searcher": "tpe", "seed": 0, "budget": "0.5%", "space": "default",
                                                    "data_dir": str(GLUE)}))
    cli("export", str(search), "--format", "peft", "--overwrite", "-o", str(work / "lora-peft"))
    cli("export", str(search), "--merge", "--overwrite", "-o", str(work / "lora-merged"))

    split = load_split(get_task("sst2"), "validation", GLUE)
    tok = load_tokenizer("minilm-l6")
    ours_model = load_trained(search / "trained" / "lora-start")
    peft_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2), str(work / "lora-peft")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(str(work / "lora-merged")).eval()
    diffs = {"peft": 0.0, "merged": 0.0}
    correct = {"autopeft": 0, "peft": 0, "merged": 0}
    with torch.no_grad():
        for i in range(0, len(split), 64):
            texts = [t[0] for t in split.texts[i:i + 64]]
            labels = torch.as_tensor(split.labels[i:i + 64])
            b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            ours = ours_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for name, m in (("peft", peft_model), ("merged", merged)):
                theirs = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                diffs[name] = max(diffs[name], float((ours - theirs).abs().max()))
                correct[name] += int((theirs.argmax(-1) == labels).sum())
            correct["autopeft"] += int((ours.argmax(-1) == labels).sum())
    n = len(split)
    print(f"SST-2 validation ({n} sentences): accuracy " + ", ".join(f"{k} {v / n:.4f}" for k, v in correct.items())
          + "; max |logit difference| vs autopeft: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="autopeft-export-")))
