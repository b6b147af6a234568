"""An exponential moving average (EMA) of a model's weights, and flip test-time augmentation.

The EMA follows the trained weights with ``shadow <- d * shadow + (1 - d) * weights`` after every optimiser
step, with the warm-up ``d_t = min(decay, (1 + t) / (10 + t))`` so that the first steps, far from any
optimum, fade quickly. Floating-point buffers (BatchNorm running statistics) are averaged the same way;
integer buffers (``num_batches_tracked``) are copied. ``swapped_in`` evaluates or saves the averaged weights
inside a ``with`` block and restores the trained ones on the way out, even on an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightEMA:
    """The EMA of ``model``'s parameters and buffers (a copy on the model's device, same dtypes)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current weights by one step."""
        d = self.current_decay()
        state = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        if floats:
            # shadow += (1 - d) * (weights - shadow), fused over all tensors
            torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach() for k in floats], 1 - d)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(state[k])
        self.updates += 1

    def state_tensors(self) -> dict[str, Tensor]:
        """The shadow weights plus the update count, as tensors for a checkpoint."""
        return {**{f"shadow.{k}": v for k, v in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore from ``state_tensors`` (e.g. read back from a checkpoint)."""
        for k, v in self.shadow.items():
            v.copy_(tensors[f"shadow.{k}"])
        self.updates = int(tensors["updates"])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the averaged weights inside the block; its own weights are restored after."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(self.shadow, strict=True)
            yield model
        finally:
            model.load_state_dict(saved, strict=True)


def flip_tta(model: nn.Module, x: Tensor) -> Tensor:
    """Logits ``[B, K]`` of ``x`` ``[B, C, H, W]`` averaged with those of its horizontal mirror image.

    Only for data where a mirror image shows the same class (natural images; never digits or anatomy).
    """
    both = model(torch.cat([x, x.flip(-1)]))
    return flip_average(both[: x.shape[0]], both[x.shape[0] :])


def flip_average(plain: Tensor, mirrored: Tensor) -> Tensor:
    """The flip TTA's logits ``[B, K]``: the fp32 mean of the images' logits and their mirror images'. The one
    place that says how the two passes combine (``flip_tta``, and the study's predictions, which time the
    plain pass alone)."""
    return (plain.float() + mirrored.float()) / 2
