"""AdaLoRA: SVD-form low-rank updates whose ranks are re-allocated by importance during training.

Source: Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512 (ICLR 2023).

* Update (eq. 3): ``W = W0 + P Lambda Q`` with ``P`` (d_out, r) left singular vectors (``lora_B``),
  ``Lambda = diag(E)``, ``E`` (r, 1) singular values (``lora_E``, zero at the start), and ``Q``
  (r, d_in) right singular vectors (``lora_A``); ``P`` and ``Q`` are Gaussian (std 0.02), and the
  update is scaled by ``lora_alpha / init_r`` (as the authors' code and Hugging Face peft do).
* Orthogonality (eq. 4): ``R(P, Q) = ||P^T P - I||_F + ||Q Q^T - I||_F``, added to the loss as
  ``orth_reg_weight * sum_k R(P_k, Q_k) / (2 n)`` over the ``n`` wrapped matrices
  (:meth:`autopeft.composition.model.ComposedModel.add_regularizer`). This is the normalisation of the authors' code
  and of peft (the mean of the unsquared norms), with which the paper's ``orth_reg_weight`` values were
  tuned; eq. 4 as printed (squared norms, summed) is ~50x larger at initialisation on MiniLM and
  swamps the task loss (on MiniLM-L6, 4,000 SST-2 examples at lr 3e-3: 53.0% validation accuracy
  with it, 77.4% with this normalisation).
* Importance: sensitivity ``I(w) = |w * dL/dw|`` (eq. 7) of every entry of P, E, Q, smoothed
  ``I_bar(t) = beta1 I_bar(t-1) + (1 - beta1) I(t)`` (eq. 8), uncertainty
  ``U_bar(t) = beta2 U_bar(t-1) + (1 - beta2) |I(t) - I_bar(t)|`` (eq. 9), score
  ``s(t) = I_bar(t) * U_bar(t)`` (eq. 10); triplet ``i`` of matrix ``k`` scores
  ``S_ki = s(E_ki) + mean_j s(P_kji) + mean_j s(Q_kij)`` (eq. 11).
* Allocation (eq. 5-6): after each optimiser step the singular values outside the top ``b(t)``
  triplets of all the component's matrices are set to zero. Budget (eq. 12, with peft's step
  conventions): ``b(t) = b0`` for ``t <= tinit``; ``b(t) = bT + (b0 - bT)(1 - (t - tinit)/(T - tinit -
  tfinal))^3`` (floored) for ``tinit < t <= T - tfinal``; ``bT`` afterwards, where ``b0 = init_r * n``,
  ``bT = target_r * n`` for ``n`` wrapped matrices and ``T = total_step``. A new allocation is computed
  every ``deltaT`` steps in the cubic phase and at ``t = T - tfinal``; between allocations and in the
  final phase the last allocation stays in force (re-applied every step, so a pruned value cannot
  creep back through the optimiser; peft re-applies it only in the final phase).

Gradients for eq. 7 are captured when ``backward`` accumulates them (a post-accumulate-grad hook on
every P, E, Q), so the step hook works whatever the training loop does with ``zero_grad``; the
sensitivity uses the weights at which the gradient was taken. The training loop
(:func:`autopeft.training.trainer.run_trial`) calls :meth:`ComposedModel.after_step` after every optimiser step and
sets ``model.total_steps`` (its schedule length), which is used when ``total_step`` is not given.

Saved state (:func:`autopeft.training.saved.save_trained` / ``load_trained``): besides P, E, Q, the rank
allocation is part of a trained adapter: every :class:`SVDLinear`'s ``rank_mask`` and the component's
:class:`AdaLoraState` (``model.extras["adalora_state_<i>"]``: the optimiser steps the allocator has
taken) are persistent buffers, saved and restored with the weights. A reloaded adapter therefore
reads the same total rank, and training it further continues its schedule from the saved step: a
finished schedule keeps its final allocation (re-applied after every step), so pruned triplets stay
pruned. The importance EMAs (eq. 8-9) are not saved; they restart from zero.

Trainable parameters per wrapped Linear: ``init_r * (d_in + d_out + 1)``, + ``d + 1`` per selected
layer with a gate (one UniPELT gate per layer, :meth:`autopeft.composition.model.ComposedModel.layer_gate`); they do
not shrink when ranks are pruned (the paper's masking keeps the vectors).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from pydantic import AliasChoices, Field, model_validator
from torch import nn

from autopeft.backbones.arch import LINEAR_TARGETS
from autopeft.methods.base import MethodConfig, PeftMapping, PeftTarget, TargetModules, register
from autopeft.methods.lora import LinearWrapper, MergedAdapterError, check_rank


class AdaLoraConfig(MethodConfig):
    """AdaLoRA hyperparameters (names as in the paper's code and Hugging Face peft).

    ``init_r`` may also be given as ``r``. Defaults: peft's budget settings (``init_r=12``,
    ``target_r=8``, ``beta1=beta2=0.85``, ``deltaT=1``), all six Linear slots as in the paper's
    experiments, ``orth_reg_weight=0.1`` (the authors' GLUE setting).
    """

    method: str = "adalora"
    init_r: int = Field(12, ge=1, validation_alias=AliasChoices("init_r", "r"),
                        description="initial rank of every wrapped matrix (b0 = init_r * matrices)")
    target_r: int = Field(8, ge=1, description="final average rank (bT = target_r * matrices)")
    tinit: int = Field(0, ge=0, description="steps before the budget starts to shrink")
    tfinal: int = Field(0, ge=0, description="final steps at the target budget with a fixed allocation")
    deltaT: int = Field(1, ge=1, description="steps between two re-allocations in the cubic phase")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity (eq. 8)")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty (eq. 9)")
    orth_reg_weight: float = Field(0.1, ge=0, description="gamma: weight of the orthogonality penalty (eq. 4)")
    lora_alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by lora_alpha / init_r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch's input")
    target_modules: TargetModules = Field(default_factory=lambda: list(LINEAR_TARGETS))
    total_step: int | None = Field(None, ge=1, description="T; None: the training loop's step count (model.total_steps)")

    @model_validator(mode="after")
    def _budget(self) -> "AdaLoraConfig":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is not None:
            check_schedule(self.tinit, self.tfinal, self.total_step)
        return self

    @property
    def r(self) -> int:
        return self.init_r

    def check_fit(self, limits, recipe) -> None:
        """``init_r`` fits every wrapped matrix, and, when ``total_step`` is left to the training
        loop, the recipe's training has a budget-shrinking phase: ``tinit < T - tfinal`` with
        ``T = ceil((schedule_examples or max_train_examples) / batch_size)``, the steps
        :func:`autopeft.training.trainer.run_trial` runs (it would otherwise fail at the first step)."""
        super().check_fit(limits, recipe)
        check_rank(limits, "init_r", self.init_r, self.target_modules)
        if self.total_step is None:
            tr = recipe.training
            steps = math.ceil((tr.schedule_examples or tr.max_train_examples) / tr.batch_size)
            if self.tinit >= steps - self.tfinal:
                raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budget-shrinking phase in "
                                 f"the {steps} training steps (training.max_train_examples / batch_size): "
                                 f"AdaLoRA needs tinit < {steps} - tfinal")


def check_schedule(tinit: int, tfinal: int, total_step: int) -> None:
    """Raises ValueError unless ``tinit < total_step - tfinal`` (a budget-shrinking phase exists)."""
    if tinit >= total_step - tfinal:
        raise ValueError(f"AdaLoRA needs tinit < total_step - tfinal to shrink the budget; got tinit={tinit}, "
                         f"tfinal={tfinal}, total_step={total_step}")


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int) -> int:
    """Total rank budget ``b(t)`` after ``step`` optimiser steps (eq. 12, peft's conventions)."""
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * frac ** 3 + target_budget)


class SVDLinear(LinearWrapper):
    """``y = base_layer(x) + g(x) * (alpha / init_r) * dropout(x) (Q * E)^T P^T``.

    Shapes: ``x`` (..., d_in) -> (..., d_out); ``lora_A`` = Q (r, d_in), ``lora_E`` (r, 1),
    ``lora_B`` = P (d_out, r); ``rank_mask`` (r,) bool marks the triplets kept by the last allocation
    (a persistent buffer: saved and restored with the adapter). ``g`` is an optional UniPELT gate (B, 1, 1).
    Mergeable for inference like LoRA (:func:`autopeft.methods.lora.merge_lora`); a merged one refuses to train.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 gate: nn.Module | None = None) -> None:
        super().__init__(base_layer)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        factory = self.factory_kwargs()
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=factory["device"]))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = lora_alpha / r
        self.gate = gate
        if base_layer.weight.device.type != "meta":
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        # Sensitivity |w * grad| of A, E, B from the latest backward (eq. 7); filled by grad hooks.
        self._sensitivity: dict[str, torch.Tensor] = {}
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(self, name).register_post_accumulate_grad_hook(self._capture(name))

    def _capture(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                with torch.no_grad():
                    self._sensitivity[name] = (p.detach() * p.grad).abs()
        return hook

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation."""
        return int(self.rank_mask.sum())

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / init_r) P diag(E) Q``, shape (d_out, d_in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.skip_delta():
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        delta = (h @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling
        if self.gate is not None:
            delta = delta * self.gate(x)
        return out + delta.to(out.dtype)

    def orthogonality(self) -> torch.Tensor:
        """``||P^T P - I||_F + ||Q Q^T - I||_F`` (eq. 4, unsquared as in the authors' code), a scalar."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return (torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye)
                + torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye))

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the singular values of pruned triplets (eq. 6)."""
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)


class AdaLoraState(nn.Module):
    """Saved allocator state of one AdaLoRA component: ``steps``, an int64 scalar buffer holding the
    schedule step (eq. 12) of the allocation in force. No parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


class RankAllocator:
    """Importance tracking and budget allocation over the :class:`SVDLinear` modules of one component.

    ``step(t)`` is the step hook: it folds the latest sensitivities into the EMAs (eq. 8-9) while the
    budget may still change, re-allocates on schedule (eq. 10-12, 6) and re-applies the mask. The
    schedule step is ``offset + t``: ``offset`` is 0 for a new adapter and the saved ``state.steps``
    after ``load_state_dict`` (a reloaded adapter continues its schedule; see the module docstring).
    """

    def __init__(self, modules: Iterable[SVDLinear], cfg: AdaLoraConfig, total_steps=lambda: None,
                 state: AdaLoraState | None = None) -> None:
        self.modules = list(modules)
        self.cfg = cfg
        self._total_steps = total_steps
        self.state = state if state is not None else AdaLoraState()
        self.offset = 0
        self.state.register_load_state_dict_post_hook(self._resume)
        self.init_budget = sum(m.r for m in self.modules)
        self.target_budget = cfg.target_r * len(self.modules)
        self.ipt: dict[tuple[int, str], torch.Tensor] = {}  # I_bar (eq. 8)
        self.unc: dict[tuple[int, str], torch.Tensor] = {}  # U_bar (eq. 9)
        self.budget = self.init_budget

    def total_step(self) -> int:
        """T: the config's ``total_step``, else the training loop's (``model.total_steps``).

        Raises:
            RuntimeError: neither is known.
            ValueError: the schedule has no shrinking phase (see :func:`check_schedule`).
        """
        total = self.cfg.total_step or self._total_steps()
        if not total:
            raise RuntimeError("AdaLoRA needs the total number of training steps: set total_step in the "
                               "component, or set model.total_steps before training (run_trial does)")
        check_schedule(self.cfg.tinit, self.cfg.tfinal, int(total))
        return int(total)

    def update_importance(self) -> None:
        """Fold the latest captured sensitivities into I_bar and U_bar (eq. 8-9)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for i, m in enumerate(self.modules):
            for name, sens in m._sensitivity.items():
                key = (i, name)
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(sens)
                    self.unc[key] = torch.zeros_like(sens)
                self.ipt[key].mul_(b1).add_(sens, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((sens - self.ipt[key]).abs(), alpha=1 - b2)
            m._sensitivity = {}

    def triplet_scores(self) -> list[torch.Tensor]:
        """``S_ki`` (eq. 11) for every module: a list of (r,) tensors."""
        scores = []
        for i, m in enumerate(self.modules):
            s = {}
            for name, p in (("lora_A", m.lora_A), ("lora_E", m.lora_E), ("lora_B", m.lora_B)):
                key = (i, name)
                s[name] = self.ipt[key] * self.unc[key] if key in self.ipt else torch.zeros_like(p.detach())
            scores.append(s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)))
        return scores

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets over all modules (eq. 6); mask the rest."""
        scores = self.triplet_scores()
        flat = torch.cat([s.float().to(scores[0].device) for s in scores])
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        start = 0
        for m in self.modules:
            m.rank_mask.copy_(keep[start:start + m.r].to(m.rank_mask.device))
            start += m.r
        self.budget = budget

    def _resume(self, module: nn.Module, incompatible_keys) -> None:
        """After ``load_state_dict``: continue from the saved step and the loaded masks."""
        self.offset = int(self.state.steps)
        self.budget = sum(m.rank for m in self.modules)
        self.ipt.clear()
        self.unc.clear()

    def step(self, step: int) -> None:
        """The step hook, called after optimiser step ``step`` (1-based) of the current training loop.

        Raises:
            MergedAdapterError: a wrapper of this component is merged (see ``merge_lora``).
        """
        for m in self.modules:
            if m.merged:
                raise MergedAdapterError("an AdaLoRA matrix is merged into its base weight: call "
                                         "autopeft.methods.lora.unmerge_lora(model) before training")
        step = self.offset + step
        cfg = self.cfg
        total = self.total_step()
        final_start = total - cfg.tfinal
        if step < final_start:
            self.update_importance()
            budget = budget_schedule(step, self.init_budget, self.target_budget, cfg.tinit, cfg.tfinal, total)
            if step > cfg.tinit and step % cfg.deltaT == 0:
                self.allocate(budget)
        elif step == final_start:
            self.allocate(self.target_budget)
            self.ipt.clear()
            self.unc.clear()
        for m in self.modules:
            m._sensitivity = {}
            m.apply_mask()
        self.state.steps.fill_(step)

    def regularization(self) -> torch.Tensor:
        """``orth_reg_weight * sum_k R(P_k, Q_k) / (2 n)``: the mean norm over all P and Q (eq. 4)."""
        return self.cfg.orth_reg_weight * torch.stack([m.orthogonality() for m in self.modules]).sum() / (2 * len(self.modules))


def adalora_peft(cfg: AdaLoraConfig, target: PeftTarget) -> tuple:
    """peft's ``AdaLoraConfig``; ``lora_E`` scaled by ``(r + 1e-5) / r``: peft divides by ``ranknum + 1e-5``
    where autopeft divides by ``r``."""
    import peft

    tr = target.recipe.training
    total = cfg.total_step or math.ceil((tr.schedule_examples or tr.max_train_examples) / tr.batch_size)
    pc = peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit,
                            tfinal=cfg.tfinal, deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2,
                            orth_reg_weight=cfg.orth_reg_weight, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, total_step=total, target_modules=sorted(target.wrappers),
                            bias=target.bias)

    def fill(pm) -> None:
        from peft.tuners.adalora import AdaLoraLayer

        for name, layer in pm.named_modules():
            if isinstance(layer, AdaLoraLayer):
                ours = target.wrappers[name.removeprefix("base_model.model.")]
                # peft scales by alpha / (ranknum + 1e-5) with ranknum = r (float32); autopeft by alpha / r
                ranknum = layer.ranknum["default"].detach().float()
                layer.lora_A["default"].copy_(ours.lora_A)
                layer.lora_B["default"].copy_(ours.lora_B)
                layer.lora_E["default"].copy_(ours.lora_E * ((ranknum + 1e-5) / ours.r))
    return pc, fill, []


@register("adalora", AdaLoraConfig, paper="arXiv:2303.10512", merges=True,
          peft=PeftMapping(adalora_peft, carries_bias=True, label="AdaLoRA"))
def apply_adalora(model, cfg: AdaLoraConfig) -> None:
    """Wrap every ``target_modules`` Linear of every selected layer in an :class:`SVDLinear` and
    register the orthogonality regulariser and the rank-allocation step hook on ``model``.

    Raises:
        CompositionError: another component already holds one of the Linear slots.
    """
    modules: list[SVDLinear] = []
    for layer in model.layers_of(cfg):
        for target in cfg.target_modules:
            modules.append(model.wrap_linear(layer, target, lambda base: SVDLinear(
                base, cfg.init_r, cfg.lora_alpha, cfg.lora_dropout, model.layer_gate(cfg, layer))))
    state = AdaLoraState()
    model.extras[f"adalora_state_{len(model.components)}"] = state
    allocator = RankAllocator(modules, cfg, total_steps=lambda: getattr(model, "total_steps", None), state=state)
    if cfg.orth_reg_weight > 0:
        model.add_regularizer(allocator.regularization)
    model.add_step_hook(allocator.step)


def adalora_modules(model: nn.Module) -> dict[str, SVDLinear]:
    """Every :class:`SVDLinear` of ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def adalora_rank(model: nn.Module) -> int:
    """Current total rank: the number of unmasked singular values over all AdaLoRA matrices."""
    return sum(m.rank for m in adalora_modules(model).values())


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Current rank of every AdaLoRA matrix, by module name."""
    return {n: m.rank for n, m in adalora_modules(model).items()}
