"""One-shot proposals: train one gated "supernet" of every candidate component, read the gates.

Before the black-box trials, :func:`propose` builds ONE model that holds every component of the
search space side by side (each at its dimension defaults; one member per ``one_of`` group), all
gated as in UniPELT (Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language
Model Tuning", arXiv:2110.07577, eq. 1-3: each component's output is scaled by
``G = sigmoid(W_G x)``), trains it briefly, and reads each component's **importance**: the mean gate
value, over a few dev batches (the search's dev split) in eval mode, over the component's gates (one per layer, see
``ComposedModel.layer_gate``). Components are ranked by importance and the best within-budget subsets
(top-1, top-1 + top-2, ... greedily, shrinking or skipping what does not fit) become extra start
points of the search. The idea of learning which modules matter in one training run, rather than
by trial and error, follows S3Delta (Hu et al., "Sparse Structure Search for Delta Tuning",
arXiv:2206.07382, which learns binary structure masks) and PrunePEFT (arXiv:2506.07587, which
prunes the PEFT modules of a combined model); here the learned "masks" are the UniPELT gates the
composition already offers.

Cost: one trial of ``examples`` training examples (default 2,000) with every component on at
once, evaluated on at most 256 dev examples, plus one forward pass over at most 256
dev examples to read the gates. Measured on MiniLM-L6 / SST-2 / 2 CPU cores with the default
space (LoRA + adapter + prefix, ~203k supernet parameters): 22 s for the default 2,000 examples
(one top-fidelity trial: ~4 minutes); the actual time is ``OneShotResult.wall_time_s``. Candidate subsets are
counted on the meta device (milliseconds each).

Limitations: a gate value is a proxy for importance, not a measurement of what a component
achieves alone; components compete inside the supernet (a large component can take over a small
one's job, so the small one's gate closes even though it would do well alone), and the gates are
read early in training at default hyperparameters: after 2,000 SST-2 examples the default space's
gates were still close together (lora 0.483, adapter 0.440, prefix 0.429), so the ranking is a weak signal.
Components that cannot be gated (BitFit, P-Tuning's input prompt, AdapterDrop, full fine-tuning)
have no gate to read; they are left out of the supernet and of the proposals (the search still
samples them). AdapterFusion is left out because it needs stage-one adapter folders. The
proposals are start points, not answers: the search evaluates them like any other point.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autopeft.searching.space import SearchSpace, _requirements_met
from autopeft.methods.base import get_method
from autopeft.composition.recipe import Recipe, RecipeError, count_recipe, recipe_from_dict
from autopeft.errors import CompositionError

#: Validation examples the gates are read on (and the supernet's own evaluation is limited to).
GATE_EXAMPLES = 256


@dataclass
class OneShotResult:
    """What the one-shot step found.

    Attributes:
        importance: component key of the space -> mean gate value over its gates, in [0, 1]
            (only the components the supernet held and could gate).
        proposals: flat start points in the space's own key format (like ``space.start_points``
            entries): valid inputs to ``space.complete_point``, within the budget, best first.
        examples: training examples the supernet saw.
        wall_time_s: seconds for the whole step (building, training, reading, counting).
    """

    importance: dict[str, float]
    proposals: list[dict[str, Any]]
    examples: int
    wall_time_s: float


def propose(space: SearchSpace, base: dict[str, Any], param_limit: int, data_dir: str | None,
            examples: int = 2000, max_proposals: int = 2, device: str | None = None,
            log: Callable[[str], None] | None = None) -> OneShotResult:
    """Train one gated supernet of the space's components and propose within-budget start points.

    Args:
        space: the search space.
        base: the recipe base the search uses (``backbone``, ``task``, ``training``).
        param_limit: the budget in trainable parameters (without the task head).
        data_dir: local GLUE folder (else ``$AUTOPEFT_DATA_DIR``, else the hub).
        examples: training examples the supernet sees (its fidelity).
        max_proposals: how many start points to return at most.
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        log: receives one-line progress messages.

    Returns:
        A :class:`OneShotResult`; ``proposals`` may be empty (nothing gated, nothing fits).

    Raises:
        TaskError, BackboneError: bad ``base``; errors of training the supernet propagate.
    """
    from autopeft.training.trainer import run_trial

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    shared = _start_settings(space)
    keys = _candidates(space, say)
    keys, recipe, gates = _supernet(space, base, keys, examples, shared, say)
    if not keys:
        say("one-shot: no component of the space can be gated; no proposals")
        return OneShotResult({}, [], 0, time.perf_counter() - t0)
    say(f"one-shot: supernet of {', '.join(keys)} (gated), {examples} training examples")
    result, model = run_trial(recipe, data_dir, device=device)
    importance = _read_importance(model, recipe, gates, data_dir)
    ranking = ", ".join(f"{k} {v:.3f}" for k, v in sorted(importance.items(), key=lambda kv: -kv[1]))
    say(f"one-shot: gate importance {ranking} ({result.examples_seen} examples, "
        f"{time.perf_counter() - t0:.0f}s)")
    proposals = _proposals(space, base, param_limit, importance, shared, max_proposals, say)
    return OneShotResult(importance, proposals, result.examples_seen, time.perf_counter() - t0)


# ----- the supernet ---------------------------------------------------------------------------
#: Settings of the space's first start point that the supernet and the proposals take over.
_SHARED_SETTINGS = ("training.learning_rate", "pooling")


def _start_settings(space: SearchSpace) -> dict[str, Any]:
    """The learning rate (and task-head pooling) of the space's first start point, where it sets them."""
    first = space.start_points[0] if space.start_points else {}
    return {k: first[k] for k in _SHARED_SETTINGS if k in first and k in space.dims}


