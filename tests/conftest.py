"""Shared fixtures (where the read-only copy of the real datasets lives, the bundled digits, one thread) and the
tests' shared helpers (a tiny CNN, a linear model, a calibrated zoo model, a training callback, the hooks left
on a model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from xailab.data import load_dataset
from xailab.models import create_model


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Tests run the fixed configuration rules (``XAILAB_AUTOTUNE=0``): measuring speed would make results
    depend on the machine and its load, and cost seconds per new model. ``tests/test_autotune.py`` turns the
    autotuner on where it tests it."""
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared dataset folder: ``XAILAB_DATA_DIR``, else ``<repo>/../shared/datasets``; skip if absent.

    It is read-only: tests write caches and downloads to ``tmp_path`` only.
    """
    env = os.environ.get("XAILAB_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared dataset folder {path} is absent (set XAILAB_DATA_DIR to a copy of it)")
    return path


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled 8x8 digits at 28x28: a dataset that needs no download."""
    return load_dataset("digits", image_size=28)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module: small batches gain nothing from more, and on a busy machine the
    thread barriers between small ops (e.g. DenseNet's) dominate. Use with ``pytest.mark.usefixtures``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCNN(nn.Module):
    """The tests' one tiny CNN on any image size: conv1 (3x3, ``stride``) -> [BatchNorm] -> ReLU -> conv2
    (3x3) -> ReLU -> global mean -> linear, ``[B, C, H, W] -> [B, classes]``. ``cam_layer`` names conv2 for
    the CAM methods; ``explode`` makes forward raise after the convolutions ran (hook clean-up tests)."""

    cam_layer: str | None = "conv2"

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 4,
        *,
        stride: int = 1,
        batch_norm: bool = True,
        explode: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)
        self.relu1 = nn.ReLU()  # modules, so the ReLU methods (guided backprop, deconvnet) apply
        self.relu2 = nn.ReLU()
        self.explode = explode

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        if self.explode:
            raise RuntimeError("exploded in forward")
        return self.fc(x.mean(dim=(2, 3)))


def calibrated_model(name: str, channels: int, size: int) -> nn.Module:
    """A seeded zoo model whose BatchNorm statistics come from one batch of noise ``[16, C, size, size]``, so
    that its logits differ by O(1) between inputs (an untrained model's barely move), in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, channels, 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(16, channels, size, size))
    return model.eval()


class StopAfter:
    """A training callback that simulates a kill: raises once epoch ``n`` has been checkpointed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, row: dict) -> None:
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def hooks_left(model: nn.Module) -> list[str]:
    """Names of the modules that still carry a forward, forward-pre, backward or backward-pre hook, plus
    any global module hook."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    left = [
        f"{name or 'model'}.{kind}" for name, m in model.named_modules() for kind in kinds if getattr(m, kind)
    ]
    module = torch.nn.modules.module
    global_kinds = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return left + [kind for kind in global_kinds if getattr(module, kind, None)]


class LinearModel(nn.Module):
    """Logits linear in the pixels, ``W flatten(x) + b`` for inputs of ``shape`` ``(C, H, W)``, weights from
    ``seed``: every gradient and perturbation method has a closed-form answer."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(shape[0] * shape[1] * shape[2], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))
