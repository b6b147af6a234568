"""Classification metrics from logits through scikit-learn: accuracy, macro-F1, per-class P/R, confusion,
top-k, ROC-AUC."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as sk
from torch import Tensor

from xailab.io import write_text


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for boolean ``positive`` ``[N]`` (ties count one half);
    NaN when only one class occurs."""
    positive_np = positive.cpu().numpy().astype(bool)
    if positive_np.all() or not positive_np.any():
        return float("nan")
    return float(sk.roc_auc_score(positive_np, scores.double().cpu().numpy()))


def classification_metrics(
    logits: Tensor, labels: Tensor, class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Metrics of ``logits`` ``[N, K]`` against ``labels`` ``[N]`` (scikit-learn's definitions).

    macro-F1 averages over the classes that occur. Two-class problems also get ROC-AUC, sensitivity and
    specificity, with class index 1 as the positive class (e.g. PNEUMONIA in the chest X-ray set).
    """
    logits, labels = logits.float().cpu(), labels.long().cpu()
    k = logits.shape[1]
    pred = logits.argmax(1)
    y, p = labels.numpy(), pred.numpy()
    classes = np.arange(k)
    precision, recall, f1, support = sk.precision_recall_fscore_support(y, p, labels=classes, zero_division=0)
    present = np.unique(y)
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "accuracy": float(sk.accuracy_score(y, p)),
        "macro_f1": float(sk.f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": sk.confusion_matrix(y, p, labels=classes).tolist(),
    }
    topk = logits.topk(min(5, k), dim=1).indices
    for kk in sorted({min(3, k), min(5, k)}):
        out[f"top{kk}_accuracy"] = float((topk[:, :kk] == labels[:, None]).any(1).double().mean())
    if k == 2:
        out["roc_auc"] = roc_auc(logits.softmax(1)[:, 1], labels == 1)
        out["sensitivity"] = float(recall[1])
        out["specificity"] = float(recall[0])
    return out


def predictions_csv(
    path: str | Path, logits: Tensor, labels: Tensor, class_names: list[str] | tuple[str, ...]
) -> Path:
    """Write ``predictions.csv``: index, true, predicted, confidence, top-3 (class:probability;...)."""
    probs = logits.float().softmax(1).cpu()
    conf, top = probs.topk(min(3, probs.shape[1]), dim=1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "true", "predicted", "confidence", "top3"])
    for i in range(probs.shape[0]):
        top3 = ";".join(
            f"{class_names[c]}:{p:.4f}" for c, p in zip(top[i].tolist(), conf[i].tolist(), strict=True)
        )
        w.writerow(
            [i, class_names[int(labels[i])], class_names[int(top[i, 0])], f"{float(conf[i, 0]):.6f}", top3]
        )
    return write_text(path, buf.getvalue())
