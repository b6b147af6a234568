"""Training: ``train(config) -> Run``, evaluation metrics, safetensors checkpoints, run folders."""

from xailab.train.config import TrainConfig
from xailab.train.loop import autocast_dtype, bf16_is_fast, predict_logits, resolve_device, train
from xailab.train.metrics import classification_metrics, confusion_matrix, roc_auc
from xailab.train.runs import Run, list_runs, load_run

__all__ = [
    "Run",
    "TrainConfig",
    "autocast_dtype",
    "bf16_is_fast",
    "classification_metrics",
    "confusion_matrix",
    "list_runs",
    "load_run",
    "predict_logits",
    "resolve_device",
    "roc_auc",
    "train",
]
