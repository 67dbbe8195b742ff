"""AdapterFusion: attention over several frozen task adapters, trained on a target task (stage 2).

Source: Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247, section 3.2, eq. (3)-(6). Two stages:

1. *knowledge extraction*: one Pfeiffer adapter per source task, each trained on its own (ordinary
   ``adapter`` recipes, ``placement: serial``; see :func:`autopeft.training.fusion.train_adapters`) and saved
   with :func:`autopeft.training.saved.save_trained`;
2. *knowledge composition* (this method): the recipe lists the stage-1 folders in ``adapters``; their
   adapter weights are loaded, frozen, into the serial slot of the same sublayers (the FFN for the
   Pfeiffer placement), and every such sublayer gets a fusion layer ``Psi_l`` with ``Q_l, K_l, V_l``
   (``d x d``), trained on the target task together with the task head.

Per layer ``l`` and token ``t``, with ``h`` the output of the pretrained sublayer (before the
adapters) and ``z_n = adapter_n(h)`` the output of adapter ``n`` (a serial adapter includes its own
residual, ``z_n = h + f_n(h)``)::

    s_n  = softmax_n( (h Q) . (z_n K) )        (eq. 3)
    z'_n = z_n V                               (eq. 4)
    Z'   = [z'_1, ..., z'_N]                   (eq. 5)
    o    = sum_n s_n z'_n                      (eq. 6)

``o`` replaces the serial-adapter output: the sublayer then returns ``LN(o + x)`` as usual.
Initialisation follows the paper and AdapterHub's reference code: ``Q`` and ``K`` ~ N(0, 0.02) with
zero biases (so attention starts near uniform), ``V`` = identity plus small noise and no bias. With
``V = I`` and uniform attention the fusion output is the mean of the adapter outputs.
``regularization`` adds ``lambda * sum_l ||I - V_l||_F^2`` to the training loss (AdapterHub's
``get_fusion_regularization_loss``, lambda = 0.01), keeping ``V`` near the identity.

Differences from AdapterHub, documented: keys and values are the adapters' full outputs ``z_n`` as in
eq. (3)-(4) (AdapterHub fuses the bottleneck outputs ``f_n(h)`` and adds ``h`` afterwards; the two
coincide when ``V = I``); no attention dropout and no softmax temperature schedule.

Trainable parameters per fused sublayer: ``Q`` (d^2 + d) + ``K`` (d^2 + d) + ``V`` (d^2) =
``3 d^2 + 2 d``; the loaded adapters are frozen.

Any other serial adapter in a fused slot (e.g. a trainable ``adapter`` component listed after this
one) is fused too: the fusion attends over every serial adapter of its sublayer.

The AdapterDrop paper's (arXiv:2010.11918, section 4) pruning of adapters from a trained fusion is
:func:`prune_fusion_adapters`; dropping whole fusion layers is the ``adapter_drop`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from autopeft.methods.adapter import AdapterConfig, make_adapter
from autopeft.methods.base import MethodConfig, TrainedFolder, register
from autopeft.errors import CompositionError, first_line

#: Name of the adapter inside a stage-1 model (``apply_adapter``'s default slot name).
STAGE1_ADAPTER_NAME = "adapter"
#: Key of a gated stage-1 adapter's layer gate (``ComposedModel.gate_key`` of the only component).
STAGE1_GATE_KEY = "adapter_0"


class AdapterFusionConfig(MethodConfig):
    """AdapterFusion (stage 2) hyperparameters.

    Attributes:
        adapters: folders written by :func:`autopeft.training.saved.save_trained` for stage-1 ``adapter``
            recipes (absolute paths, or relative to the working directory).
        names: slot names of the loaded adapters (default: each stage-1 recipe's task, made unique).
        sublayers: restrict fusion to these sublayers (default: wherever the stage-1 adapters sit).
        value_init_noise: std of the Gaussian noise added to ``V = I`` at initialisation.
        regularization: weight ``lambda`` of ``sum_l ||I - V_l||^2`` in the loss (0 disables it).
        layers: layers where adapters are loaded and fused (default all).
    """

    method: str = "adapter_fusion"
    adapters: list[str] = Field(min_length=1)
    names: list[str] | None = None
    sublayers: list[Literal["attention", "ffn"]] | None = None
    value_init_noise: float = Field(1e-6, ge=0)
    regularization: float = Field(0.01, ge=0)

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        if v is None:
            return v
        for name in v:
            if not name or "." in name:
                raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if len(set(v)) != len(v):
            raise ValueError(f"adapter names must be unique, got {v}")
        return v


class AdapterFusionLayer(nn.Module):
    """The fusion ``Psi_l`` of one sublayer (Pfeiffer et al., arXiv:2005.00247, eq. 3-6).

    Called by :class:`autopeft.composition.adapter_hosts.SublayerOutput` as ``fusion(h, x, adapters)``.

    Shapes: ``h`` (B, T, d) sublayer output before the adapters (the query); ``x`` (B, T, d) the
    sublayer's residual input (unused); ``adapters``: N modules (B, T, d) -> (B, T, d).
    Returns ``o`` (B, T, d). ``last_weights`` keeps the softmax weights of the last call averaged
    over batch and tokens, shape (N,), for inspection and for :func:`prune_fusion_adapters`.
    """

    def __init__(self, hidden_size: int, value_init_noise: float = 1e-6) -> None:
        super().__init__()
        d = hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        self.last_weights: torch.Tensor | None = None
        if self.query.weight.device.type != "meta":
            with torch.no_grad():
                for lin in (self.query, self.key):
                    nn.init.normal_(lin.weight, mean=0.0, std=0.02)
                    nn.init.zeros_(lin.bias)
                self.value.weight.copy_(torch.eye(d) + value_init_noise * torch.randn(d, d))

    def forward(self, h: torch.Tensor, input_tensor: torch.Tensor, adapters: Sequence[nn.Module]) -> torch.Tensor:
        if not adapters:
            return h
        z = torch.stack([a(h) for a in adapters], dim=2)  # (B, T, N, d)
        q = self.query(h)  # (B, T, d)
        k = self.key(z)  # (B, T, N, d)
        s = torch.softmax(torch.einsum("btd,btnd->btn", q, k), dim=-1)  # (B, T, N)   eq. 3
        v = self.value(z)  # (B, T, N, d)                                               eq. 4-5
        self.last_weights = s.detach().float().mean(dim=(0, 1))
        return torch.einsum("btn,btnd->btd", s, v)  # (B, T, d)                         eq. 6


def stage1_adapter_config(recipe, where: str = "stage-1 recipe") -> AdapterConfig:
    """The adapter component of a stage-1 recipe, checked to be fusable.

    A fusable stage-1 recipe has exactly one ``adapter`` component, placed ``serial`` (fusion
    combines serial adapter outputs), that leaves the backbone frozen (no trained LayerNorms).

    Raises:
        CompositionError: any other component, no adapter, a parallel adapter, trained LayerNorms.
    """
    comps = list(recipe.components)
    if len(comps) != 1 or comps[0].method != "adapter":
        got = [c.method for c in comps]
        raise CompositionError(f"{where}: AdapterFusion needs stage-1 recipes with exactly one 'adapter' component, got {got}")
    cfg = comps[0]
    if cfg.placement != "serial":
        raise CompositionError(f"{where}: AdapterFusion fuses serial adapters; this adapter has placement {cfg.placement!r}")
    train_ln = cfg.variant == "houlsby" if cfg.train_layernorm is None else cfg.train_layernorm
    if train_ln:
        raise CompositionError(f"{where}: the stage-1 adapter trained the backbone's LayerNorms "
                               "(houlsby variant or train_layernorm: true); adapters to fuse must share one frozen backbone")
    return cfg


def _default_names(tasks: Iterable[str]) -> list[str]:
    out: list[str] = []
    for task in tasks:
        name, i = task, 2
        while name in out:
            name, i = f"{task}_{i}", i + 1
        out.append(name)
    return out


@dataclass
class Stage1Adapter:
    """A stage-1 adapter as the fusion needs it (:func:`stage1_of` a folder the model read through
    :meth:`autopeft.composition.model.ComposedModel.trained_folder`, so this module never reads files).

    Attributes:
        path: the folder. task: the stage-1 task (default slot name). config: its adapter component,
        ``gated`` resolved. backbone_config: the stage-1 backbone's transformers config (``None``
        when it cannot be loaded; the tensor shapes are still checked). tensors: its saved tensors by
        name (``None`` on the meta device).
    """

    path: str
    task: str
    config: AdapterConfig
    backbone_config: Any = None
    tensors: dict[str, torch.Tensor] | None = None


def stage1_of(folder: TrainedFolder) -> Stage1Adapter:
    """The stage-1 adapter of a trained folder: its adapter component (``gated`` resolved from the
    stage-1 recipe's ``gating``, so the adapter is rebuilt exactly as stage 1 trained it), its task,
    its backbone's config and tensors.

    Raises:
        CompositionError: the folder's recipe is not a fusable single serial adapter (:func:`stage1_adapter_config`).
    """
    acfg = stage1_adapter_config(folder.recipe, where=folder.path)
    acfg = acfg.model_copy(update={"gated": folder.recipe.gating if acfg.gated is None else acfg.gated})
    return Stage1Adapter(folder.path, folder.task, acfg, folder.backbone_config, folder.tensors)


def load_stage1(model, folder: str, with_tensors: bool = True) -> Stage1Adapter:
    """The stage-1 adapter in ``folder``, read through ``model``'s folder reader.

    Raises:
        CompositionError: not a stage-1 folder, a recipe that does not load, or one that is not fusable.
    """
    try:
        read = model.trained_folder(folder, with_tensors=with_tensors, kind="stage-1 folder")
    except CompositionError as exc:
        raise CompositionError(f"adapter_fusion: {exc}") from None
    return stage1_of(read)


def fusion_as_built(model, cfg: AdapterFusionConfig) -> AdapterFusionConfig:
    """``cfg`` listing only the stage-1 adapters still fused in ``model`` (after
    :func:`prune_fusion_adapters`), with their slot names; ``cfg`` itself when nothing was pruned.

    The fusion's Q/K/V do not depend on the number of adapters, so the saved fusion weights fit the
    pruned recipe (``load_trained`` rebuilds the pruned model).

    Raises:
        CompositionError: a stage-1 folder of the recipe can no longer be read (default names need its task).
    """
    present = {n for _, _, host in fusion_hosts(model) for n in host.serial.keys()}
    names = cfg.names
    if names is None:
        names = _default_names(load_stage1(model, f, with_tensors=False).task for f in cfg.adapters)
    kept = [(f, n) for f, n in zip(cfg.adapters, names) if n in present]
    if kept and len(kept) < len(cfg.adapters):
        return cfg.model_copy(update={"adapters": [f for f, _ in kept], "names": [n for _, n in kept]})
    return cfg


def _check_backbone(model, source: Stage1Adapter) -> None:
    src, own = source.backbone_config, model.backbone.config
    if src is None:
        return
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if getattr(src, key, None) != getattr(own, key, None):
            raise CompositionError(f"{source.path}: trained on another backbone ({key} {getattr(src, key, None)} "
                                   f"vs {getattr(own, key, None)})")


@register("adapter_fusion", AdapterFusionConfig, paper="arXiv:2005.00247", why_not_peft="peft has no AdapterFusion",
          why_not_merge="AdapterFusion attends over adapter outputs and cannot be folded into the backbone's weights",
          why_not_one_shot="needs stage-one adapter folders", as_built=fusion_as_built)
def apply_adapter_fusion(model, cfg: AdapterFusionConfig) -> None:
    """Load the stage-1 adapters (frozen) and add one trainable fusion layer per fused sublayer.

    Raises:
        CompositionError: a stage-1 folder is missing or unfit (see :func:`stage1_adapter_config`),
            its weights do not fit this backbone, ``names`` has the wrong length, ``gated`` is set,
            or no adapter falls in ``layers``/``sublayers``.
    """
    if cfg.gated:
        raise CompositionError("adapter_fusion cannot be gated (the stage-1 adapters keep their own gates)")
    meta = next(model.backbone.parameters()).device.type == "meta"
    sources = [load_stage1(model, folder, with_tensors=not meta) for folder in cfg.adapters]
    names = cfg.names or _default_names(s.task for s in sources)
    if len(names) != len(sources):
        raise CompositionError(f"adapter_fusion: {len(names)} names for {len(sources)} adapters")

    d = model.encoder.hidden_size
    module_names = {id(m): n for n, m in model.named_modules()}
    layers_path = module_names[id(model.encoder.layers)]
    fused_layers = set(model.layers_of(cfg))
    slots: set[tuple[int, str]] = set()
    for source, name in zip(sources, names):
        _check_backbone(model, source)
        acfg, tensors, path = source.config, source.tensors, source.path
        try:
            src_layers = model.layers_of(acfg)
        except CompositionError as exc:
            raise CompositionError(f"{path}: {exc}") from None
        for layer in src_layers:
            if layer not in fused_layers:
                continue
            for which in acfg.resolved_sublayers():
                if cfg.sublayers and which not in cfg.sublayers:
                    continue
                module = make_adapter(model, acfg, "serial", layer, gate_key=f"{model.gate_key(cfg)}_{name}")
                if tensors is not None:
                    prefix = f"{layers_path}.{layer}.{model.sublayer_path(which)}.serial.{STAGE1_ADAPTER_NAME}."
                    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    # A gated stage-1 adapter's gate is its layer's gate (older files: inside the adapter).
                    gprefix = f"{layers_path}.{layer}.peft_gates.gates.{STAGE1_GATE_KEY}."
                    gate_state = {k[len("gate."):]: own.pop(k) for k in [k for k in own if k.startswith("gate.")]}
                    gate_state = gate_state or {k[len(gprefix):]: v for k, v in tensors.items() if k.startswith(gprefix)}
                    try:
                        module.load_state_dict(own, strict=True)
                        if module.gate is not None:
                            module.gate.module.load_state_dict(gate_state, strict=True)
                    except RuntimeError as exc:
                        first = first_line(exc)
                        raise CompositionError(f"adapter_fusion: weights in {path} do not fit this backbone "
                                               f"at layer {layer} {which}: {first}") from None
                module.requires_grad_(False)
                if module.gate is not None:
                    module.gate.module.requires_grad_(False)
                model.add_adapter(layer, which, "serial", name, module, shareable_with=cfg.shares_slots_with)
                slots.add((layer, which))
    if not slots:
        raise CompositionError("adapter_fusion: no stage-1 adapter lies in the selected layers/sublayers")

    fusions: list[AdapterFusionLayer] = []
    for layer, which in sorted(slots):
        model.claim(("fusion", layer, which))
        fusion = AdapterFusionLayer(d, cfg.value_init_noise)
        model.sublayer(layer, which).fusion = fusion
        fusions.append(fusion)
    if cfg.regularization > 0:
        lam = cfg.regularization

        def value_regularizer() -> torch.Tensor:
            w = fusions[0].value.weight
            eye = torch.eye(d, device=w.device, dtype=w.dtype)
            return lam * torch.stack([(eye - f.value.weight).pow(2).sum() for f in fusions]).sum()

        model.add_regularizer(value_regularizer)


def fusion_hosts(model) -> list[tuple[int, str, nn.Module]]:
    """``(layer, sublayer, host)`` of every sublayer whose adapter host has a fusion layer."""
    out = []
    for layer in range(model.encoder.num_layers):
        for which in model.family.sublayers:
            host = model.encoder.get(layer, model.sublayer_path(which))
            if getattr(host, "adapter_host", False) and host.fusion is not None:
                out.append((layer, which, host))
    return out


def fusion_attention(model) -> dict[str, float]:
    """Mean fusion attention weight of each adapter over all fused sublayers, from the last forward.

    This is the "activation" the AdapterDrop paper (arXiv:2010.11918, section 4) ranks adapters by.

    Raises:
        ValueError: the model has no fusion, or no forward pass has run yet.
    """
    hosts = fusion_hosts(model)
    if not hosts:
        raise ValueError("the model has no AdapterFusion layer")
    sums: dict[str, list[float]] = {}
    for _, _, host in hosts:
        w = host.fusion.last_weights
        if w is None:
            raise ValueError("no forward pass yet: run the fusion model on some inputs first")
        for name, value in zip(host.serial.keys(), w.tolist()):
            sums.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def prune_fusion_adapters(model, keep: int | Sequence[str]) -> list[str]:
    """Remove adapters from every fusion layer, keeping ``keep`` (AdapterDrop, arXiv:2010.11918, section 4).

    ``keep`` is a list of adapter names, or a count: the adapters with the highest mean fusion
    attention (:func:`fusion_attention`, from the last forward pass, e.g. over a validation batch)
    are kept. The fusion's Q/K/V do not depend on the number of adapters, so the pruned model equals
    the stage-2 recipe that lists only the kept stage-1 folders (same fusion weights).

    Returns the kept names (in slot order).

    Raises:
        ValueError: no fusion in the model, an unknown name, or ``keep`` < 1.
    """
    hosts = fusion_hosts(model)
    if not hosts:
        raise ValueError("the model has no AdapterFusion layer")
    present = list(dict.fromkeys(n for _, _, h in hosts for n in h.serial.keys()))
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        act = fusion_attention(model)
        keep_set = set(sorted(present, key=lambda n: -act.get(n, 0.0))[:keep])
    else:
        unknown = [n for n in keep if n not in present]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; fused adapters: {present}")
        if not keep:
            raise ValueError("keep at least one adapter")
        keep_set = set(keep)
    for _, _, host in hosts:
        for name in list(host.serial.keys()):
            if name not in keep_set:
                del host.serial[name]
        host.fusion.last_weights = None
    return [n for n in present if n in keep_set]
