"""Training: ``train(config) -> Run``, evaluation metrics, safetensors checkpoints, run folders."""

from xailab.train.config import TrainConfig
from xailab.train.loop import predict_logits, train
from xailab.train.metrics import classification_metrics, roc_auc
from xailab.train.runs import Run, list_runs, load_run

__all__ = [
    "Run",
    "TrainConfig",
    "classification_metrics",
    "list_runs",
    "load_run",
    "predict_logits",
    "roc_auc",
    "train",
]
