"""The backbone's own modules in a model autopeft modified, each with its path in the unmodified backbone.

One walk, two readers: :func:`autopeft.training.setup.set_backbone_dropout` (every backbone dropout
module, those a wrapper holds included) and :func:`autopeft.exporting.base_model.backbone_paths` (the
names peft's ``target_modules`` and transformers' state dicts use).
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

#: Attribute names under which autopeft's wrappers keep the module they replace: ``base_layer`` (LoRA-like
#: wrappers, as peft names it) and ``base`` (the composition wrappers: adapter hosts, prefix attention).
WRAPPED_NAMES = ("base_layer", "base")


def is_autopeft_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of autopeft's (a method module or a wrapper), not the backbone's."""
    return type(module).__module__.startswith("autopeft.")


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The backbone module an autopeft wrapper holds (:data:`WRAPPED_NAMES`), else ``None``."""
    for name in WRAPPED_NAMES:
        inner = module._modules.get(name)
        if inner is not None:
            return inner
    return None


def backbone_modules(backbone: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every module of ``backbone`` (pre-order), with the path it has in the
    unmodified backbone (``""`` for ``backbone`` itself).

    An autopeft wrapper and the module it wraps are both visited, under the path the wrapped module
    had; the wrapper's own additions (``lora_A``, adapters, gates) and autopeft modules that wrap
    nothing are yielded but not descended into (:func:`is_autopeft_module` tells them apart).
    """
    def walk(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
        yield path, module
        if is_autopeft_module(module):
            inner = wrapped_module(module)
            if inner is not None:
                yield from walk(inner, path)
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{path}.{name}" if path else name)

    yield from walk(backbone, "")
