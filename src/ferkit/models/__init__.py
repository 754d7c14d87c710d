"""Model registry and the architectures of the published FER2013 systems."""

from ferkit.models.registry import (
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "count_flops", "count_parameters", "create_model", "get_spec", "list_models",
           "register_model"]
