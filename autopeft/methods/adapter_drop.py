"""AdapterDrop: switch off the adapters of the lowest transformer layers.

Source: Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers",
arXiv:2010.11918, section 3 (and section 4 for AdapterFusion). Removing the adapters of the first
``n`` layers makes those layers compute exactly the frozen backbone, so

* in training, backpropagation stops at the lowest layer that still has an adapter (nothing
  trainable below it), which saves backward compute and activation memory;
* at inference the dropped adapters are not run. In the paper's multi-task setting the outputs of
  the shared lower layers are further computed once for all tasks; **that cross-task caching is not
  implemented here**: autopeft runs one task per model, so the inference saving is the skipped
  adapter (or fusion) computation only (see ``benchmarks/adapter_drop_speed.py``).

Variants (section 3):

* ``robust`` (default): for every training forward pass the lowest ``k`` layers are dropped with
  ``k`` drawn uniformly from ``{0, ..., max_train_drop}`` (``max_train_drop`` defaults to ``n``; the
  paper samples from ``{0, ..., L - 1}``, i.e. ``max_train_drop: L - 1``). Draws come from a private
  ``random.Random`` seeded with ``seed`` (default: the recipe's ``training.seed``), so a run is
  reproducible and the global RNG is untouched.
* ``specialized``: the lowest ``n`` layers are dropped in training too.
* ``inference_only``: nothing is dropped in training.

At inference (``model.eval()``) the lowest ``n`` layers are always dropped.

Mechanism: this method owns no parameters. It switches ``SublayerOutput.active`` of the adapter
hosts that earlier components created (``adapter``, ``adapter_fusion``, ``mam``, ``unipelt``, ...),
from a forward pre-hook on the backbone. A dropped sublayer runs neither its serial nor its parallel
adapters nor its fusion layer (section 4: AdapterFusion layers are dropped the same way). Prefix
vectors and LoRA updates are not adapters and are left on. Because it acts on existing slots,
``adapter_drop`` must come after the adapter components in the recipe.
"""

from __future__ import annotations

from typing import ClassVar

import random
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from autopeft.methods.base import MethodConfig, register
from autopeft.errors import CompositionError


class AdapterDropConfig(MethodConfig):
    """AdapterDrop hyperparameters.

    Attributes:
        n: adapters of layers ``0 .. n-1`` are dropped at inference (0 keeps all, L drops all).
            The default 2 of 6 MiniLM layers is about the paper's 5 of 12.
        mode: ``robust``, ``specialized`` or ``inference_only`` (training behaviour, see module doc).
        max_train_drop: largest ``k`` drawn in robust training (default ``n``).
        seed: seed of the robust draws (default: the recipe's ``training.seed``).
    """

    method: str = "adapter_drop"
    #: A search space leaves AdapterDrop out when none of these methods is in the recipe.
    requires_any: ClassVar[tuple[str, ...]] = ("adapter", "adapter_fusion", "mam", "unipelt")
    n: int = Field(2, ge=0)
    mode: Literal["robust", "specialized", "inference_only"] = "robust"
    max_train_drop: int | None = Field(None, ge=0)
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.layers != "all":
            raise ValueError("adapter_drop drops the lowest n layers: set n instead of layers")
        if self.gated:
            raise ValueError("adapter_drop has nothing to gate")
        return self

    def check_fit(self, limits, recipe) -> None:
        """``n`` and ``max_train_drop`` cannot exceed the backbone's layers (also checked at build)."""
        super().check_fit(limits, recipe)
        max_train = self.n if self.max_train_drop is None else self.max_train_drop
        for key, value in (("n", self.n), ("max_train_drop", max_train)):
            if value > limits.num_layers:
                raise ValueError(f"{key}={value} exceeds the model's {limits.num_layers} layers")


