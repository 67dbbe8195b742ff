"""The recipe: one YAML document that fully describes a trial, and the functions that build it.

Example::

    backbone: minilm-l6
    task: sst2
    components:
      - method: lora
        r: 8
        lora_alpha: 16
        target_modules: [query, value]
      - method: adapter
        placement: parallel
        reduction_factor: 16
    gating: false
    pooling: mean                  # pooler (default), cls or mean
    quantization: none
    training: {learning_rate: 1.0e-3, batch_size: 32, max_train_examples: 24000, seed: 0}

A component given with only ``method`` takes that method's documented defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from autopeft.methods.base import MethodConfig, parse_component, spec_of
from autopeft.data.tasks import DevSplit, TaskSpec
from autopeft._util import read_yaml, require_file, validation_message
from autopeft.errors import AutopeftError, CompositionError


#: The weights file of a trained folder (beside its ``recipe.yaml``; :func:`autopeft.training.saved.save_trained`).
ADAPTER_FILE = "adapter_model.safetensors"


class RecipeError(AutopeftError, ValueError):
    """A recipe that cannot be read or validated; the message is one line."""


class TrainingConfig(BaseModel):
    """Training settings of a trial.

    ``max_train_examples`` is the fidelity: how many training examples the trial sees (it cycles
    through the shuffled train split when larger). ``schedule_examples`` is the horizon of the
    learning-rate schedule (linear warm-up then linear decay), by default ``max_train_examples``; a
    multi-fidelity search sets it to the top rung so that every rung shares one schedule.
    """

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(1e-3, gt=0)
    head_learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    max_train_examples: int = Field(24000, ge=1)
    schedule_examples: int | None = Field(None, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(128, ge=8)
    #: Batches of examples of similar length (seeded; see ``autopeft.training.batches.length_grouped_order``): far less
    #: padding, so 2-3x faster steps on short-sentence tasks such as SST-2.
    group_by_length: bool = True
    max_eval_examples: int | None = Field(None, ge=1)
    #: Examples of the eval split scored at a rung below the top fidelity (``max_train_examples``): a
    #: seeded sample (:meth:`autopeft.data.splits.Split.sample`, seeded by the dev split's seed), the
    #: same for every trial, so the scheduler still compares trials on the same examples. ``None``: all of
    #: it. The top rung, the score a search selects and reports on, always reads the whole split (up to
    #: ``max_eval_examples``). A search sets it to :data:`autopeft.api.RUNG_EVAL_EXAMPLES` (500) unless
    #: told otherwise (``--rung-eval-examples``): ``experiments/search_overhead.md`` measures why.
    rung_eval_examples: int | None = Field(None, ge=1)
    seed: int = 0
    #: Compute precision (:mod:`autopeft.backbones.precision`): ``auto`` (bf16 where the hardware runs it fast,
    #: fp16 on older CUDA, else fp32), ``fp32``, ``bf16`` or ``fp16``. Trainable parameters, their
    #: gradients and the optimiser state are float32 whatever it is; the forward pass and loss run
    #: under autocast.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    #: Storage dtype of the frozen backbone's Linear weights: ``auto`` = the precision's compute dtype.
    backbone_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Recompute each layer's activations in the backward pass instead of keeping them (Chen et al.
    #: 2016, arXiv:1604.06174): less memory, ~1.3x the step time. ``None``: on for backbones over
    #: :data:`autopeft.training.setup.CHECKPOINTING_FROM` (1B) parameters.
    gradient_checkpointing: bool | None = None
    #: Dropout probability of the frozen backbone's own dropout modules while training (embeddings,
    #: attention probabilities, hidden states, the task head's): ``None`` keeps the backbone's config
    #: values (BERT, MiniLM: 0.1); ``0.0`` switches them off, which also makes a step cheaper. Method
    #: modules keep their own settings (``lora_dropout``, ...). Evaluation never drops either way.
    backbone_dropout: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _half_weights_need_half_compute(self) -> "TrainingConfig":
        # fp32 compute has no autocast to meet half-precision weights: every matmul would mix dtypes.
        # (``auto`` resolves per device; cast_for_training refuses the same mix after resolving it.)
        if self.precision == "fp32" and self.backbone_dtype in ("bf16", "fp16"):
            raise ValueError(f"backbone_dtype {self.backbone_dtype} needs a half precision to compute in: "
                             f"set precision to bf16 or fp16 (or auto), or backbone_dtype to auto/fp32")
        return self


class Recipe(BaseModel):
    """A complete trial description: backbone, task, method components, gating, quantisation, training."""

    model_config = ConfigDict(extra="forbid")

    backbone: str | dict[str, Any] = "minilm-l6"
    #: A built-in task name, or a :class:`autopeft.data.tasks.TaskSpec` (user data: source, columns, the
    #: label mapping, the held-out split; or a built-in task with another metric to maximise).
    task: str | TaskSpec = "sst2"
    components: list[SerializeAsAny[MethodConfig]] = Field(default_factory=list)
    gating: bool = False
    #: What the task head reads: ``pooler`` (the backbone's own), ``cls`` (first token) or ``mean``
    #: (masked mean of the last hidden states). The head is outside the budget whichever is used.
    pooling: Literal["pooler", "cls", "mean"] = "pooler"
    quantization: Literal["none", "nf4"] = "none"
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    #: Where the trial is scored. ``None``: on the task's validation split, training on all of train
    #: (a recipe written by hand). Set (every search sets it): on a dev split carved from train
    #: (:class:`autopeft.data.tasks.DevSplit`), training on the rest; the validation split is then the
    #: untouched ``test`` split, scored once after training by ``autopeft train``, never in a search.
    dev: DevSplit | None = None

    @field_validator("components", mode="before")
    @classmethod
    def _components(cls, v):
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError("components must be a list of {method: ..., ...} mappings")
        out = []
        for i, c in enumerate(v):
            try:
                out.append(parse_component(c))
            except ValidationError as exc:
                raise ValueError(validation_message(exc, prefix=f"[{i}] {c.get('method')}.", whole="component")) from None
        return out

    @field_validator("task", mode="before")
    @classmethod
    def _task_spec(cls, v):
        """A spec mapping is read as a :class:`TaskSpec` here, so its errors name the spec's fields
        (``task: regression: ...``), not the members of the ``str | TaskSpec`` union."""
        if isinstance(v, dict):
            try:
                return TaskSpec.model_validate(v)
            except ValidationError as exc:
                raise ValueError(validation_message(exc, whole="spec")) from None
        if not isinstance(v, (str, TaskSpec)):
            raise ValueError(f"a task name or a task spec mapping, got {type(v).__name__} {v!r}")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | TaskSpec) -> str | TaskSpec:
        from autopeft.data.tasks import get_task

        task = get_task(v)
        return task.name if isinstance(v, str) else v

    def to_yaml(self) -> str:
        """The recipe as YAML (only what differs from the defaults is not pruned: it is complete)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping.

    Raises:
        RecipeError: with a one-line message naming the bad field and value.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(validation_message(exc, whole="recipe")) from None
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def load_recipe(path: str | Path, check: bool = True) -> Recipe:
    """Read a recipe YAML file; with ``check`` (default) also assemble it on the meta device
    (:func:`check_composition`). ``check=False`` is for a caller that assembles it next anyway
    (:func:`count_recipe` does the same check).

    Raises:
        RecipeError: missing file, bad YAML or invalid content; with ``check``, components that do
            not compose.
    """
    path = Path(path)
    require_file(path, "recipe file", RecipeError)
    recipe = recipe_from_dict(read_yaml(path, RecipeError))
    if check:
        check_composition(recipe)
    return recipe


