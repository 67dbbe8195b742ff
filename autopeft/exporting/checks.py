"""What can be exported, and why not: one clause per refusal, checked before any training.

:func:`check_exportable` raises :class:`autopeft.errors.ExportError` with what to use instead
(``--merge``, ``--format peft`` or autopeft's own recipe format).
"""

from __future__ import annotations

import functools

from torch import nn

from autopeft.composition.recipe import Recipe
from autopeft.errors import ExportError
from autopeft.exporting.base_model import backbone_config, head_module
from autopeft.methods.base import available_methods, get_method

#: The model-folder formats (:func:`autopeft.exporting.hf_export.export_model`).
FOLDER_FORMATS = ("peft", "merged")


def pooling_blocker(recipe: Recipe) -> str | None:
    """Why the recipe's pooling is not the backbone's own head input, or ``None`` when it is.

    ``pooler`` is the backbone's own head (what ``*ForSequenceClassification`` runs). ``cls`` equals
    it only where the backbone's head itself reads the first token (RoBERTa/ELECTRA-style heads, not a
    bare Linear); ``mean`` never does.
    """
    if recipe.pooling == "pooler":
        return None
    if recipe.pooling == "cls":
        from autopeft.composition.recipe import build_model

        head = head_module(build_model(recipe.model_copy(update={"components": []}), device="meta").backbone)
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
    gated = gated_methods(recipe)
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
    config = functools.cache(lambda: backbone_config(recipe))  # loaded once, and only when a check reads it
    for c, spec in zip(comps, specs):
        why = spec.peft.check(c, config) if spec.peft.check is not None else None
        if why:
            return why
    return pooling_blocker(recipe)


def gated_methods(recipe: Recipe) -> list[str]:
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
    gated = gated_methods(recipe)
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
        elif pooling_blocker(recipe) is not None:
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
    raise ExportError(f"unknown export format {fmt!r} for a model; valid: {', '.join(FOLDER_FORMATS)}")
