"""Search spaces as data: a YAML file of dimensions over method choice and hyperparameters.

Format (``search_spaces/default.yaml`` is the reference)::

    name: default
    fidelity: {max_train_examples: 24000, min_train_examples: 2688, reduction_factor: 3}
    components:
      lora:                          # a method name from the registry
        enabled: [true, false]       # a list is a categorical choice
        r: [4, 8, 16]
        target_modules: [[query, value], [query, key, value]]   # choices may be lists
      adapter:
        enabled: [false, true]
        placement: parallel          # a scalar is fixed
        reduction_factor: {int: [24, 96]}
    gating: [false, true]
    training:
      learning_rate: {loguniform: [5.0e-4, 5.0e-3]}
    start_points:                    # known good configurations, tried first
      - {lora.enabled: true, lora.r: 8, adapter.enabled: false}

A component key is a method name, or any name with a ``method:`` entry (two differently placed
adapters: ``serial_adapter: {method: adapter, placement: serial}``). Top-level ``quantization``
(``none``/``nf4``) and ``pooling`` (``pooler``/``cls``/``mean``: what the task head reads) are
dimensions like ``gating``. ``per_layer: {num_layers: 6}`` adds one on/off
dimension per layer (``layer.0`` ...), applied as every component's ``layers`` (AutoPEFT's layer
selection); the search checks that the backbone has that many layers. A component whose method
needs another (AdapterDrop needs adapters) is left out when none of those is on. ``one_of:
{lowrank: [lora, adalora, qlora]}`` makes one categorical dimension ``one_of.lowrank`` (``none`` or a
member) in place of the members' ``enabled`` switches, for methods that claim the same slots.

Dimension forms: scalar (fixed); list (choice); ``{choice: [...]}``; ``{uniform: [lo, hi]}``;
``{loguniform: [lo, hi]}``; ``{int: [lo, hi]}`` (inclusive); ``{logint: [lo, hi]}``.
Flat keys are ``<method>.<param>``, ``gating`` and ``training.<param>``. Every method keeps its
``enabled`` switch; a component that is off contributes nothing to the recipe.

Names are checked at load, since they become MLflow parameter keys (``space.<flat key>``): component
keys and ``one_of`` group names use letters, digits, ``_`` and ``-`` only, are not one of the
space's own prefixes (``training``, ``one_of``, ``layer``, ...), and leave every ``space.<flat key>``
within MLflow's 250 characters; ``training`` keys must be training settings of a recipe.
Values are checked at load too (:func:`_check_dim_values`): each fixed value, choice and range bound
against its setting (``r: eight`` is an error naming ``lora.r``), and the fidelity (whole numbers,
``1 <= min_train_examples <= max_train_examples``, ``reduction_factor >= 2``).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from autopeft.methods.base import get_method, spec_of
from autopeft.composition.recipe import Recipe, recipe_from_dict
from autopeft._util import read_yaml
from autopeft.errors import AutopeftError


def _spaces_dir():
    """The shipped search spaces: ``search_spaces/`` at the top of the repository, installed inside the
    package as ``autopeft/search_spaces/`` (pyproject.toml maps it). Installed: that package data, read
    through :mod:`importlib.resources` (a Traversable, a Path on disk); in a source checkout (or an
    editable install, which maps the folder but leaves the package folder without it): the repository's
    own folder."""
    packaged = importlib.resources.files("autopeft") / "search_spaces"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "search_spaces"


#: Where the shipped search spaces live (:func:`_spaces_dir`).
SPACES_DIR = _spaces_dir()


def shipped_spaces() -> list[str]:
    """Names of the search spaces shipped with autopeft (``default``, ``full``, ...), sorted."""
    return sorted(p.name[:-len(".yaml")] for p in SPACES_DIR.iterdir() if p.name.endswith(".yaml"))


_KINDS = ("choice", "uniform", "loguniform", "int", "logint")


#: The keys a search-space file may have (anything else, e.g. a misspelt ``start_point:``, is refused).
SPACE_KEYS = ("name", "components", "one_of", "gating", "pooling", "quantization", "per_layer", "training",
              "fidelity", "start_points")

#: Training settings a space may not set: every trial of a search shares them (the fidelity and its
#: schedule, the seed, the examples every rung is scored on, so that the scheduler and the front compare
#: trials on the same footing); where each is set instead.
SEARCH_LEVEL_TRAINING = {
    "max_train_examples": "the space's fidelity.max_train_examples or --max-train-examples sets it",
    "schedule_examples": "the top fidelity sets it (one schedule for every rung)",
    "seed": "--seed sets it",
    "max_eval_examples": "search(training={'max_eval_examples': N}) sets it",
    "rung_eval_examples": "--rung-eval-examples sets it",
}


class SearchSpaceError(AutopeftError, ValueError):
    """An invalid search-space file."""


@dataclass(frozen=True)
class Dim:
    """One dimension: ``kind`` in choice/uniform/loguniform/int/logint/fixed; ``values`` its data."""

    kind: str
    values: tuple

    @classmethod
    def parse(cls, key: str, spec: Any) -> "Dim":
        if isinstance(spec, list):
            if len(spec) > 1:
                return cls("choice", tuple(spec))
            return cls("fixed", (spec[0],) if spec else ([],))  # [x] is fixed x; [] is a fixed empty list
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _KINDS:
            kind, vals = next(iter(spec.items()))
            if kind == "choice":
                if not isinstance(vals, list) or not vals:  # was: TypeError ('int' object is not iterable)
                    raise SearchSpaceError(f"{key}: choice needs a list of values, got {vals!r}")
                return cls("choice", tuple(vals))
            numbers = isinstance(vals, list) and len(vals) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
            if not (numbers and vals[0] < vals[1]):  # was: TypeError comparing a string bound
                raise SearchSpaceError(f"{key}: {kind} needs [low, high], two numbers with low < high, got {vals!r}")
            if kind in ("int", "logint") and not all(float(v).is_integer() for v in vals):
                raise SearchSpaceError(f"{key}: {kind} needs whole-number bounds, got {vals!r} (uniform for fractions)")
            if kind in ("loguniform", "logint") and vals[0] <= 0:
                raise SearchSpaceError(f"{key}: {kind} needs a positive low bound, got {vals[0]!r}")
            return cls(kind, tuple(vals))
        return cls("fixed", (spec,))

    @property
    def encoded(self) -> bool:
        """Choices that are not plain scalars travel through Optuna as JSON strings."""
        return self.kind == "choice" and any(isinstance(v, (list, dict)) for v in self.values)

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def default(self) -> Any:
        """A representative value: the first choice, the low bound, or the fixed value."""
        return self.values[0]


@dataclass(frozen=True)
class Fidelity:
    """Multi-fidelity settings, in training examples seen: rungs ``min * rf^k`` up to ``max`` (ASHA)."""

    max_train_examples: int = 24000
    min_train_examples: int = 2688
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        """Raises :class:`SearchSpaceError` for a value :meth:`rungs` cannot use (was: a reduction
        factor of 1, or a minimum of 0, looped forever before the first trial, printing nothing)."""
        for name in ("max_train_examples", "min_train_examples", "reduction_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "reduction_factor" else 1):
                least = "a whole number >= 2" if name == "reduction_factor" else "a positive whole number of examples"
                raise SearchSpaceError(f"fidelity.{name} must be {least}, got {value!r}")
        if self.min_train_examples > self.max_train_examples:
            raise SearchSpaceError(f"fidelity.min_train_examples ({self.min_train_examples:,}) is above "
                                   f"max_train_examples ({self.max_train_examples:,})")

    def rungs(self) -> list[int]:
        """Examples-seen milestones, ascending, ending at ``max_train_examples`` (a rung within 1% of
        the top merges into it: 333 * 3 * 3 = 2997 is not a rung below 3000)."""
        out, r = [], float(self.min_train_examples)
        while r < 0.99 * self.max_train_examples:
            out.append(int(round(r)))
            r *= self.reduction_factor
        return out + [self.max_train_examples]

    def search_rungs(self, batch_size: int) -> list[int]:
        """The rungs a search uses: :meth:`rungs` with each lower rung rounded up to whole batches
        (a rung never splits a batch), strictly ascending, ending at ``max_train_examples``. The
        trials report at exactly these and the scheduler's milestones are exactly these."""
        top = self.max_train_examples
        out: list[int] = []
        for r in self.rungs()[:-1]:
            r = int(math.ceil(r / batch_size) * batch_size)
            if r < top and (not out or r > out[-1]):
                out.append(r)
        return out + [top]