class AdapterDropController(nn.Module):
    """Sets which layers' adapter hosts are active before every forward pass (no parameters).

    Attributes:
        n: layers dropped at inference; change it (or call :func:`set_adapter_drop`) to trade
            accuracy for speed at inference time.
        last_dropped: ``k`` of the last forward pass (layers ``0 .. k-1`` were dropped).
        draws: robust training draws so far.
    """

    def __init__(self, encoder, n: int, mode: str, max_train_drop: int, seed: int) -> None:
        super().__init__()
        self._encoder = encoder  # autopeft.backbones.arch.Encoder (a dataclass, not a submodule)
        self.n = n
        self.mode = mode
        self.max_train_drop = max_train_drop
        self.seed = seed
        self.rng = random.Random(seed)
        self.last_dropped: int | None = None
        self.draws = 0

    def hosts(self) -> list[tuple[int, nn.Module]]:
        """``(layer, host)`` for every sublayer whose adapter host holds an adapter or a fusion."""
        out = []
        for layer in range(self._encoder.num_layers):
            for spec in self._encoder.family.sublayers.values():
                host = self._encoder.get(layer, spec.path)
                if getattr(host, "adapter_host", False) and (len(host.serial) or len(host.parallel) or host.fusion is not None):
                    out.append((layer, host))
        return out

    def drop(self, k: int) -> None:
        """Deactivate the adapter hosts of layers ``0 .. k-1``, activate the others."""
        for layer, host in self.hosts():
            host.active = layer >= k
        self.last_dropped = k

    def choose(self, training: bool) -> int:
        """``k`` for the next forward pass: a robust draw, ``n``, or 0 (see the module doc)."""
        if not training:
            return self.n
        if self.mode == "robust":
            self.draws += 1
            return self.rng.randint(0, self.max_train_drop)
        return self.n if self.mode == "specialized" else 0

    def pre_hook(self, module: nn.Module, args, kwargs) -> None:
        self.drop(self.choose(module.training))

    def extra_repr(self) -> str:
        return f"n={self.n}, mode={self.mode}, max_train_drop={self.max_train_drop}, seed={self.seed}"

    def get_extra_state(self) -> torch.Tensor:
        """Saved with the adapter (``save_trained``): ``[n]`` (int64), the inference drop as set now
        (:func:`set_adapter_drop` may have changed the recipe's value). The robust-training draws are
        not saved: after a reload they restart from ``seed``."""
        return torch.tensor([self.n], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore ``n`` from :meth:`get_extra_state`.

        Raises:
            ValueError: ``n`` outside ``0..L`` for this model.
        """
        n = int(state.reshape(-1)[0])
        if not 0 <= n <= self._encoder.num_layers:
            raise ValueError(f"saved adapter_drop n={n} is outside 0..{self._encoder.num_layers} for this model")
        self.n = n
        if not self._encoder.model.training:
            self.drop(n)


@register("adapter_drop", AdapterDropConfig, paper="arXiv:2010.11918",
          why_not_peft="peft has no bottleneck adapters, so no AdapterDrop",
          why_not_merge="bottleneck adapters cannot be folded into the backbone's weights")
def apply_adapter_drop(model, cfg: AdapterDropConfig) -> None:
    """Install the drop controller (``model.extras["adapter_drop"]``) on the adapters built so far.

    Raises:
        CompositionError: no adapter host exists yet (put ``adapter``/``adapter_fusion``/... before
            ``adapter_drop``), a second ``adapter_drop``, or ``n``/``max_train_drop`` > L.
    """
    model.claim(("adapter_drop",))
    num_layers = model.encoder.num_layers
    max_train = cfg.n if cfg.max_train_drop is None else cfg.max_train_drop
    for key, value in (("n", cfg.n), ("max_train_drop", max_train)):
        if value > num_layers:
            raise CompositionError(f"adapter_drop: {key}={value} exceeds the model's {num_layers} layers")
    seed = torch.initial_seed() if cfg.seed is None else cfg.seed  # build_model seeds with training.seed
    controller = AdapterDropController(model.encoder, cfg.n, cfg.mode, max_train, int(seed))
    if not controller.hosts():
        raise CompositionError("adapter_drop found no adapter to drop: list an adapter, adapter_fusion, mam or "
                               "unipelt component before it in the recipe")
    model.extras["adapter_drop"] = controller
    model.backbone.register_forward_pre_hook(controller.pre_hook, with_kwargs=True)
    controller.drop(controller.choose(False))


def set_adapter_drop(model, n: int) -> None:
    """Change the number of lowest layers whose adapters are dropped at inference.

    The new ``n`` is part of the model's state: ``save_trained`` saves it, ``load_trained`` restores it.

    Raises:
        ValueError: the model has no ``adapter_drop`` component, or ``n`` is not in ``0..L``.
    """
    if "adapter_drop" not in model.extras:
        raise ValueError("the model has no adapter_drop component")
    if not 0 <= n <= model.encoder.num_layers:
        raise ValueError(f"n must be in 0..{model.encoder.num_layers}, got {n}")
    controller = model.extras["adapter_drop"]
    controller.n = n
    if not model.backbone.training:
        controller.drop(n)