def _candidates(space: SearchSpace, say: Callable[[str], None]) -> list[str]:
    """Component keys the search can switch on: first member per ``one_of`` group, requirements met."""
    keys, groups_seen = [], set()
    for key in space.methods:
        method = space.component_methods.get(key, key)
        why_not = get_method(method).why_not_one_shot  # e.g. AdapterFusion needs stage-one adapter folders
        if why_not:
            say(f"one-shot: {key} left out ({method} {why_not})")
            continue
        group = space.groups.get(key)
        if group is not None:
            if group in groups_seen:
                continue
            groups_seen.add(group)
        else:
            dim = space.dims.get(f"{key}.enabled")
            if dim is not None and True not in dim.values:
                continue  # never on in this space
        keys.append(key)
    present = {space.component_methods.get(k, k) for k in keys}
    out = []
    for key in keys:
        if _requirements_met(space.component_methods.get(key, key), present):
            out.append(key)
        else:
            say(f"one-shot: {key} left out (its requirements are not in the space)")
    return out


def _switch_on(space: SearchSpace, key: str) -> dict[str, Any]:
    """The flat entries that turn component ``key`` on."""
    group = space.groups.get(key)
    if group is not None:
        return {f"one_of.{group}": key}
    return {f"{key}.enabled": True} if f"{key}.enabled" in space.tunable() else {}


def _supernet_recipe(space: SearchSpace, base: dict[str, Any], keys: list[str], examples: int,
                     shared: dict[str, Any]) -> Recipe:
    """The point with ``keys`` on at their defaults, as the search builds it, then gated and short."""
    point: dict[str, Any] = {}
    for key in keys:
        point.update(_switch_on(space, key))
    tunable = space.tunable()
    if "gating" in tunable and True in tunable["gating"].values:
        point["gating"] = True
    if "quantization" in tunable and "none" in tunable["quantization"].values:
        point["quantization"] = "none"
    point.update(shared)
    recipe = space.to_recipe(space.complete_point(point), base)
    data = recipe.model_dump()
    data["gating"] = True  # every component gated, whatever the space fixes
    for comp in data["components"]:
        if comp.get("gated") is False:
            comp["gated"] = None  # takes the recipe-level switch: on
    training = data["training"]
    training["max_train_examples"] = examples
    training["schedule_examples"] = None  # the schedule ends with the supernet's short run
    limit = training.get("max_eval_examples")
    training["max_eval_examples"] = min(limit, GATE_EXAMPLES) if limit else GATE_EXAMPLES
    return recipe_from_dict(data)


