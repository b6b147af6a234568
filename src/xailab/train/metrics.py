"""Classification metrics from logits, as tensor ops: accuracy, macro-F1, per-class P/R, confusion, top-k, ROC-AUC."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xailab.io import write_text


def confusion_matrix(pred: Tensor, true: Tensor, num_classes: int) -> Tensor:
    """``[K, K]`` counts; row = true class, column = predicted class. ``pred``/``true``: ``[N]`` int."""
    return torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for boolean ``positive`` ``[N]`` (Mann-Whitney U, ties halved)."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.double().argsort()
    sorted_scores = scores.double()[order]
    ranks = torch.empty_like(sorted_scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # Average the ranks of tied scores so ties count one half.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    mean_rank = (first + (counts - 1) / 2.0).to(torch.float64)
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(
    logits: Tensor, labels: Tensor, class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Metrics of ``logits`` ``[N, K]`` against ``labels`` ``[N]``.

    Two-class problems also get ROC-AUC, sensitivity and specificity, with class index 1 as the positive
    class (e.g. PNEUMONIA in the chest X-ray set).
    """
    logits, labels = logits.float().cpu(), labels.long().cpu()
    k = logits.shape[1]
    pred = logits.argmax(1)
    cm = confusion_matrix(pred, labels, k).double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp_min(1)
    recall = tp / cm.sum(1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    present = cm.sum(1) > 0  # macro-F1 over the classes that occur, as scikit-learn does with labels=present
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "accuracy": float((pred == labels).double().mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.long().tolist(),
    }
    topk = logits.topk(min(5, k), dim=1).indices
    for kk in sorted({min(3, k), min(5, k)}):
        out[f"top{kk}_accuracy"] = float((topk[:, :kk] == labels[:, None]).any(1).double().mean())
    if k == 2:
        probs = logits.softmax(1)[:, 1]
        out["roc_auc"] = roc_auc(probs, labels == 1)
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
