"""The two stages of AdapterFusion (Pfeiffer et al., arXiv:2005.00247, section 3) as Python calls.

Stage 1 (:func:`train_adapters`): one serial Pfeiffer adapter per source task, each trained alone
with :func:`autopeft.training.trainer.run_trial` and saved with :func:`autopeft.training.saved.save_trained` to
``<out_dir>/<task>/``. Stage 2 (:func:`stage2_recipe`, whose ``.save(path)``
writes it as YAML, and :func:`train_fusion`): a recipe whose first component is ``adapter_fusion`` listing those folders
(absolute paths), trained on the target task. A stage-2 model saved with ``save_trained`` holds only
the fusion layers and the head; ``load_trained`` reloads the frozen adapters from the stage-1
folders named in its recipe, so those folders must stay in place.

Example::

    from autopeft.training.fusion import train_adapters, train_fusion
    folders = train_adapters(["sst2", "mrpc", "rte"], "base.yaml", "runs/adapters", "shared/data/glue")
    result, out = train_fusion(folders, "rte", "runs/fusion-rte", "shared/data/glue", base_recipe="base.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from autopeft.methods.adapter import AdapterConfig
from autopeft.methods.adapter_fusion import AdapterFusionConfig, stage1_adapter_config
from autopeft.composition.recipe import Recipe, RecipeError, check_recipe, load_recipe, recipe_from_dict
from autopeft._util import read_yaml, require_file

RecipeLike = Recipe | dict | str | Path | None


def _task_name(recipe: Recipe) -> str:
    """The task's name (a built-in name, or the name of a user-data task spec)."""
    from autopeft.data.tasks import get_task

    return get_task(recipe.task).name