def check_composition(recipe: Recipe) -> None:
    """Assemble the recipe on the meta device (no weights, no memory) to catch combinations that
    do not fit, such as two components claiming the same slot.

    Raises:
        RecipeError: the components do not compose; the message names both.
    """
    count_recipe(recipe)  # the meta-device assembly is count_recipe's; the count is not needed here


#: Vocabulary of the tokenizer that bare-config backbones use (the bundled BERT uncased one).
BARE_CONFIG_VOCAB = 30522


def check_recipe(recipe: Recipe, config: Any = None, for_training: bool = False) -> None:
    """Check every constraint that depends on the backbone, the task or the training settings.

    The single place for them (``check_composition``, ``count_recipe`` and so ``load_recipe``, the
    CLI and every point a search counts call it; ``build_model`` itself does not, so tests can
    build any shape): the backbone's width is a multiple of its heads; every component's
    :meth:`~autopeft.methods.base.MethodConfig.check_fit` (layer indices, LoRA/AdaLoRA rank vs the
    matrix sizes, adapter bottleneck > 0, AdapterDrop depth, AdaLoRA's schedule vs the training
    steps, P-Tuning's insert position); and ``training.max_seq_length`` plus the virtual tokens the
    components insert (:meth:`~autopeft.methods.base.MethodConfig.input_tokens`) fit the backbone's
    positions (``max_position_embeddings``, less RoBERTa's padding offset). With ``for_training``,
    also what only training needs: presets (``{preset: llama-2-7b}``) count only, never train (random
    weights; a 7B preset would fill memory); bare-config backbones tokenise with the bundled BERT tokenizer,
    so they need its 30,522-token vocabulary and, for sentence-pair tasks, two token types.

    Args:
        config: the backbone's transformers config (default: loaded from ``recipe.backbone``).

    Raises:
        RecipeError: one line naming the component, the setting and the limit.
        BackboneError: the backbone cannot be found.
    """
    from autopeft.backbones import load_config
    from autopeft.methods.base import BackboneLimits
    from autopeft.data.tasks import get_task

    task = get_task(recipe.task)
    if config is None:
        config = load_config(recipe.backbone, task.num_labels)
    limits = BackboneLimits.of(config)
    if limits.hidden_size % limits.num_heads:
        raise RecipeError(f"backbone: hidden_size {limits.hidden_size} is not a multiple of num_attention_heads "
                          f"{limits.num_heads}")
    for i, component in enumerate(recipe.components):
        try:
            component.check_fit(limits, recipe)
        except ValueError as exc:
            raise RecipeError(f"components[{i}] {component.method}: {exc}") from None
    t = recipe.training.max_seq_length
    prompts = [(i, c) for i, c in enumerate(recipe.components) if c.input_tokens()]
    p = sum(c.input_tokens() for _, c in prompts)
    if limits.positions is not None and t + p > limits.positions:
        where = f"the backbone's {limits.positions} positions ({limits.positions_source})"
        if not prompts:
            raise RecipeError(f"training.max_seq_length {t} exceeds {where}: use at most {limits.positions}")
        names = " + ".join(f"components[{i}] {c.method}" for i, c in prompts)
        fix = (f"the largest prompt that fits is {limits.positions - t}" if limits.positions > t
               else f"lower training.max_seq_length to at most {limits.positions - p}")
        raise RecipeError(f"{names}: prompt length {p} (num_virtual_tokens) + training.max_seq_length {t} = {t + p} "
                          f"exceeds {where}; {fix}")
    if for_training and isinstance(recipe.backbone, dict) and "preset" in recipe.backbone:
        preset = recipe.backbone["preset"]
        real = "minilm-l6" if preset == "minilm-l6" else "its Hugging Face id or a local folder"
        raise RecipeError(f"backbone: preset {preset!r} describes sizes for counting only (random weights, which "
                          f"train to chance level): to train, use {real} as the backbone")
    if for_training and isinstance(recipe.backbone, dict):
        vocab = int(getattr(config, "vocab_size", BARE_CONFIG_VOCAB))
        if vocab < BARE_CONFIG_VOCAB:
            raise RecipeError(f"backbone: vocab_size {vocab} is smaller than the {BARE_CONFIG_VOCAB:,} tokens of the "
                              f"BERT tokenizer that bare-config backbones use for training: use vocab_size >= "
                              f"{BARE_CONFIG_VOCAB}")
        types = int(getattr(config, "type_vocab_size", 2))
        if len(task.text_columns) > 1 and types < 2:
            raise RecipeError(f"backbone: type_vocab_size {types} cannot embed the second segment of {task.name}'s "
                              f"sentence pairs (the BERT tokenizer gives it token type 1): use type_vocab_size >= 2")


