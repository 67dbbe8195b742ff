"""The one small interface every PEFT method implements, and the registry that holds them.

A method is a module with

* a config class (``MethodConfig`` subclass, pydantic) whose ``method`` field is the canonical
  recipe name and whose other fields are its hyperparameters with documented defaults;
* an ``apply(model, config)`` function that injects the method into an :class:`autopeft.model.PeftModel`
  through that model's composition API (``wrap_linear``, ``add_adapter``, ``add_prefix``, ...),
  leaving exactly the method's new parameters trainable.

Both join through :func:`register`, once. Parameter accounting is generic: what ``apply`` left
trainable is what the method costs (see :func:`autopeft.model.count_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict
from typing_extensions import Annotated

from autopeft.arch import canonical_targets

#: A ``target_modules`` field: canonical Linear target names (aliases such as ``q`` accepted).
TargetModules = Annotated[list[str], AfterValidator(canonical_targets)]

if TYPE_CHECKING:  # pragma: no cover
    from autopeft.model import PeftModel


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


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its canonical name, config class, injection function and paper."""

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[["PeftModel", Any], None]
    paper: str


_REGISTRY: dict[str, MethodSpec] = {}

#: The twelve canonical method names of the recipe format, in the order of the docs.
CANONICAL_METHODS = (
    "bitfit", "prefix_tuning", "p_tuning", "p_tuning_v2", "adapter", "adapter_fusion",
    "adapter_drop", "lora", "adalora", "qlora", "mam", "unipelt",
)


def register(name: str, config_cls: type[MethodConfig], paper: str) -> Callable:
    """Decorator that registers ``apply`` as the injection function of method ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(apply: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, paper)
        return apply

    return deco


def get_method(name: str) -> MethodSpec:
    """Look up a registered method.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of all registered methods, canonical order first."""
    _load_builtin()
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


def _load_builtin() -> None:
    # Importing the package registers the built-in methods (each module calls ``register``).
    import autopeft.methods  # noqa: F401