def as_recipe(recipe: RecipeLike, defaults: dict[str, Any] | None = None) -> Recipe:
    """A :class:`Recipe` from a Recipe, a mapping, a YAML path, or ``None`` (all defaults).

    ``defaults`` fill keys a mapping or file leaves unset (e.g. the stage-1 backbone).

    Raises:
        RecipeError: unreadable or invalid recipe.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None:
        data: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        data = dict(recipe)
    else:
        path = Path(recipe)
        require_file(path, "recipe file", RecipeError)
        data = read_yaml(path, RecipeError) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping")
    return recipe_from_dict({**(defaults or {}), **data})


def stage1_recipe(base_recipe: RecipeLike, task: str) -> Recipe:
    """The stage-1 recipe of one source task: ``base_recipe`` with ``task`` set.

    ``base_recipe`` gives backbone, training settings and the adapter; without components it gets
    the paper's adapter (Pfeiffer variant, serial, reduction factor 16). An ``adapter`` component
    whose ``placement`` is not written is made serial.

    Raises:
        RecipeError: invalid recipe or task.
        CompositionError: components that AdapterFusion cannot fuse (see ``stage1_adapter_config``).
    """
    base = as_recipe(base_recipe)
    comps = list(base.components)
    if not comps:
        comps = [AdapterConfig(variant="pfeiffer", placement="serial")]
    elif len(comps) == 1 and isinstance(comps[0], AdapterConfig) and "placement" not in comps[0].model_fields_set:
        comps = [comps[0].model_copy(update={"placement": "serial"})]
    data = base.model_dump(mode="json")
    data["task"] = task
    data["components"] = [c.model_dump(mode="json") for c in comps]
    recipe = recipe_from_dict(data)
    stage1_adapter_config(recipe, where=f"stage-1 recipe for {_task_name(recipe)}")
    return recipe


def train_adapters(tasks: Sequence[str], base_recipe: RecipeLike = None, out_dir: str | Path = "adapters",
                   data_dir: str | Path | None = None, *, device: str | None = None,
                   log: Callable[[str], None] | None = None) -> list[Path]:
    """Stage 1: train one adapter per task and save each to ``<out_dir>/<task>/``.

    Args:
        tasks: source GLUE tasks (e.g. ``["sst2", "mrpc", "rte"]``), each at most once.
        base_recipe: Recipe, mapping, YAML path or ``None``; see :func:`stage1_recipe`.
        out_dir: parent folder of the per-task folders.
        data_dir: local GLUE folder (else ``$AUTOPEFT_DATA_DIR``, else the hub).
        device, log: as in :func:`autopeft.training.trainer.run_trial`.

    Returns:
        The saved folders (absolute), in the order of ``tasks``: ``recipe.yaml``,
        ``adapter_model.safetensors`` and ``metrics.json`` each.

    Raises:
        ValueError: no task, or a task listed twice.
        RecipeError, TaskError, CompositionError: bad recipe, task or data.
    """
    from autopeft.training.saved import save_trained
    from autopeft.training.trainer import run_trial

    if not tasks:
        raise ValueError("train_adapters needs at least one task")
    recipes = [stage1_recipe(base_recipe, t) for t in tasks]  # validate all before training any
    names = [_task_name(r) for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"each task at most once, got {list(tasks)}")
    for recipe in recipes:
        check_recipe(recipe, for_training=True)
    out = Path(out_dir).expanduser().resolve()
    folders = []
    for recipe in recipes:
        if log:
            log(f"stage 1: training the {_task_name(recipe)} adapter")
        result, model = run_trial(recipe, data_dir, device=device, log=log)
        folders.append(save_trained(model, recipe, result, out / _task_name(recipe)))
    return folders


def stage2_recipe(adapters: Sequence[str | Path], task: str, base_recipe: RecipeLike = None,
                  **fusion_options: Any) -> Recipe:
    """Stage 2: the AdapterFusion recipe over stage-1 folders, for target ``task``.

    The backbone is the stage-1 adapters' (they must agree). ``base_recipe`` (optional) gives
    training settings, ``gating``, further components appended after the fusion (e.g.
    ``adapter_drop``) and, from an ``adapter_fusion`` component, fusion options; its ``adapter``
    components describe stage 1 and are not repeated. Without it, training settings are the first
    stage-1 recipe's. ``fusion_options`` (``names``, ``regularization``, ``value_init_noise``,
    ``layers``, ``sublayers``) override the rest.

    Raises:
        FileNotFoundError: a folder lacks ``recipe.yaml``.
        RecipeError: the stage-1 backbones differ, or the result is not a valid recipe.
        CompositionError: a stage-1 recipe is not fusable.
    """
    if not adapters:
        raise RecipeError("stage 2 needs at least one stage-1 adapter folder")
    folders = [Path(a).expanduser().resolve() for a in adapters]
    sources = []
    for folder in folders:
        if not (folder / "recipe.yaml").is_file():
            raise FileNotFoundError(f"{folder} has no recipe.yaml: not a stage-1 folder written by save_trained")
        src = load_recipe(folder / "recipe.yaml")
        stage1_adapter_config(src, where=str(folder))
        sources.append(src)
    backbone = sources[0].backbone
    for folder, src in zip(folders, sources):
        if src.backbone != backbone:
            raise RecipeError(f"stage-1 adapters use different backbones: {backbone!r} vs {src.backbone!r} ({folder})")
    first = sources[0]
    base = as_recipe(base_recipe, {"backbone": backbone}) if base_recipe is not None else None
    if base is not None and base.backbone != backbone:
        raise RecipeError(f"base recipe backbone {base.backbone!r} differs from the stage-1 adapters' {backbone!r}")
    options: dict[str, Any] = {}
    rest = []
    for comp in (base.components if base is not None else []):
        if isinstance(comp, AdapterFusionConfig):
            options.update(comp.model_dump(exclude={"adapters", "method"}, exclude_unset=True))
        elif not isinstance(comp, AdapterConfig):
            rest.append(comp.model_dump(mode="json"))
    options.update(fusion_options)
    fusion = AdapterFusionConfig(adapters=[str(f) for f in folders], **options)
    ref = base if base is not None else first
    data = {
        "backbone": backbone,
        "task": task,
        "components": [fusion.model_dump(mode="json")] + rest,
        "gating": ref.gating,
        "quantization": ref.quantization,
        "training": ref.training.model_dump(mode="json"),
    }
    return recipe_from_dict(data)


def train_fusion(adapters: Sequence[str | Path], task: str, out_dir: str | Path,
                 data_dir: str | Path | None = None, base_recipe: RecipeLike = None, *,
                 device: str | None = None, log: Callable[[str], None] | None = None,
                 **fusion_options: Any):
    """Stage 2: build :func:`stage2_recipe`, train it on ``task`` and save it to ``out_dir``.

    Returns:
        ``(TrialResult, Path)``: the result and the saved folder (reload with ``load_trained``).

    Raises:
        as :func:`stage2_recipe` and :func:`autopeft.training.trainer.run_trial`.
    """
    from autopeft.training.saved import save_trained
    from autopeft.training.trainer import run_trial

    recipe = stage2_recipe(adapters, task, base_recipe, **fusion_options)
    check_recipe(recipe, for_training=True)
    if log:
        log(f"stage 2: fusing {len(adapters)} adapters on {_task_name(recipe)}")
    result, model = run_trial(recipe, data_dir, device=device, log=log)
    return result, save_trained(model, recipe, result, out_dir)
