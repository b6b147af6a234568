"""Evaluation metrics agree with scikit-learn on random predictions."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from xailab.train.metrics import classification_metrics, roc_auc


@pytest.mark.parametrize("k", [2, 3, 10])
def test_metrics_match_sklearn(k):
    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (500,), generator=g)
    logits = torch.randn(500, k, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, k)
    m = classification_metrics(logits, labels, [str(i) for i in range(k)])
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == sk_confusion(y, pred).tolist()
    prec = precision_score(y, pred, average=None)
    rec = recall_score(y, pred, average=None)
    for i in range(k):
        assert m["per_class"][str(i)]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][str(i)]["recall"] == pytest.approx(rec[i])
    top = logits.topk(min(3, k), 1).indices
    assert m[f"top{min(3, k)}_accuracy"] == pytest.approx(
        (top == labels[:, None]).any(1).float().mean().item()
    )
    if k == 2:
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, logits.softmax(1)[:, 1].numpy()))
        assert m["sensitivity"] == pytest.approx(rec[1]) and m["specificity"] == pytest.approx(rec[0])


def test_roc_auc_with_ties_and_known_answers():
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4])
    positive = torch.tensor([False, True, False, True, True])
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive.numpy(), scores.numpy()))
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([False, True])) == 1.0
    assert roc_auc(torch.tensor([1.0, 0.0]), torch.tensor([False, True])) == 0.0
