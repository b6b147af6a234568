"""Explanation methods behind one contract: ``explain(model, inputs, method, /, target) -> [B, 1, H, W]``.

Importing this package registers every built-in method.
"""

from xailab.explain import (  # noqa: F401  (imported to register their methods)
    cam,
    cam_variants,
    gradients,
    lrp,
    perturbation,
    transformer,
)
from xailab.explain.base import (
    METHODS,
    MethodSpec,
    ParamSpec,
    applicable_methods,
    explain,
    list_methods,
    model_capabilities,
    preserved_state,
    register_method,
    resolve_method,
    validate_method_params,
)

__all__ = [
    "METHODS",
    "MethodSpec",
    "ParamSpec",
    "applicable_methods",
    "explain",
    "list_methods",
    "model_capabilities",
    "preserved_state",
    "register_method",
    "resolve_method",
    "validate_method_params",
]
