"""The one small interface every PEFT method implements, and the registry that holds them.

A method is a module with

* a config class (``MethodConfig`` subclass, pydantic) whose ``method`` field is the canonical
  recipe name and whose other fields are its hyperparameters with documented defaults;
* an ``apply(model, config)`` function that injects the method into an :class:`autopeft.composition.model.ComposedModel`
  through that model's composition API (``wrap_linear``, ``add_adapter``, ``add_prefix``, ...),
  leaving exactly the method's new parameters trainable.

Both join through :func:`register`, once, with the method's other facts (:class:`MethodSpec`: its
peft mapping, whether it merges, ...). Parameter accounting is generic: what ``apply`` left trainable
is what the method costs (see :func:`autopeft.composition.model.count_parameters`).

The built-in methods are registered by the package :mod:`autopeft.methods`, which Python runs before
this module whenever anything under it is imported, so the registry is complete when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict
from typing_extensions import Annotated

from autopeft.backbones.arch import canonical_target, canonical_targets, resolve_layers

#: A ``target_modules`` field: canonical Linear target names (aliases such as ``q`` accepted).
TargetModules = Annotated[list[str], AfterValidator(canonical_targets)]

if TYPE_CHECKING:  # pragma: no cover
    from autopeft.composition.model import ComposedModel


class MethodConfig(BaseModel):
    """Base of every method's config. Unknown keys are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    #: Multiply this component's contribution by a learned gate ``sigmoid(W x)`` (UniPELT, eq. 1-3).
    #: ``None`` takes the recipe-level ``gating`` switch.
    gated: bool | None = None
    #: Layers that get the component: ``all``, ``upper_half``, ``lower_half`` or a list of indices.
    layers: list[int] | str = "all"

    #: Methods that can claim their slots together with this one (e.g. ``adapter_fusion`` over
    #: several ``adapter`` components).
    shares_slots_with: ClassVar[tuple[str, ...]] = ()

    def input_tokens(self) -> int:
        """Virtual tokens this component inserts into the input sequence. They take position ids,
        so ``training.max_seq_length`` plus all of them must fit the backbone's positions (checked by
        :func:`autopeft.composition.recipe.check_recipe`). Prefixes (prefix tuning, P-Tuning v2, MAM, UniPELT)
        only extend the attention keys and values and take none."""
        return 0

    def check_fit(self, limits: "BackboneLimits", recipe: Any) -> None:
        """Raise ``ValueError`` (a one-line message) when this component cannot run on a backbone of
        ``limits`` with ``recipe``'s task and training settings.

        The one hook for constraints that depend on the backbone, the task or the training length:
        :func:`autopeft.composition.recipe.check_recipe` calls it for every component before anything is built,
        so ``load_recipe``, ``check_composition`` and ``count_recipe`` (hence every point a search
        samples) reject such recipes at load. Overrides call ``super().check_fit`` (which checks
        ``layers`` against the backbone's depth and the method against the backbone's family).
        """
        limits.check_method(self.method)
        if not limits.resolve_layers(self.layers):  # was: a component in no layer, 0 parameters, no effect
            raise ValueError("layers [] puts the component in no layer: list at least one, or leave the component out")


#: Model types whose position ids start after the padding index (RoBERTa's
#: ``create_position_ids_from_input_ids``): ``pad_token_id + 1`` of their position embeddings are
#: never used for tokens (RoBERTa-base: 514 embeddings, 512 usable positions).
PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert", "data2vec-text")


