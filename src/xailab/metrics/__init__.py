"""Explanation quality: faithfulness, robustness, randomisation sanity checks, complexity and agreement,
batched in torch on the model's device; ``assess`` runs them all into one ``Assessment`` record. Importing
this package registers every built-in metric.

Not to be confused with ``xailab.train.metrics`` (accuracy, F1, ... of a classifier).
"""

from xailab.metrics import (  # noqa: F401  (registers)
    complexity,
    faithfulness,
    localisation,
    randomisation,
    robustness,
)
from xailab.metrics.agreement import agreement_matrix, topk_iou
from xailab.metrics.assessment import Agreement, Assessment, MetricInfo, SanityCurves, ScoreRow, assess
from xailab.metrics.base import (
    DEFAULT_METRICS,
    METRICS,
    MetricSpec,
    evaluate_explanations,
    list_metrics,
    register_metric,
    spearman,
    summarise,
)
from xailab.metrics.faithfulness import linear_imputation, pixel_flipping_curve, removal_curve, road_curve
from xailab.metrics.randomisation import RandomisationResult, model_randomisation, ssim

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "Agreement",
    "Assessment",
    "MetricInfo",
    "MetricSpec",
    "RandomisationResult",
    "SanityCurves",
    "ScoreRow",
    "agreement_matrix",
    "assess",
    "evaluate_explanations",
    "linear_imputation",
    "list_metrics",
    "model_randomisation",
    "pixel_flipping_curve",
    "register_metric",
    "removal_curve",
    "road_curve",
    "spearman",
    "ssim",
    "summarise",
    "topk_iou",
]
