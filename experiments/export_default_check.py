"""Issue 13's done-when on the real default run: its picked point, exported from the search folder without
retraining, loads as a user loads it and gives the printed test score to the last example.

1. ``autopeft export SEARCH --pick best --format peft``: the default best point reads mean pooling, which
   peft's base model (``*ForSequenceClassification``, pooler head) does not have: one line, exit 2, naming
   ``--merge``.
2. ``autopeft export SEARCH --pick best --merge -o DIR``: the kept weights of the pick
   (``SEARCH/trained/<trial>/``), LoRA folded into the weights, the mean-pooling head shipped as
   ``modeling_autopeft.py``.
3. DIR loaded the way its model card says (``AutoTokenizer`` and
   ``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)``, the same flag for
   the tokenizer, nothing from
   autopeft), run on the task's validation split (the search's test split) with the recipe's
   truncation; its accuracy is compared with the test score the search printed (``pareto.json``), and its
   predictions with autopeft's own model (``load_trained``) example by example.

Run from the project root: ``python experiments/export_default_check.py [SEARCH] [WORK]`` (default
``autopeft_runs/default-run2``; about a minute on 2 cores). Prints what experiments/default_search_sst2.md quotes.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_peft_check import cli  # noqa: E402  (the same "$ autopeft ..." echo)


def predict(model, tok, texts, max_length: int, batch: int = 64) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1))
    return torch.cat(out).numpy()


def main(search: Path, work: Path) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.saved import load_trained

    front = json.loads((search / "pareto.json").read_text())
    best = max(front, key=lambda r: (r["score"], -r["trainable_params"]))
    print(f"pick best: {best['trial_id']}, dev {best['score']:.4f}, printed test {best['test_score']:.4f}")
    cli("export", str(search), "--pick", "best", "--format", "peft", "-o", str(work / "peft"))
    res = cli("export", str(search), "--pick", "best", "--merge", "--overwrite", "-o", str(work / "merged"))
    if res.returncode != 0:
        return 1
    tok = AutoTokenizer.from_pretrained(str(work / "merged"), trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(work / "merged"), trust_remote_code=True).eval()
    ours = load_trained(search / "trained" / best["trial_id"]).eval()
    max_length = int(best["recipe"]["training"].get("max_seq_length", 128))
    test = load_split(get_task("sst2"), "validation", GLUE)
    texts = [t[0] for t in test.texts]
    gold = np.asarray(test.labels)
    theirs, mine = predict(model, tok, texts, max_length), predict(ours, tok, texts, max_length)
    acc = float((theirs == gold).mean())
    print(f"loaded with transformers (trust_remote_code=True): {type(model).__name__}")
    print(f"test accuracy of the exported folder: {acc:.4f} ({int((theirs == gold).sum())}/{len(gold)}); "
          f"printed by the search: {best['test_score']:.4f}; "
          f"predictions differing from autopeft's model: {int((theirs != mine).sum())} of {len(gold)}")
    return 0 if abs(acc - best["test_score"]) < 1e-9 and (theirs == mine).all() else 1


if __name__ == "__main__":
    search = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "autopeft_runs" / "default-run2"
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="export-default-"))
    sys.exit(main(search, work))