def _meta_gates(recipe: Recipe, keys: list[str]) -> dict[str, list[str]]:
    """Gate module names (as in the built model) created by each component, built on the meta device.

    Gates are attributed by identity while :func:`autopeft.composition.recipe.build_model` adds the components
    one by one (its ``after_component`` hook), so the names match the trained model's.

    Raises:
        CompositionError: two components claim the same slot.
    """
    from autopeft.composition.gates import Gate
    from autopeft.composition.recipe import build_model

    owner: dict[int, str] = {}

    def attribute(i: int, model) -> None:
        for module in model.modules():
            if isinstance(module, Gate) and id(module) not in owner:
                owner[id(module)] = keys[i]

    model = build_model(recipe, device="meta", after_component=attribute)
    out: dict[str, list[str]] = {k: [] for k in keys}
    for name, module in model.named_modules():
        if isinstance(module, Gate):
            out[owner[id(module)]].append(name)
    return out


def _supernet(space: SearchSpace, base: dict[str, Any], keys: list[str], examples: int, shared: dict[str, Any],
              say: Callable[[str], None]) -> tuple[list[str], Recipe | None, dict[str, list[str]]]:
    """Add the candidates one by one: drop one that conflicts with those before it, or has no gate."""
    from autopeft.composition.recipe import check_recipe

    accepted: list[str] = []
    recipe, gates = None, {}
    for key in keys:
        trial = sorted(accepted + [key], key=space.methods.index)  # the recipe's order: gates are attributed by it
        try:
            r = _supernet_recipe(space, base, trial, examples, shared)
            if [c.method for c in r.components] != [space.component_methods.get(k, k) for k in trial]:
                say(f"one-shot: {key} left out (the space drops it beside {', '.join(accepted) or 'nothing'})")
                continue
            check_recipe(r, for_training=True)
            g = _meta_gates(r, trial)
        except (CompositionError, RecipeError) as exc:
            say(f"one-shot: {key} left out of the supernet: {exc}")
            continue
        if not g[key]:
            say(f"one-shot: {key} left out (it cannot be gated, so its importance cannot be read)")
            continue
        accepted, recipe, gates = trial, r, g
    return accepted, recipe, gates


