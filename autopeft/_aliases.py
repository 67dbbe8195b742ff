"""The import paths the modules had before they moved into one folder per layer, kept working.

Until the package was reorganised its modules sat side by side in ``autopeft/`` (``autopeft.trainer``,
``autopeft.hpo.searchers``, ...). Users, tests, Ray (which pickles functions and classes by module
path) and old ``checkpoint.pkl`` files still name them that way. :data:`ALIASES` maps each old name to
its new home; a ``sys.meta_path`` finder answers an import of an old name (or of a name under an old
package: ``autopeft.hpo.X`` is ``autopeft.searching.X``) with the real module itself, so

* ``sys.modules["autopeft.trainer"] is sys.modules["autopeft.training.trainer"]``: one module object,
  and ``mock.patch("autopeft.trainer.run_trial", ...)`` patches what ``autopeft.training.trainer`` runs;
* the real module keeps its own ``__name__`` and ``__spec__`` (pickles, Ray and tracebacks name the new
  path);
* nothing is imported until an old name is.

The package's own code imports the new paths only; this table is for code outside it.

A name that later moved out of a module stays importable from it (``autopeft.training.trainer`` re-exports
what moved to ``batches``, ``scoring``, ``setup`` and ``saved``), but patch a name where it is defined:
``mock.patch("autopeft.training.saved.load_trained")`` reaches its callers, a patch of the re-exported
``autopeft.trainer.load_trained`` does not.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

#: Old module path -> the module's path now. A package's entry covers the names under it too.
ALIASES: dict[str, str] = {
    # layer 1: backbones (autopeft.backbones itself kept its name: it is the package, loading included)
    "autopeft.arch": "autopeft.backbones.arch",
    "autopeft.quantization": "autopeft.backbones.quantization",
    "autopeft.memory": "autopeft.backbones.memory",
    "autopeft.threads": "autopeft.backbones.threads",
    # layer 1: data
    "autopeft.tasks": "autopeft.data.tasks",
    "autopeft.userdata": "autopeft.data.userdata",
    "autopeft.userfiles": "autopeft.data.userfiles",
    "autopeft.splits": "autopeft.data.splits",
    "autopeft.uncertainty": "autopeft.data.uncertainty",
    # layer 3: composition
    "autopeft.recipe": "autopeft.composition.recipe",
    "autopeft.model": "autopeft.composition.model",
    # layer 4: training
    "autopeft.trainer": "autopeft.training.trainer",
    "autopeft.fusion": "autopeft.training.fusion",
    # layer 5: search (autopeft.hpo.X -> autopeft.searching.X)
    "autopeft.hpo": "autopeft.searching",
    "autopeft.tracking": "autopeft.searching.tracking",
    "autopeft.progress": "autopeft.searching.progress",
    "autopeft.liveness": "autopeft.searching.liveness",
    "autopeft.budget": "autopeft.searching.budget",
    "autopeft.plots": "autopeft.searching.plots",
    # layer 6: export
    "autopeft.exporters": "autopeft.exporting.exporters",
    "autopeft.hf_export": "autopeft.exporting.hf_export",
}


def new_name(old: str) -> str | None:
    """Where the module ``old`` lives now (``None``: ``old`` is no old name)."""
    if old in ALIASES:
        return ALIASES[old]
    head, dot, tail = old.rpartition(".")
    while dot:
        if head in ALIASES:
            return f"{ALIASES[head]}.{tail}"
        head, dot, rest = head.rpartition(".")
        tail = f"{rest}.{tail}"
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the real module object (imported under its new name)."""

    def __init__(self, real_name: str) -> None:
        self.real_name = real_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.real_name)
        spec.loader_state = module.__spec__  # the import system now sets module.__spec__ = spec ...
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # ... and the real module gets its own back


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`ALIASES` (before the path finder, which would load a second copy
    of a module under an old package's name)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        real = new_name(fullname) if fullname.startswith("autopeft.") else None
        if real is None:
            return None
        try:
            real_spec = sys.modules[real].__spec__ if real in sys.modules else importlib.util.find_spec(real)
        except ModuleNotFoundError:
            real_spec = None
        if real_spec is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real),
                                              is_package=real_spec.submodule_search_locations is not None)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once, however often ``autopeft`` is imported)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def old_attribute(name: str) -> ModuleType:
    """``autopeft.<name>`` for an old top-level module name (``autopeft.trainer``), imported on first
    use (the package's ``__getattr__``); any other name is an ``AttributeError``."""
    if f"autopeft.{name}" in ALIASES:
        return importlib.import_module(f"autopeft.{name}")
    raise AttributeError(f"module 'autopeft' has no attribute {name!r}")
