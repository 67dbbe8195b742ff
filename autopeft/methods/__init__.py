"""The method library: importing this package registers every built-in method.

Each method is one module here (config + injection, see :mod:`autopeft.methods.base`); every
module of this package that does not start with ``_`` is imported, and registers itself.
"""

import importlib
import pkgutil

from autopeft.methods.base import (  # noqa: F401
    CANONICAL_METHODS, MethodConfig, MethodSpec, available_methods, get_method, parse_component, register,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