@dataclass(frozen=True)
class BackboneLimits:
    """The sizes a recipe must fit, read from a backbone's transformers config (no weights).

    Attributes:
        num_layers: L. hidden_size: d. intermediate_size: d_ff. num_heads: attention heads.
        positions: usable position ids (``None`` when the config does not say): ``max_position_embeddings``
            less RoBERTa's padding offset for :data:`PADDING_OFFSET_MODEL_TYPES`.
        positions_source: how ``positions`` was derived, for messages.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    positions: int | None = None
    positions_source: str = "max_position_embeddings"
    family: Any = None
    num_kv_heads: int = 0
    head_dim: int = 0
    model_type: str = ""
    unsupported: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, config: Any) -> "BackboneLimits":
        """Limits of a transformers ``PretrainedConfig`` of a known family (:data:`autopeft.backbones.arch.FAMILIES`).

        Raises:
            ArchitectureError: the model type is in no family.
        """
        from autopeft.backbones.arch import family_of

        model_type = getattr(config, "model_type", "")
        fam = family_of(config)
        n = getattr(config, "max_position_embeddings", None)
        source = f"max_position_embeddings {n}"
        if n is not None and model_type in PADDING_OFFSET_MODEL_TYPES:
            pad = getattr(config, "pad_token_id", None)
            offset = (1 if pad is None else int(pad)) + 1
            n, source = int(n) - offset, f"max_position_embeddings {n} less {model_type}'s padding offset {offset}"
        d = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
            or getattr(config, "hidden_dim", None) or 4 * d
        head_dim = int(getattr(config, "head_dim", None) or d // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(int(config.num_hidden_layers), d, int(f), heads, None if n is None else int(n), source,
                   fam, kv, head_dim, model_type, tuple(unsupported_methods(fam.missing_features(config)).items()))

    def linear_shape(self, target: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of Linear slot ``target`` on this backbone (GQA keys/values are
        ``kv_heads * head_dim`` wide; GPT-2's fused ``qkv`` is ``3 d``).

        Raises:
            ValueError: the backbone's family has no such Linear.
        """
        d, f = self.hidden_size, self.intermediate_size
        key = self.family.target(target) if self.family is not None else canonical_target(target)
        kv = self.num_kv_heads * self.head_dim if self.num_kv_heads else d
        q = self.num_heads * self.head_dim if self.head_dim else d
        return {"ffn_in": (d, f), "ffn_gate": (d, f), "ffn_out": (f, d), "qkv": (d, 3 * d), "query": (d, q),
                "key": (d, kv), "value": (d, kv), "attention_output": (q, d)}[key]

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` (one line) when ``method`` cannot run on this backbone's family."""
        why = dict(self.unsupported).get(method)
        if why:
            raise ValueError(f"{method} is not supported on {self.model_type or self.family.name} backbones: {why}")

    def resolve_layers(self, layers: list[int] | str | None) -> list[int]:
        """``layers`` as sorted indices (as :meth:`autopeft.backbones.arch.Encoder.resolve_layers`).

        Raises:
            ValueError: an index beyond the backbone's layers, or an unknown name.
        """
        return resolve_layers(layers, self.num_layers)


@dataclass(frozen=True)
class TrainedFolder:
    """A folder written by :func:`autopeft.training.saved.save_trained` that a component reads (AdapterFusion's
    stage-one adapters), as :meth:`autopeft.composition.model.ComposedModel.trained_folder` hands it to a method:
    methods never read files themselves; the edge that builds the model reads them.

    Attributes:
        path: the folder. recipe: its recipe. task: its task's name. backbone_config: its backbone's
        transformers config (``None`` when it cannot be loaded). tensors: its saved tensors by name
        (``None`` when not read, e.g. on the meta device).
    """

    path: str
    recipe: Any
    task: str
    backbone_config: Any = None
    tensors: dict[str, Any] | None = None


@dataclass(frozen=True)
class PeftTarget:
    """What the peft export (:mod:`autopeft.exporting.hf_export`) hands a method's :attr:`PeftMapping.build`.

    Attributes:
        model: the trained autopeft ``ComposedModel``.
        recipe: its recipe.
        wrappers: backbone path -> the model's LoRA-like ``LinearWrapper`` there (peft's ``target_modules``).
        extras: ``model.extras`` by name (prompt / prefix encoders).
        bias: ``"all"`` when a bias-only component (BitFit) rides on this config, else ``"none"``.
        path_of: the path a module of the model's backbone has in the *unmodified* backbone.
    """

    model: Any
    recipe: Any
    wrappers: dict[str, Any]
    extras: dict[str, Any]
    bias: str
    path_of: Callable[[Any], str]


@dataclass(frozen=True)
class PeftMapping:
    """How a method's trained tensors become one Hugging Face peft adapter.

    Attributes:
        build: ``build(cfg, target) -> (peft config, fill, notes)``: the peft config for component
            ``cfg`` (a :class:`PeftTarget` gives the model), ``fill(peft_model)`` copying autopeft's
            tensors into the model peft builds from it, and notes for the model card. Called only
            after :attr:`check` and the generic checks passed.
        check: ``check(cfg, backbone_config) -> reason | None``: why peft cannot hold this component
            exactly (one clause); ``backbone_config()`` returns the backbone's transformers config
            (loaded on the first call).
        bias_only: the method trains biases only; its peft form is ``bias="all"`` on another
            component's config (BitFit), or its own ``build`` when it is alone.
        carries_bias: this method's peft config can train every bias too (``bias="all"``), so a
            ``bias_only`` component may ride on it.
        label: how the messages name the method (``LoRA``).
    """

    build: Callable[[Any, PeftTarget], tuple[Any, Callable[[Any], None], list[str]]]
    check: Callable[[Any, Callable[[], Any]], str | None] | None = None
    bias_only: bool = False
    carries_bias: bool = False
    label: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its canonical name, config class, injection function and paper, and the
    facts the rest of autopeft asks instead of testing the method's name.

    Attributes:
        peft: how it exports to Hugging Face peft, or ``None`` (then ``why_not_peft`` says why).
        why_not_peft: one clause, the reason peft cannot hold it (``None`` ``peft`` only).
        merges: its whole effect is a linear update of backbone tensors, so it folds into the weights.
        why_not_merge: one clause, the reason it cannot be merged (``merges`` false only).
        quantized_base: it needs the backbone's Linear weights quantised (NF4) before it is applied.
        is_peft: it counts as a PEFT component (full fine-tuning does not: a search point made only of
            such components is ``empty``, and the smallest-configuration scan skips them).
        why_not_one_shot: non-empty when the one-shot supernet must leave it out; the clause says why.
        needs: backbone features it cannot run without (``prefix``, ``bias``; a family lacking one says
            so in :attr:`autopeft.backbones.arch.Family.unsupported`).
        search_defaults: dimensions (``{parameter: spec}``, as a search-space file writes them) that a
            search space gets for a component of this method when it does not set them itself.
        as_built: ``as_built(model, cfg) -> cfg``: the component as the built ``model`` now holds it
            (e.g. AdapterFusion after pruning adapters), for saving; return ``cfg`` itself when nothing
            changed (:func:`autopeft.composition.recipe.recipe_as_built`).
    """

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[["ComposedModel", Any], None]
    paper: str
    peft: PeftMapping | None = None
    why_not_peft: str = ""
    merges: bool = False
    why_not_merge: str = ""
    quantized_base: bool = False
    is_peft: bool = True
    why_not_one_shot: str = ""
    needs: tuple[str, ...] = ()
    search_defaults: dict[str, Any] = field(default_factory=dict)
    as_built: Callable[[Any, Any], Any] | None = None

    def peft_refusal(self) -> str:
        """Why peft cannot hold this method (its own reason, else a generic clause)."""
        return self.why_not_peft or f"peft has no counterpart of {self.name}"

    def merge_refusal(self) -> str:
        """Why this method cannot be merged into the weights (its own reason, else a generic clause)."""
        return self.why_not_merge or f"{self.name} is not a linear update of the backbone's weights"


_REGISTRY: dict[str, MethodSpec] = {}

#: The twelve canonical method names of the recipe format, in the order of the docs.
CANONICAL_METHODS = (
    "bitfit", "prefix_tuning", "p_tuning", "p_tuning_v2", "adapter", "adapter_fusion",
    "adapter_drop", "lora", "adalora", "qlora", "mam", "unipelt",
)


def register(name: str, config_cls: type[MethodConfig], paper: str, **facts: Any) -> Callable:
    """Decorator that registers ``apply`` as the injection function of method ``name``.

    ``facts`` are the method's other :class:`MethodSpec` fields (``peft``, ``merges``, ...); a method
    states them here, once, and every other module reads them from :func:`get_method`.

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: an unknown fact.
    """

    def deco(apply: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, paper, **facts)
        return apply

    return deco


def get_method(name: str) -> MethodSpec:
    """Look up a registered method.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of all registered methods, canonical order first."""
    order = {n: i for i, n in enumerate(CANONICAL_METHODS)}
    return sorted(_REGISTRY, key=lambda n: (order.get(n, 99), n))


def parse_component(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """Validate one recipe component (``{"method": "lora", "r": 8, ...}``) into its config.

    Raises:
        ValueError: no ``method`` key, an unknown method, or invalid hyperparameters.
    """
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"a component needs a 'method' key, got {data!r}")
    spec = get_method(str(data["method"]))
    return spec.config_cls.model_validate(data)


def unsupported_methods(missing: dict[str, str]) -> dict[str, str]:
    """Registered methods that need one of the ``missing`` backbone features (feature -> reason), each
    with the reason of the first such feature."""
    out = {}
    for name in available_methods():
        why = next((missing[need] for need in get_method(name).needs if need in missing), None)
        if why:
            out[name] = why
    return out


def spec_of(component: MethodConfig) -> MethodSpec:
    """The registered :class:`MethodSpec` of a parsed component."""
    return get_method(component.method)