def build_model(recipe: Recipe, device: str = "cpu", after_component=None):
    """Build the backbone and apply every component: returns a :class:`autopeft.composition.model.ComposedModel`.

    ``after_component(index, model)``, if given, is called after component ``index`` is applied
    (e.g. to attribute the modules each component created).

    ``device="meta"`` builds shapes only (parameter counting without weights or memory). The model
    comes back in eval mode - every module, the new method modules and stage-1 adapters loaded by
    ``adapter_fusion`` included, as ``from_pretrained`` returns a backbone; call ``.train()`` to train
    (:func:`autopeft.training.trainer.run_trial` does).

    Raises:
        BackboneError, CompositionError, TaskError: as their names say.
    """
    from autopeft.backbones import load_model
    from autopeft.composition.model import ComposedModel
    from autopeft.data.tasks import get_task

    task = get_task(recipe.task)
    backbone = load_model(recipe.backbone, task.num_labels, device=device, seed=recipe.training.seed)
    if recipe.quantization == "nf4" or any(spec_of(c).quantized_base for c in recipe.components):
        from autopeft.backbones.quantization import quantize_backbone

        quantize_backbone(backbone, device=device)
    import torch

    torch.manual_seed(recipe.training.seed)
    model = ComposedModel(backbone, gating=recipe.gating, pooling=recipe.pooling, read_folder=read_trained_folder)
    for i, component in enumerate(recipe.components):
        model.add_component(component)
        if after_component is not None:
            after_component(i, model)
    return model.eval()


