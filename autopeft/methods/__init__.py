"""The method library: importing this package registers every built-in method.

Each method is one module (config + injection); see :mod:`autopeft.methods.base` for the interface.
"""

from autopeft.methods import adapter, bitfit, lora, prefix_tuning, unipelt  # noqa: F401  (registration)
from autopeft.methods.base import (  # noqa: F401
    CANONICAL_METHODS, MethodConfig, MethodSpec, available_methods, get_method, parse_component, register,
)
