"""Explanation methods behind one contract: ``explain(model, inputs, method, target) -> [B, 1, H, W]``.

Importing this package registers every built-in method.
"""

from xailab.explain import cam, gradients, perturbation, transformer  # noqa: F401  (imported to register their methods)
from xailab.explain.base import (
    METHODS,
    MethodSpec,
    applicable_methods,
    explain,
    list_methods,
    model_capabilities,
    preserved_state,
    register_method,
)

__all__ = [
    "METHODS",
    "MethodSpec",
    "applicable_methods",
    "explain",
    "list_methods",
    "model_capabilities",
    "preserved_state",
    "register_method",
]