@torch.no_grad()
def _read_importance(model, recipe: Recipe, gates: dict[str, list[str]], data_dir: str | None) -> dict[str, float]:
    """Mean gate value per component over the first batches of the eval split (dev in a search), in eval mode."""
    from autopeft.backbones import load_tokenizer
    from autopeft.composition.gates import Gate
    from autopeft.training.batches import Batches
    from autopeft.training.scoring import trial_splits

    modules = {n: m for n, m in model.named_modules() if isinstance(m, Gate)}
    expected = {n for names in gates.values() for n in names}
    if set(modules) != expected:
        raise RuntimeError(f"supernet gates differ from its meta build: {sorted(set(modules) ^ expected)[:3]}")
    sums = {n: 0.0 for n in modules}
    counts = {n: 0 for n in modules}

    def hook(name):
        def record(_module, _inputs, output):
            sums[name] += float(output.detach().float().sum())
            counts[name] += output.numel()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        tr = recipe.training
        split = trial_splits(recipe, data_dir)[1]  # the search's dev split: a search never reads test
        dev = next(model.parameters()).device
        batches = Batches(split, load_tokenizer(recipe.backbone), tr.max_seq_length, dev)
        n = min(GATE_EXAMPLES, len(split))
        for start in range(0, n, tr.eval_batch_size):
            b = batches.batch(range(start, min(n, start + tr.eval_batch_size)))
            b.pop("labels")
            model(**b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_gate = {n: sums[n] / counts[n] for n in modules if counts[n]}
    out = {}
    for key, names in gates.items():
        values = [per_gate[n] for n in names if n in per_gate]
        if values:
            out[key] = min(1.0, max(0.0, sum(values) / len(values)))
    return out


# ----- proposals ------------------------------------------------------------------------------
def _component_dims(space: SearchSpace, key: str) -> list[str]:
    return [k for k in space.tunable() if k.startswith(key + ".") and not k.endswith(".enabled")]


def _point(space: SearchSpace, chosen: list[tuple[str, dict[str, Any]]], shared: dict[str, Any]) -> dict[str, Any]:
    """A flat start point: the chosen components on with their settings; gated when a mix."""
    point: dict[str, Any] = {}
    for key, settings in chosen:
        point.update(_switch_on(space, key))
        point.update(settings)
    gating = space.tunable().get("gating")
    want = len(chosen) > 1
    if gating is not None and want in gating.values:
        point["gating"] = want
    point.update(shared)
    return point


def _proposals(space: SearchSpace, base: dict[str, Any], param_limit: int, importance: dict[str, float],
               shared: dict[str, Any], max_proposals: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Greedy subsets by importance: add the next component (at the supernet's settings, else shrunk
    along its choice dimensions) when the subset stays within ``param_limit``; every grown subset
    is a proposal (unless it is already a start point of the space)."""
    counted: dict[str, int | None] = {}

    def signature(point: dict[str, Any]) -> str:
        return json.dumps(space.complete_point(point), sort_keys=True, default=str)

    def count(point: dict[str, Any]) -> int | None:
        """Trainable parameters of the point as the search builds it (None: it does not compose)."""
        sig = signature(point)
        if sig not in counted:
            try:
                counted[sig] = count_recipe(space.to_recipe(space.complete_point(point), base)).trainable_params
            except (CompositionError, RecipeError):
                counted[sig] = None
        return counted[sig]

    defaults = {key: {k: space.dims[k].default() for k in _component_dims(space, key)} for key in importance}

    def shrink(key: str) -> dict[str, Any] | None:
        """The component's settings, shrunk from the supernet's until the subset fits: each step
        changes one choice dimension, to the fitting variant with the most parameters, else to the
        variant with the fewest (then tries again). None when nothing fits."""
        settings = dict(defaults[key])
        dims = [k for k in _component_dims(space, key) if space.dims[k].kind == "choice"]
        while True:
            n = count(_point(space, chosen + [(key, settings)], shared))
            if n is not None and n <= param_limit:
                return settings
            moves = []
            for i, k in enumerate(dims):
                for j, v in enumerate(space.dims[k].values):
                    m = count(_point(space, chosen + [(key, {**settings, k: v})], shared))
                    if m is not None and (n is None or m < n):
                        moves.append((m, i, j, k, v))
            if not moves:
                return None
            fitting = [mv for mv in moves if mv[0] <= param_limit]
            _, _, _, k, v = (max(fitting, key=lambda mv: (mv[0], -mv[1], -mv[2])) if fitting
                             else min(moves, key=lambda mv: mv[:3]))
            settings[k] = v

    known = {signature(p) for p in space.start_points}
    ranked = sorted(importance, key=lambda k: (-importance[k], space.methods.index(k)))
    chosen: list[tuple[str, dict[str, Any]]] = []
    out: list[dict[str, Any]] = []
    for key in ranked:
        if len(out) >= max_proposals:
            break
        present = {space.component_methods.get(k, k) for k, _ in chosen} | {space.component_methods.get(key, key)}
        if not _requirements_met(space.component_methods.get(key, key), present):
            continue
        settings = shrink(key)
        if settings is None:
            continue
        chosen.append((key, settings))
        point = _point(space, chosen, shared)
        sig = signature(point)
        if sig in known:
            say(f"one-shot: {'+'.join(k for k, _ in chosen)} is already a start point")
            continue
        known.add(sig)
        out.append(point)
        say(f"one-shot: proposal {'+'.join(k for k, _ in chosen)} ({count(point):,} of {param_limit:,} parameters)")
    return out
