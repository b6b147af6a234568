"""xailab: train CNNs on image datasets, explain their decisions, measure the explanations, report.

from xailab import create_model, load_dataset, train
"""

from xailab.api import (
    Run,
    TrainConfig,
    assess_run,
    class_probabilities,
    create_model,
    decode_image,
    evaluate,
    evaluate_explanations,
    explain,
    explain_images,
    explain_run,
    explain_untrained,
    list_datasets,
    list_methods,
    list_metrics,
    list_models,
    list_runs,
    list_studies,
    load_dataset,
    load_run,
    predict,
    read_images,
    run_study,
    train,
)
from xailab.errors import XailabError

__version__ = "0.1.0"

__all__ = [
    "Run",
    "TrainConfig",
    "XailabError",
    "__version__",
    "assess_run",
    "class_probabilities",
    "create_model",
    "decode_image",
    "evaluate",
    "evaluate_explanations",
    "explain",
    "explain_images",
    "explain_run",
    "explain_untrained",
    "list_datasets",
    "list_methods",
    "list_metrics",
    "list_models",
    "list_runs",
    "list_studies",
    "load_dataset",
    "load_run",
    "predict",
    "read_images",
    "run_study",
    "train",
]
