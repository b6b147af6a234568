"""The model zoo. Importing this package registers every model with ``xailab.models.base.MODELS``."""

from xailab.models import efficient_cnn, imagenet, mobilenetv2, resnet, small_cnns, vit
from xailab.models.base import (
    MODELS,
    create_model,
    list_models,
    model_input_size,
    random_init_options,
    size_options,
)
from xailab.models.summary import count_macs, count_parameters, model_table

__all__ = [
    "MODELS",
    "count_macs",
    "count_parameters",
    "create_model",
    "efficient_cnn",
    "imagenet",
    "list_models",
    "mobilenetv2",
    "model_input_size",
    "model_table",
    "random_init_options",
    "resnet",
    "size_options",
    "small_cnns",
    "vit",
]