def read_trained_folder(folder: str | Path, with_tensors: bool = True, kind: str = "trained folder"):
    """Read a folder written by :func:`autopeft.training.saved.save_trained` as an
    :class:`autopeft.methods.base.TrainedFolder`: its recipe, task, backbone config (``None`` if it
    cannot be loaded) and, with ``with_tensors``, its saved tensors. The reader
    :func:`build_model` hands the model, so that methods never read files (``kind`` names the
    folder in messages, e.g. ``stage-1 folder``).

    Raises:
        CompositionError: no ``recipe.yaml`` / weights file there, or a recipe that does not load.
    """
    from autopeft.backbones import BackboneError, load_config
    from autopeft.methods.base import TrainedFolder
    from autopeft.data.tasks import get_task

    path = Path(folder).expanduser()
    if not (path / "recipe.yaml").is_file() or not (path / ADAPTER_FILE).is_file():
        raise CompositionError(f"{str(path)!r} is not a {kind} (needs recipe.yaml and {ADAPTER_FILE} from save_trained)")
    try:
        recipe = load_recipe(path / "recipe.yaml")
    except RecipeError as exc:
        raise CompositionError(str(exc)) from None
    task = get_task(recipe.task)
    try:
        config = load_config(recipe.backbone, task.num_labels)
    except (BackboneError, OSError, ValueError):  # cannot tell: the tensor shapes are still checked
        config = None
    tensors = None
    if with_tensors:
        from safetensors.torch import load_file

        tensors = load_file(str(path / ADAPTER_FILE))
    return TrainedFolder(str(path), recipe, task.name, config, tensors)


def recipe_as_built(model, recipe: Recipe) -> Recipe:
    """``recipe`` as ``model`` now stands: each component through its method's ``as_built`` hook
    (:class:`autopeft.methods.base.MethodSpec`; e.g. AdapterFusion lists only the adapters still fused
    after pruning). Returns ``recipe`` itself when nothing changed; :func:`autopeft.training.saved.save_trained`
    writes what it returns.

    Raises:
        CompositionError: as the hooks raise (e.g. a stage-1 folder that can no longer be read).
    """
    components, changed = [], False
    for comp in recipe.components:
        hook = spec_of(comp).as_built
        new = hook(model, comp) if hook is not None else comp
        changed = changed or new is not comp
        components.append(new)
    if not changed:
        return recipe
    data = recipe.model_dump(mode="json")
    data["components"] = [c.model_dump(mode="json") for c in components]
    return recipe_from_dict(data)


def count_recipe(recipe: Recipe):
    """Trainable parameters of a recipe, without weights (meta device): a :class:`ParameterCount`.

    Raises:
        RecipeError: the recipe cannot run (:func:`check_recipe`) or its components do not compose.
    """
    from autopeft.composition.model import count_parameters

    check_recipe(recipe)
    try:
        model = build_model(recipe, device="meta")
    except CompositionError as exc:
        raise RecipeError(str(exc)) from None
    return count_parameters(model)


def backbone_weight_bytes(recipe: Recipe) -> dict[str, int]:
    """Bytes of the recipe's bare backbone weights in fp32 / bf16 / nf4, counted on the meta device
    (:func:`autopeft.backbones.quantization.weight_bytes`). Apart from :func:`count_recipe`, which a
    search calls for every sampled point, so that only ``autopeft count`` and GPU packing pay for it."""
    from autopeft.backbones import load_model
    from autopeft.backbones.quantization import weight_bytes
    from autopeft.data.tasks import get_task

    return weight_bytes(load_model(recipe.backbone, get_task(recipe.task).num_labels, device="meta"))
