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
  argument, which transformers 5 renamed ``cache``); peft 0.22 runs it, but with a cache an encoder
  such as BERT shifts the input's position ids by the prefix length, which autopeft's encoder prefixes
  do not (its logits differ: 0.36 at most on the tests' tiny BERT). The
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
``autopeft train`` (:func:`autopeft.training.saved.save_trained`). A search keeps the trained weights
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

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autopeft._util import check_can_write
from autopeft.backbones.arch import is_causal
from autopeft.composition.recipe import Recipe
from autopeft.errors import ExportError, first_line
from autopeft.exporting.base_model import (  # noqa: F401  (re-exported: their old home)
    MINILM_HUB_ID, backbone_paths, base_model_name, base_model_source, fresh_backbone, label_maps,
)
from autopeft.exporting.checks import (  # noqa: F401  (re-exported: their old home)
    check_exportable, merge_blocker, peft_blocker, pooling_blocker,
)
from autopeft.exporting.model_card import model_card
from autopeft.exporting.pooling_code import (  # noqa: F401  (re-exported: their old home)
    POOLED_MODEL_TYPE_PREFIX, POOLING_CODE_FILE, write_pooling_code,
)
from autopeft.exporting.sources import (  # noqa: F401  (training_inputs: re-exported, its old home)
    Provenance, check_not_inside, fill_metrics, trained_source, training_inputs,
)
from autopeft.methods.base import PeftTarget, get_method
from autopeft.searching.runs import RUNS_DIR, TRAINED_ON_FILE  # noqa: F401  (TRAINED_ON_FILE: its old home)
from autopeft.training.saved import is_trained_folder  # noqa: F401  (re-exported: its old home)

#: Largest max-abs logit difference an export may show against autopeft's model (float32).
VERIFY_TOL = 1e-4


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


# ----- writing ------------------------------------------------------------------------------------
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
    backbone = fresh_backbone(recipe)
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
    from autopeft.methods.lora import NonFiniteMergeError

    parts = _parts(model)
    backbone = fresh_backbone(recipe)
    _write_backbone_tensors(backbone, parts.backbone_tensors)
    with torch.no_grad():
        for path, wrapper in parts.wrappers.items():
            base = backbone.get_submodule(path)
            try:
                merged = wrapper.merged_weight(base.weight.dtype)
            except NonFiniteMergeError as exc:
                raise ExportError(f"{path}: {exc}") from None
            base.weight.copy_(merged.T if _is_conv1d(base) else merged)  # (d_out, d_in); Conv1D (d_in, d_out)
    backbone.save_pretrained(str(out))
    if pooling_blocker(recipe) is not None:
        return [write_pooling_code(backbone, recipe.pooling, out)]
    return []


#: The folder formats: format -> ``write(model, recipe, out) -> notes``.
_WRITERS: dict[str, Callable[[Any, Recipe, Path], list[str]]] = {"peft": _write_peft, "merged": _write_merged}


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

    loaded = peft.PeftModel.from_pretrained(fresh_backbone(recipe), str(out))
    return peft_logits(loaded, ids, mask)


#: How each folder format is loaded back for verification: format -> ``logits(recipe, out, ids, mask)``.
_LOADED_LOGITS = {"peft": _peft_folder_logits, "merged": _merged_logits}


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
        source: a folder written by ``autopeft train`` / :func:`autopeft.training.saved.save_trained` (the
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
    from autopeft.training.saved import load_trained

    if fmt not in _WRITERS:
        raise ExportError(f"unknown export format {fmt!r} for a model folder; valid: {', '.join(_WRITERS)}")
    if output is None:
        raise ExportError(f"--format {fmt} writes a folder: give it with -o DIR")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: remove it, pick another -o, or pass --overwrite")
    check_can_write(out, "-o", ExportError)
    if is_trained_folder(source):
        if pick not in (None, "best"):
            raise ExportError(f"{source} holds one trained model; --pick applies to searches")
        check_not_inside(out, Path(source))
        folder = Path(source)
        recipe = load_recipe(folder / "recipe.yaml")
        check_exportable(recipe, fmt, f"{folder} itself, loaded with autopeft.training.saved.load_trained")
        prov = fill_metrics(Provenance(trained_dir=str(folder.resolve())), folder)
    else:
        folder, prov = trained_source(source, pick or "best", output_dir, fmt, data_dir, train, log, train_with,
                                      output=out)
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
