"""A trained model on disk: ``save_trained`` writes a folder (the trainable tensors and method state in
``adapter_model.safetensors``, the recipe as built, the trial's metrics), ``load_trained`` rebuilds the
model from it, ``is_trained_folder`` tells such a folder. A search keeps one per front point; ``autopeft
train --output-dir`` writes one; ``autopeft export`` and ``autopeft predict`` read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from autopeft.composition.model import ComposedModel
from autopeft.composition.recipe import ADAPTER_FILE, Recipe, build_model, recipe_as_built
from autopeft.training.setup import set_precision

if TYPE_CHECKING:
    from autopeft.training.trainer import TrialResult


def save_trained(model: ComposedModel, recipe: Recipe, result: TrialResult | None, out_dir: str | Path) -> Path:
    """Write everything that defines the trained adapter to ``out_dir``; returns ``out_dir``.

    * ``adapter_model.safetensors``: :meth:`ComposedModel.adapter_state_dict` - every trainable tensor
      plus the method modules' persistent state (AdaLoRA's rank masks and allocator step,
      AdapterDrop's inference ``n``, ...);
    * ``recipe.yaml``: the recipe of the model as it is now - after
      :func:`autopeft.methods.adapter_fusion.prune_fusion_adapters` it lists only the kept adapters;
    * ``metrics.json`` when ``result`` is given.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, str(out / ADAPTER_FILE))
    recipe = recipe_as_built(model, recipe)
    recipe.save(out / "recipe.yaml")
    if result is not None:
        (out / "metrics.json").write_text(json.dumps(result.as_dict(), indent=2))
    return out


def is_trained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_trained` (``recipe.yaml`` + weights)."""
    p = Path(path)
    return (p / "recipe.yaml").is_file() and (p / ADAPTER_FILE).is_file()


def load_trained(path: str | Path, device: str = "cpu", precision: str | None = None) -> ComposedModel:
    """Rebuild a model saved by :func:`save_trained`: fresh backbone + recipe + saved tensors.

    ``precision``: ``None`` (default) rebuilds it in the precision it was trained in (a bf16 model
    computes in bf16, so it scores as it scored in training); ``fp32`` gives float32 weights and compute
    (what an export writes).

    Restores the trainable tensors and the method modules' saved state (rank masks, ...; files
    written before that state was saved load too, with the state at its initial value), adapts the
    structure the saved tensors imply (a prefix encoder saved after ``freeze_to_table``), and returns
    the model in eval mode - every module, so two calls on the same input give the same output;
    call ``.train()`` to train it further.

    Raises:
        FileNotFoundError: the folder lacks the recipe or the weights.
        RuntimeError: the saved tensors do not match the recipe's model.
    """
    from safetensors.torch import load_file

    from autopeft.composition.recipe import load_recipe

    path = Path(path)
    recipe = load_recipe(path / "recipe.yaml")
    model = build_model(recipe, device=device)
    tensors = load_file(str(path / ADAPTER_FILE), device=device)
    for prefix, module in model.named_modules():
        adapt = getattr(module, "adapt_to_saved", None)
        if callable(adapt):
            adapt(f"{prefix}." if prefix else "", tensors)
    required = set(model.trainable_state_dict())
    allowed = required | set(model.method_state_dict())
    if not required <= set(tensors) <= allowed:
        missing, extra = sorted(required - set(tensors)), sorted(set(tensors) - allowed)
        raise RuntimeError(f"saved weights do not fit the recipe: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(tensors, strict=False)
    if precision is not None:
        recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
            update={"precision": precision, "backbone_dtype": "auto"})})
    set_precision(model, recipe, device)  # by default scored as it was trained (bf16 models in bf16)
    return model.to(device).eval()