@dataclass
class SearchSpace:
    """A parsed search space. Use :meth:`load`; :meth:`to_recipe` turns one sampled point into a recipe."""

    name: str
    dims: dict[str, Dim]
    fidelity: Fidelity = field(default_factory=Fidelity)
    start_points: list[dict[str, Any]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    source: str = ""
    component_methods: dict[str, str] = field(default_factory=dict)
    num_layers: int | None = None
    groups: dict[str, str] = field(default_factory=dict)  # component -> one_of group

    @property
    def fingerprint(self) -> str:
        """What the search samples from, as 16 hex digits of a SHA-256: the dimensions and their
        values, the fidelity, the start points, the components and groups. Two spaces with the same
        fingerprint propose the same points; a YAML file edited (or a shipped space changed by an
        upgrade) between a search and its resume changes it (``search.json`` records it)."""
        doc = {"dims": {k: [d.kind, list(d.values)] for k, d in sorted(self.dims.items())},
               "fidelity": [self.fidelity.max_train_examples, self.fidelity.min_train_examples,
                            self.fidelity.reduction_factor],
               "start_points": self.start_points, "methods": self.methods, "component_methods": self.component_methods,
               "groups": self.groups, "num_layers": self.num_layers}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, name_or_path: str | Path = "default") -> "SearchSpace":
        """Load a shipped space by name (``default``, ``full``, ``autopeft_paper``) or a YAML path.

        Raises:
            SearchSpaceError: missing file, bad YAML, unknown method or parameter.
        """
        path = Path(name_or_path)
        if not path.suffix:  # a shipped name
            path = SPACES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SearchSpaceError(f"search space {str(name_or_path)!r} not found; shipped: {', '.join(shipped_spaces())}")
        return cls.from_dict(read_yaml(path, SearchSpaceError), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "SearchSpace":
        if not isinstance(data, dict) or "components" not in data:
            raise SearchSpaceError("a search space needs a 'components' mapping")
        dims: dict[str, Dim] = {}
        methods = []
        component_methods: dict[str, str] = {}
        components = data.get("components") or {}
        if isinstance(components, list):  # a recipe's components are a list of configured methods
            raise SearchSpaceError("a search space's 'components' maps names to parameter ranges, not a list "
                                   "(a recipe's list: `autopeft train --recipe` takes a recipe)")
        if not isinstance(components, dict):
            raise SearchSpaceError(f"a search space's 'components' maps names to parameter ranges, got "
                                   f"{type(components).__name__} {components!r:.40}")
        if "name" in data and not (isinstance(data["name"], str) and data["name"].strip()):
            raise SearchSpaceError(f"a search space's 'name' is a non-empty string, got {data['name']!r:.60}")
        unknown = [str(k) for k in data if k not in SPACE_KEYS]
        if unknown:  # a typo (`start_point:`, `fidelty:`) was ignored: the search ran without it
            raise SearchSpaceError(f"a search space has no key {', '.join(map(repr, unknown))}; valid: {', '.join(SPACE_KEYS)}")
        for key, params in components.items():
            _check_name("component", key)
            if params is not None and not isinstance(params, dict):
                raise SearchSpaceError(f"component {key!r}: its parameters must be a mapping, not {params!r}")
            params = dict(params or {})
            method = params.pop("method", key)
            try:
                spec = get_method(method)
            except ValueError as exc:
                raise SearchSpaceError(str(exc)) from None
            for pname, pspec in {**spec.search_defaults, "enabled": [True, False]}.items():
                params.setdefault(pname, pspec)
            fields = set(spec.config_cls.model_fields) - {"method"}
            for pname, pspec in params.items():
                if pname != "enabled" and pname not in fields:
                    raise SearchSpaceError(f"{key}: {method} has no parameter {pname!r}; valid: {', '.join(sorted(fields))}")
                dims[f"{key}.{pname}"] = Dim.parse(f"{key}.{pname}", pspec)
            methods.append(key)
            component_methods[key] = method
        for key, kind in (("one_of", "a mapping of group names to lists of components"),
                          ("training", "a mapping of training settings"), ("fidelity", "a mapping"),
                          ("start_points", "a list of mappings")):
            value = data.get(key)
            if value is None:
                continue
            ok = isinstance(value, dict) if key != "start_points" else (
                isinstance(value, list) and all(isinstance(p, dict) for p in value))
            if not ok:  # was: TypeError / AttributeError, or a string's letters taken as start-point keys
                raise SearchSpaceError(f"a search space's {key!r} is {kind}, got {value!r:.60}")
        groups: dict[str, str] = {}
        for group, members in (data.get("one_of") or {}).items():
            _check_name("one_of group", group)
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise SearchSpaceError(f"one_of.{group} is a list of components, got {members!r:.60}")
            for m in members:
                if m not in component_methods:
                    raise SearchSpaceError(f"one_of.{group} names {m!r}, which is not a component of this space")
                if m in groups:
                    raise SearchSpaceError(f"{m!r} is in two one_of groups ({groups[m]} and {group}); put it in one")
                dims.pop(f"{m}.enabled", None)
                groups[m] = group
            dims[f"one_of.{group}"] = Dim("choice", ("none", *members))
        dims["gating"] = Dim.parse("gating", data.get("gating", False))
        dims["pooling"] = Dim.parse("pooling", data.get("pooling", "pooler"))
        dims["quantization"] = Dim.parse("quantization", data.get("quantization", "none"))
        per_layer = data.get("per_layer")
        num_layers = None
        if per_layer:
            if not isinstance(per_layer, dict) or set(per_layer) - {"num_layers", "choices"}:
                raise SearchSpaceError(f"per_layer is a mapping of num_layers and choices, not {per_layer!r}")
            num_layers = per_layer.get("num_layers", 0)
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
                raise SearchSpaceError(f"per_layer needs num_layers, a whole number >= 1, got {num_layers!r}")
            for i in range(num_layers):
                dims[f"layer.{i}"] = Dim.parse(f"layer.{i}", per_layer.get("choices", [True, False]))
        from autopeft.composition.recipe import TrainingConfig

        for pname, pspec in (data.get("training") or {}).items():
            if pname not in TrainingConfig.model_fields:
                raise SearchSpaceError(f"training has no setting {str(pname)!r}; valid: {', '.join(TrainingConfig.model_fields)}")
            if pname in SEARCH_LEVEL_TRAINING:
                raise SearchSpaceError(f"training.{pname} is a setting of the whole search, not of a trial: "
                                       f"{SEARCH_LEVEL_TRAINING[pname]}")
            dims[f"training.{pname}"] = Dim.parse(f"training.{pname}", pspec)
        _check_param_keys(dims)
        off = {k for k in component_methods if dims.get(f"{k}.enabled") == Dim("fixed", (False,))}
        for key, dim in dims.items():  # a component that is never on may hold placeholders (full.yaml's adapters: [])
            if key.split(".", 1)[0] not in off:
                _check_dim_values(key, dim, component_methods)
        try:
            fid = Fidelity(**(data.get("fidelity") or {}))
        except TypeError as exc:
            raise SearchSpaceError(f"fidelity: {exc}; valid: max_train_examples, min_train_examples, reduction_factor") from None
        starts = [dict(p) if isinstance(p, dict) else p for p in data.get("start_points") or []]  # not the caller's dicts
        space = cls(data.get("name", Path(source).stem or "custom"), dims, fid, starts,
                    methods, source, component_methods, num_layers, groups)
        for point in space.start_points:
            unknown = set(point) - set(dims)
            if unknown:
                raise SearchSpaceError(f"start point names unknown dimensions {sorted(unknown)}")
            for key, value in point.items():  # a value the sampler cannot hold fails here, not mid-search
                _check_in_dim(key, dims[key], value)
        return space

    def for_backbone(self, config: Any) -> tuple["SearchSpace", list[str]]:
        """This space without what cannot run on the backbone of ``config`` (a transformers config).

        Components whose method the backbone's family does not support
        (:func:`autopeft.methods.base.unsupported_methods`, e.g. prefixes on DeBERTa's relative
        attention, BitFit on bias-free Llama) are dropped, with their dimensions, from ``one_of``
        choices and from start points that turn them on; ``cls`` pooling is dropped on decoder
        families (their first token sees only itself). Returns the new space and one note per drop
        (``[]`` and ``self`` when nothing is dropped).
        """
        from autopeft.methods.base import BackboneLimits

        limits = BackboneLimits.of(config)
        unsupported = dict(limits.unsupported)
        name = limits.model_type or limits.family.name
        dropped = [k for k in self.methods if self.component_methods.get(k, k) in unsupported]
        notes = [f"{k} left out of the search: {self.component_methods.get(k, k)} is not supported on {name} "
                 f"backbones ({unsupported[self.component_methods.get(k, k)]})" for k in dropped]
        dims = {k: d for k, d in self.dims.items() if k.split(".", 1)[0] not in dropped}
        for group in set(self.groups.values()):
            key = f"one_of.{group}"
            keep = tuple(v for v in dims[key].values if v not in dropped)
            dims[key] = Dim("choice", keep) if len(keep) > 1 else Dim("fixed", keep[:1])
        pooling = dims.get("pooling")
        if limits.family.causal and pooling is not None and "cls" in pooling.values:
            keep = tuple(v for v in pooling.values if v != "cls") or ("pooler",)  # a decoder's pooler is its last token
            dims["pooling"] = Dim("choice", keep) if len(keep) > 1 else Dim("fixed", keep[:1])
            notes.append(f"pooling 'cls' left out of the search: the first token of a causal {name} model sees only "
                         "itself (decoders pool the last token: 'pooler' = 'last')")
        if not notes:
            return self, []

        def keeps(point: dict[str, Any]) -> bool:
            return not any(point.get(f"{k}.enabled") is True or point.get(f"one_of.{self.groups.get(k)}") == k
                           for k in dropped)

        starts = [{k: v for k, v in p.items() if k in dims and not (k == "pooling" and v == "cls")}
                  for p in self.start_points if keeps(p)]
        return replace(self, dims=dims, start_points=starts, methods=[m for m in self.methods if m not in dropped],
                       component_methods={k: v for k, v in self.component_methods.items() if k not in dropped},
                       groups={k: v for k, v in self.groups.items() if k not in dropped}), notes

    def with_training(self, overrides: dict[str, Any]) -> tuple["SearchSpace", list[str]]:
        """The space with the user's training settings (``--batch-size``, ``search(training=...)``) in
        place of its own ``training.<key>`` dimensions, fixed or searched, and of the start points'
        values for them: what the user sets explicitly wins over the space. Returns ``(space, notes)``,
        one note per searched dimension the override fixed."""
        dims, notes = dict(self.dims), []
        for k, v in overrides.items():
            key = f"training.{k}"
            if key in dims:
                if dims[key].kind != "fixed" and dims[key].values != (v,):
                    notes.append(f"{key} fixed at {v!r} (your setting) instead of searched over {list(dims[key].values)}")
                dims[key] = Dim("fixed", (v,))
        if dims == self.dims:
            return self, []
        fixed = {f"training.{k}" for k in overrides}
        starts = [{k: v for k, v in p.items() if k not in fixed} for p in self.start_points]
        return replace(self, dims=dims, start_points=starts), notes

    # ----- Ray Tune / Optuna side --------------------------------------------------------------
    def tunable(self) -> dict[str, Dim]:
        return {k: d for k, d in self.dims.items() if d.kind != "fixed"}

    def complete_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """A full, encoded configuration from a partial start point (missing dims: off / first value)."""
        out = {}
        for k, d in self.tunable().items():
            if k in point:
                v = point[k]
            elif k.endswith(".enabled"):
                v = False
            elif k.startswith("one_of."):
                v = "none"
            elif k.startswith("layer."):
                v = True
            else:
                v = d.default()
            out[k] = d.encode(v)
        return out

    def decode(self, config: dict[str, Any]) -> dict[str, Any]:
        """Sampled (encoded) config -> plain values, with the fixed dimensions filled in."""
        out = {k: d.values[0] for k, d in self.dims.items() if d.kind == "fixed"}
        for k, v in config.items():
            if k in self.dims:
                out[k] = self.dims[k].decode(v)
        return out

    def to_recipe(self, config: dict[str, Any], base: dict[str, Any]) -> Recipe:
        """Build the recipe of one sampled point.

        Args:
            config: flat sampled values (as Ray Tune passes them).
            base: recipe fields the search fixes: ``backbone``, ``task``, ``training`` defaults.

        Raises:
            RecipeError: the point does not make a valid recipe.
        """
        values = self.decode(config)
        layers = None
        if self.num_layers:
            layers = [i for i in range(self.num_layers) if values.get(f"layer.{i}", True)]
        components = []
        for key in self.methods:
            group = self.groups.get(key)
            on = values.get(f"one_of.{group}") == key if group else values.get(f"{key}.enabled", False)
            if not on or (layers is not None and not layers):
                continue
            comp = {"method": self.component_methods.get(key, key)}
            if layers is not None:
                comp["layers"] = layers
            for k, v in values.items():
                if k.startswith(key + ".") and not k.endswith(".enabled"):
                    comp[k.split(".", 1)[1]] = v
            components.append(comp)
        present = {c["method"] for c in components}
        components = [c for c in components if _requirements_met(c["method"], present)]
        training = dict(base.get("training") or {})
        for k, v in values.items():
            if k.startswith("training."):
                training[k.split(".", 1)[1]] = v
        return recipe_from_dict({**base, "components": components, "gating": bool(values.get("gating", False)),
                                 "pooling": values.get("pooling", "pooler"),
                                 "quantization": values.get("quantization", "none"), "training": training})


    # ----- the smallest configuration -------------------------------------------------------------
    def _on(self, key: str, values: dict[str, Any]) -> bool:
        group = self.groups.get(key)
        return values.get(f"one_of.{group}") == key if group else bool(values.get(f"{key}.enabled", False))

    def smallest_point(self, base: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The configuration of this space with the fewest trainable parameters among those with at
        least one PEFT component, and that number.

        Counts on the meta device: ``count_recipe(self.to_recipe(point, base))``. Approach: every
        component adds its own modules in its own slots (and its own gates), so a configuration with
        several components has at least the parameters of each of them alone; the minimum is a single
        component. For each component (one whose method is no PEFT method, such as full fine-tuning, aside:
        ``MethodSpec.is_peft``) the point
        starts with that component alone (other components off, other ``one_of`` groups ``none``) at
        its dimensions' first values; then every dimension of the component and the shared ones
        (``gating``, ``pooling``, ``quantization``, ``layer.<i>``) in turn tries each of its choices
        (a range: both bounds), keeping any that lowers the count, until none does. Counts are
        products and sums of per-dimension factors (rank x matrices x layers, bottleneck x
        sublayers), so this per-dimension descent reaches each component's minimum with a few dozen
        counts instead of the whole grid. Training dimensions keep their first values (they do not
        change the count). Points that are no valid recipe (a ``RecipeError``, e.g. a prompt too long
        for the backbone) are skipped.

        Args:
            base: recipe fields the search fixes (``backbone``, ``task``, ``training``), as for :meth:`to_recipe`.

        Returns:
            ``(point, trainable_params)``; ``point`` is encoded like :meth:`complete_point`, so
            ``self.to_recipe(point, base)`` builds it and :meth:`describe_point` names it.

        Raises:
            SearchSpaceError: no configuration of the space with a PEFT component is a valid recipe.
        """
        from autopeft.composition.recipe import RecipeError, count_recipe

        tunable = self.tunable()

        def count(values: dict[str, Any]) -> int | None:
            try:
                recipe = self.to_recipe({k: tunable[k].encode(v) for k, v in values.items()}, base)
                if not any(spec_of(c).is_peft for c in recipe.components):
                    return None
                return count_recipe(recipe).trainable_params
            except RecipeError:
                return None

        shared = [k for k in tunable if k in ("gating", "pooling", "quantization") or k.startswith("layer.")]
        best: tuple[dict[str, Any], int] | None = None
        for key in self.methods:
            if not get_method(self.component_methods.get(key, key)).is_peft:
                continue
            values = self._component_alone(key, tunable)
            if values is None:
                continue  # fixed off: never in a configuration of this space
            own = [k for k in tunable if k.startswith(key + ".") and not k.endswith(".enabled")]
            values, current = _descend(values, own + shared, tunable, count)
            if current is not None and (best is None or current < best[1]):
                best = ({k: tunable[k].encode(v) for k, v in values.items()}, current)
        if best is None:
            raise SearchSpaceError(f"search space {self.name!r} has no configuration with a PEFT component that is a "
                                   "valid recipe for this backbone and task")
        return best

    def _component_alone(self, key: str, tunable: dict[str, Dim]) -> dict[str, Any] | None:
        """The (decoded) values of a point with component ``key`` alone: every dimension at its first
        value, the other components off, other ``one_of`` groups ``none``; ``None`` when the space
        fixes ``key`` off."""
        values = {k: d.default() for k, d in tunable.items()}
        for k in tunable:
            if k.endswith(".enabled"):
                values[k] = False
            elif k.startswith("one_of."):
                values[k] = "none"
        group = self.groups.get(key)
        if group:
            values[f"one_of.{group}"] = key
        elif f"{key}.enabled" in tunable:
            values[f"{key}.enabled"] = True
        elif not self.dims[f"{key}.enabled"].values[0]:
            return None
        return values

    def describe_point(self, point: dict[str, Any]) -> str:
        """A short summary of a point: its components with their sampled values, e.g.
        ``adapter (placement=parallel, reduction_factor=128, sublayers=[ffn])``."""
        values = self.decode(point)
        tunable = self.tunable()
        parts = []
        for key in self.methods:
            if not self._on(key, values):
                continue
            params = [f"{k.split('.', 1)[1]}={_fmt(v)}" for k, v in values.items()
                      if k in tunable and k.startswith(key + ".") and not k.endswith(".enabled")]
            parts.append(f"{key} ({', '.join(params)})" if params else key)
        text = " + ".join(parts) or "no component"
        if values.get("gating"):
            text += ", gated"
        if self.num_layers:
            text += f", layers {[i for i in range(self.num_layers) if values.get(f'layer.{i}', True)]}"
        return text


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


#: Names a user writes in a space (component keys, ``one_of`` groups) become flat dimension keys
#: (``<component>.<param>``, ``one_of.<group>``), Optuna/Ray parameter names and MLflow parameter keys
#: (``space.<dimension>``): letters, digits, ``_`` and ``-`` only (a ``.`` would split the flat key;
#: MLflow forbids most other characters, and a ``/`` makes a key a path).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
#: First parts of the space's own flat keys, which a component name must not shadow.
RESERVED_NAMES = ("one_of", "training", "layer", "gating", "pooling", "quantization")


def _check_dim_values(key: str, dim: Dim, component_methods: dict[str, str]) -> None:
    """Raise :class:`SearchSpaceError` (one line, key and value) when a value ``dim`` can take (a
    fixed value, each choice, each bound of a range) is not valid for the setting ``key`` names.

    Each value is validated as that one field of its model (the method's config, ``TrainingConfig``,
    ``Recipe``): its type and bounds, and the field's own validators; checks across fields stay with
    the recipe. Switches (``<component>.enabled``, ``gating``, ``layer.<i>``) must be ``true``/``false``.
    Was: ``r: eight`` or ``learning_rate: abc`` made every sampled point an invalid recipe, and the
    search stopped with "no configuration ... is a valid recipe", naming neither.
    """
    from pydantic import ValidationError

    from autopeft.composition.recipe import TrainingConfig

    head, _, name = key.partition(".")
    values = dim.values if dim.kind in ("choice", "fixed") else dim.values[:2]
    if head == "one_of":
        return
    if head in ("gating", "layer") or name == "enabled":
        bad = [v for v in values if not isinstance(v, bool)]
        if bad:
            raise SearchSpaceError(f"{key}: {bad[0]!r} is not true or false")
        return
    if head in ("pooling", "quantization"):
        model, field, extra = Recipe, head, {}
    elif head == "training":
        model, field, extra = TrainingConfig, name, {}
    else:
        method = component_methods[head]
        model, field, extra = get_method(method).config_cls, name, {"method": method}
    for value in values:
        try:
            model.model_validate({**extra, field: value})
        except ValidationError as exc:
            errs = [e for e in exc.errors() if tuple(e["loc"][:1]) == (field,)]  # not checks across fields
            if errs:
                raise SearchSpaceError(f"{key}: {value!r} is not a valid value ({errs[0]['msg']})") from None


def _check_in_dim(key: str, dim: Dim, value: Any) -> None:
    """Raise :class:`SearchSpaceError` (one line) when a start point's ``value`` is not one of ``dim``'s
    choices or outside its range (Optuna would refuse it when the search enqueues the point)."""
    if dim.kind in ("choice", "fixed"):
        choices = dim.values if dim.kind == "choice" else [dim.values[0]]
        if dim.encode(value) not in [dim.encode(c) for c in choices]:
            raise SearchSpaceError(f"start point {key}={value!r} is not one of the space's choices {choices}")
    elif dim.kind in ("uniform", "loguniform", "int", "logint"):
        low, high = dim.values[0], dim.values[1]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise SearchSpaceError(f"start point {key}={value!r} is outside the space's range [{low}, {high}]")


def _short(name: str, keep: int = 40) -> str:
    return repr(name) if len(name) <= keep else f"{name[:keep]!r}... ({len(name)} characters)"


def _check_name(kind: str, name: Any) -> None:
    """Raise SearchSpaceError unless ``name`` (a component key or a one_of group) is a valid name."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SearchSpaceError(f"{kind} name {_short(str(name))} may only contain letters, digits, '_' and '-'")
    if kind == "component" and name in RESERVED_NAMES:
        raise SearchSpaceError(f"component name {name!r} is reserved ({', '.join(RESERVED_NAMES)}); name it otherwise "
                               f"and give its method with 'method:'")


def _check_param_keys(dims: dict[str, Dim]) -> None:
    """Every dimension's MLflow parameter key (``space.<dimension>``) fits MLflow's length limit."""
    from autopeft.searching.tracking import MAX_PARAM_KEY_LENGTH, space_param_key

    longest: dict[tuple[str, str], str] = {}  # (kind, user-written name) -> its longest parameter key
    for k in dims:
        first, _, rest = k.partition(".")
        owner = ("one_of group", rest) if first == "one_of" else ("component", first)
        key = space_param_key(k)
        if len(key) > len(longest.get(owner, "")):
            longest[owner] = key
    for (kind, name), key in longest.items():
        if len(key) > MAX_PARAM_KEY_LENGTH:
            room = MAX_PARAM_KEY_LENGTH - (len(key) - len(name))
            raise SearchSpaceError(f"{kind} name {_short(name)} is too long: its MLflow parameter key {_short(key, 30)} "
                                   f"would have {len(key)} characters, MLflow allows {MAX_PARAM_KEY_LENGTH}; use at most "
                                   f"{room} characters")

def _requirements_met(method: str, present: set[str]) -> bool:
    """A method with ``requires_any`` (e.g. AdapterDrop) needs one of those methods in the recipe."""
    needs = getattr(get_method(method).config_cls, "requires_any", ())
    return not needs or bool(set(needs) & present)


def _descend(values: dict[str, Any], keys: list[str], tunable: dict[str, Dim],
             count: Callable[[dict[str, Any]], int | None]) -> tuple[dict[str, Any], int | None]:
    """Per-dimension descent (:meth:`SearchSpace.smallest_point`): each of ``keys`` in turn tries each of
    its choices (a range: both bounds), keeping any that lowers ``count(values)``, until none does;
    returns the values and their count (``None``: no valid recipe among them)."""
    def candidates(dim: Dim) -> tuple:
        if dim.kind in ("int", "logint"):
            return (int(dim.values[0]), int(dim.values[1]))
        return dim.values  # choices, or the bounds of a uniform range

    current = count(values)
    improved = True
    while improved:
        improved = False
        for k in keys:
            for v in candidates(tunable[k]):
                if v == values[k]:
                    continue
                n = count({**values, k: v})
                if n is not None and (current is None or n < current):
                    values, current, improved = {**values, k: v}, n, True
    return values, current
