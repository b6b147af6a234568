"""The one batching kernel of explanation methods and metrics: chunk sizes, flat-indexed copies scored in
chunks, seeded generators, argument checks and the baseline vocabulary (with its one blur).

Methods and metrics evaluate many copies of their inputs (perturbed, interpolated, noisy). A copy has a flat
index ``i`` in ``range(N)``; the caller's ``build(idx[k]) -> [k, C, H, W]`` makes the copies of a chunk of
indices with tensor ops, so memory stays bounded by one chunk whatever ``N`` is and there is never one Python
iteration per copy. ``default_batch_size`` is the single place where a chunk size is chosen; ``in_layout``
stores copies as the caller's inputs are stored (channels_last or NCHW), the layout the model then runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab import autotune
from xailab.autotune import inputs_channels_last
from xailab.errors import ConfigError

Score = Literal["logit", "softmax", "predicted"]
# A baseline: a name of ``BASELINES``, a constant, or a tensor broadcastable to the inputs
Baseline = Literal["zero", "mean", "blur", "black", "white"] | float | Tensor

# Images per chunk, as (pixel budget, cap). On a CPU the throughput of a batch falls once its activations
# outgrow the caches (measured on a 2-core AVX2 EPYC: mnist_cnn forwards 1,981 img/s at 64, 904 at 512), so
# CPU chunks are moderate; accelerators want large batches to hide per-call overhead. Backward passes keep
# every activation, so with gradients the budget counts fewer pixels per image. A 224x224 DenseNet-169 gets
# 2 images per no-grad chunk on a CPU and 41 on a GPU, which keeps lime with n_samples=1000 far from OOM.
_CHUNK_BUDGETS = {
    ("cpu", False): (128 * 32 * 32, 128),
    ("cpu", True): (256 * 64 * 64, 256),
    ("accelerator", False): (2048 * 32 * 32, 2048),
    ("accelerator", True): (512 * 64 * 64, 512),
}

# The blur of every "blur" baseline: a Gaussian of std min(H, W) / BLUR_DIVISOR pixels (2 px on 32x32, 14 px
# on 224x224), so the blur removes the same share of detail whatever the image size.
BLUR_DIVISOR = 16


def default_batch_size(inputs: Tensor, grad: bool, model: nn.Module | None = None) -> int:
    """Images per chunk of perturbed or interpolated copies of ``inputs`` ``[B, C, H, W]`` sent through the
    model at once: forward only (``grad=False``) or forward and backward (``grad=True``).

    Given the ``model``, the chunk measured fastest for it on this device by ``xailab.autotune`` (cached;
    ``XAILAB_AUTOTUNE=0`` turns it off). Otherwise scaled by the image size so that a chunk's memory stays
    roughly constant, larger on accelerators. Every method takes ``internal_batch_size`` (every metric
    ``batch_size``) to override it.
    """
    if model is not None:
        tuned = autotune.chunk_size(model, inputs, grad)
        if tuned is not None:
            return tuned
    kind = "cpu" if inputs.device.type == "cpu" else "accelerator"
    pixels, cap = _CHUNK_BUDGETS[(kind, grad)]
    return max(1, min(cap, pixels // (inputs.shape[-2] * inputs.shape[-1])))


def check_positive(**values: float) -> None:
    """ConfigError naming the first of ``values`` (name -> number) that is not positive."""
    for name, value in values.items():
        if isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{name}={value!r} must be positive")


def chunk_size(
    inputs: Tensor, requested: int | None, grad: bool = False, model: nn.Module | None = None
) -> int:
    """``requested`` checked positive, or ``default_batch_size(inputs, grad, model)`` when None."""
    size = default_batch_size(inputs, grad, model) if requested is None else requested
    check_positive(batch_size=size)
    return size


def chunks(total: int, size: int, device: torch.device) -> Iterator[Tensor]:
    """Consecutive flat index ranges ``[0, size), [size, 2 size), ...`` covering ``range(total)``."""
    yield from torch.arange(total, device=device).split(size)


def in_layout(batch: Tensor, channels_last: bool) -> Tensor:
    """``batch`` ``[k, C, H, W]`` stored channels_last when ``channels_last`` (see ``inputs_channels_last``),
    else unchanged; the values are the same.

    Copies built from channels_last inputs come out NCHW when the layout is ambiguous (elementwise ops on one
    channel), and a model then runs its convolutions in NCHW, slower on CPUs (mnist_cnn on a 2-core AVX2
    EPYC: bare passes 1.2-1.3x, docs/benchmarks.md). Copies are therefore stored as the caller's inputs are,
    as Captum's and lime's copies are; the caller's model is never converted. One channel: the same bytes
    with the channel stride set to 1 (a view, no copy).
    """
    if not channels_last or inputs_channels_last(batch) or batch.ndim != 4:
        return batch
    if batch.shape[1] == 1 and batch.is_contiguous():
        return batch.as_strided(batch.shape, (batch.stride(0), 1, batch.stride(2), batch.stride(3)))
    return batch.contiguous(memory_format=torch.channels_last)


def seeded_generator(like: Tensor, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``like``'s device seeded with ``seed``: every random method and metric draws
    from one, so the same call gives the same result."""
    return torch.Generator(device=like.device).manual_seed(seed)


