"""xailab: train CNNs on image datasets, explain their decisions, measure the explanations, report.

from xailab import create_model, load_dataset, train
"""

from xailab.api import (
    Run,
    TrainConfig,
    create_model,
    evaluate,
    explain,
    explain_run,
    explain_untrained,
    list_datasets,
    list_methods,
    list_models,
    list_runs,
    load_dataset,
    load_run,
    predict,
    read_images,
    train,
)
from xailab.errors import XailabError

__version__ = "0.1.0"

__all__ = [
    "Run",
    "TrainConfig",
    "XailabError",
    "__version__",
    "create_model",
    "evaluate",
    "explain",
    "explain_run",
    "explain_untrained",
    "list_datasets",
    "list_methods",
    "list_models",
    "list_runs",
    "load_dataset",
    "load_run",
    "predict",
    "read_images",
    "train",
]
