"""What the interleaved benchmarks share: a trained MNIST run, its first test images and its predictions.

Imported as ``from common import ...`` by the scripts beside it (``python benchmarks/<script>.py`` puts this
folder on the import path).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

import xailab
from xailab import load_dataset
from xailab.data.transforms import to_model_input


def trained_mnist_batch(run_dir: str, data_dir: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The fp32 model of a trained MNIST run (eval mode), the first ``n`` official test images normalised as
    it was trained ``[n, C, 28, 28]``, and its predicted classes ``[n]`` (the targets every method explains)."""
    run = xailab.load_run(run_dir)
    model = run.model.float().eval()
    ds = load_dataset("mnist", data_dir=data_dir, image_size=28)
    x = to_model_input(ds["test"].images[:n], torch.tensor(run.mean), torch.tensor(run.std)).contiguous()
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def clock(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