def scores_from_logits(logits: Tensor, targets: Tensor, score: Score = "logit") -> Tensor:
    """``[N, K]`` logits -> ``[N]``: the target's logit, its softmax probability, or (``predicted``) 1.0 where
    the predicted class is the target, else 0.0."""
    logits = logits.float()
    if score == "predicted":
        return (logits.argmax(1) == targets).float()
    out = logits.softmax(1) if score == "softmax" else logits
    return out.gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def score_copies(
    model: nn.Module,
    build: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk: int,
    score: Score = "logit",
    *,
    like: Tensor | None,
) -> Tensor:
    """Scores of ``len(targets)`` copies, built and evaluated ``chunk`` at a time.

    ``build(idx)``: the copies with flat indices ``idx`` ``[k]`` as ``[k, C, H, W]``; ``targets`` ``[N]``:
    the class scored for each flat index. ``like``: the inputs the copies are made from; the copies reach the
    model stored in their layout (``in_layout``; required so that no caller forgets it; None leaves the copies
    as ``build`` makes them). Returns float ``[N]`` (see ``scores_from_logits``).
    """
    channels_last = like is not None and inputs_channels_last(like)
    return torch.cat(
        [
            scores_from_logits(model(in_layout(build(idx), channels_last)), targets[idx], score)
            for idx in chunks(targets.shape[0], chunk, targets.device)
        ]
    )


def map_chunks(fn: Callable[[Tensor], Tensor], total: int, chunk: int, device: torch.device) -> Tensor:
    """``fn(idx)`` over consecutive chunks of flat indices covering ``range(total)``, concatenated on dim 0."""
    return torch.cat([fn(idx) for idx in chunks(total, chunk, device)])


# ---------------------------------------------------------------------------------------------------------
# Baselines: what removed, hidden or integrated-from pixels show
# ---------------------------------------------------------------------------------------------------------


def gaussian_blur(inputs: Tensor, sigma: float) -> Tensor:
    """Each channel blurred by a separable Gaussian of ``sigma`` pixels (edges replicated): ``[B, C, H, W]``."""
    if sigma <= 0:
        return inputs.clone()
    radius = int(np.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=inputs.device, dtype=inputs.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    b, c, h, w = inputs.shape
    x = F.pad(inputs.reshape(b * c, 1, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def default_blur_sigma(inputs: Tensor) -> float:
    """The blur baseline's std in pixels: ``min(H, W) / BLUR_DIVISOR``."""
    return min(inputs.shape[-2:]) / BLUR_DIVISOR


BASELINES: dict[str, Callable[[Tensor, float | None], Tensor]] = {
    "zero": lambda x, _: torch.zeros_like(x),
    # each image's mean per channel
    "mean": lambda x, _: x.mean(dim=(2, 3), keepdim=True).expand_as(x),
    # Sturmfels et al. 2020's blurred input
    "blur": lambda x, sigma: gaussian_blur(x, default_blur_sigma(x) if sigma is None else sigma),
    # each image's minimum / maximum over all its values (Quantus's "black" / "white")
    "black": lambda x, _: x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x),
    "white": lambda x, _: x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x),
}


def baseline_images(inputs: Tensor, baseline: Baseline = "zero", blur_sigma: float | None = None) -> Tensor:
    """The baseline of ``inputs`` ``[B, C, H, W]`` as ``[B, C, H, W]``: a name of ``BASELINES`` (``"blur"``:
    Gaussian std ``blur_sigma`` pixels, default ``min(H, W) / 16``), a constant, or a tensor broadcastable
    to the inputs."""
    if isinstance(baseline, Tensor):
        return baseline.to(inputs).expand_as(inputs)
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, str) and baseline in BASELINES:
        return BASELINES[baseline](inputs, blur_sigma)
    raise ConfigError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}, a number or a tensor")
