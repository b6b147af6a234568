"""Model size and cost: parameter counts, multiply-accumulates per image, and a table over the registry."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xailab.models.base import MODELS, create_model, list_models, random_init_options


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``[1, in_channels, H, W]`` image.

    Counted by ``FlopCounterMode`` (MACs = FLOPs / 2): convolutions and matrix products only; BN, activations,
    pooling and biases are not counted. The model is run in eval mode and its mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, in_channels, *input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_table(in_channels: int = 3, num_classes: int = 10) -> list[dict]:
    """One row per registered model: ``name``, ``params``, ``trainable``, ``macs``, ``input_size`` (H, W).

    Models with a ``pretrained`` option are built with random weights: sizes do not depend on them.
    """
    rows = []
    for name in list_models():
        spec = MODELS.get(name)
        model = create_model(name, in_channels, num_classes, **random_init_options(name))
        rows.append(
            {
                "name": name,
                "params": count_parameters(model),
                "trainable": count_parameters(model, trainable_only=True),
                "macs": count_macs(model, spec.input_size, in_channels),
                "input_size": spec.input_size,
            }
        )
    return rows
