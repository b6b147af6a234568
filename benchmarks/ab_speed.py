"""A/B of explanation and metric speed between two versions of xailab on the same machine.

Run it once per version, interleaved, putting the version's ``src`` first on the path, e.g. the code before the
#11 redesign against HEAD::

    git worktree add /tmp/base d1bf693
    for v in base head base head; do PP=$([ $v = base ] && echo /tmp/base/src || echo src)
        XAILAB_AUTOTUNE=0 PYTHONPATH=$PP OMP_NUM_THREADS=1 python benchmarks/ab_speed.py $v; done

Same random-init ``mnist_cnn``, 16 random 1x28x28 inputs, one thread, best of 3 calls; prints explanations/s per
method and images/s per metric as one JSON line. Only the public ``explain`` and ``evaluate_explanations``
are used, which both versions have.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch

from xailab.explain import explain
from xailab.metrics.base import METRICS, evaluate_explanations
from xailab.models import create_model

METHODS = [
    ("saliency", {}),
    ("integrated_gradients", {"n_steps": 50}),
    ("occlusion", {}),
    ("lime", {"n_samples": 500}),
    ("kernel_shap", {"n_samples": 500}),
]
METRIC_NAMES = [
    "deletion_auc",
    "insertion_auc",
    "faithfulness_correlation",
    "pixel_flipping",
    "road",
    "max_sensitivity",
    "model_randomisation",
]
REEXPLAIN = {"max_sensitivity", "model_randomisation"}  # metrics that explain again: given a method


def rate(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Items/s of the fastest of ``repeats`` calls of ``fn`` over ``n`` items."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(n / best, 2)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("mnist_cnn", in_channels=1, num_classes=10).eval()
    x = torch.randn(16, 1, 28, 28)
    maps = torch.rand(16, 1, 28, 28)
    targets = torch.zeros(16, dtype=torch.long)
    out: dict[str, float] = {}
    for name, params in METHODS:
        explain(model, x[:2], name, **params)  # warm-up
        out[name] = rate(lambda name=name, params=params: explain(model, x, name, **params), len(x))
    for name in METRIC_NAMES:
        if name not in METRICS:
            continue

        def run(n: int, name: str = name) -> object:
            given = {"method": "saliency"} if name in REEXPLAIN else {"attributions": maps[:n]}
            return evaluate_explanations(model, x[:n], targets[:n], metrics=[name], **given)

        run(2)  # warm-up
        out[name] = rate(lambda run=run: run(len(x)), len(x))
    print(sys.argv[1] if len(sys.argv) > 1 else "this", json.dumps(out))


if __name__ == "__main__":
    main()
