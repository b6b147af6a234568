"""A compact multi-scale CNN for 32x32 images: an Inception-like stem and depthwise-separable blocks."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from xailab.models.base import register_model


def conv_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """'Same'-padded conv + ReLU; keeps its bias since no BN follows directly."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), nn.ReLU()
    )


class MultiScaleStem(nn.Module):
    """Four parallel branches (1x1, 3x3, 5x5 conv, and 3x3 max-pool + 1x1 conv), 32 channels each,
    concatenated and batch-normalised: ``[B, C, H, W] -> [B, 128, H, W]``."""

    def __init__(self, in_channels: int, branch_channels: int = 32) -> None:
        super().__init__()
        self.branch1 = conv_relu(in_channels, branch_channels, 1)
        self.branch3 = conv_relu(in_channels, branch_channels, 3)
        self.branch5 = conv_relu(in_channels, branch_channels, 5)
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), conv_relu(in_channels, branch_channels, 1)
        )
        self.norm = nn.BatchNorm2d(4 * branch_channels)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        return self.norm(torch.cat(branches, dim=1))


class DepthwiseBlock(nn.Module):
    """3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU, 2x2 max-pool: ``[B, in, H, W] -> [B, out, H/2, W/2]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.pointwise(self.depthwise(x)))


class EfficientCNN(nn.Module):
    """Multi-scale stem (1x1, 3x3, 5x5 conv and max-pool + 1x1 conv branches, 32 channels each, concatenated
    to 128 + BN); four depthwise-separable blocks 128->64->128->256->512, each ending in a 2x2 max-pool;
    global average pool; dense 256 + ReLU + dropout 0.3; dense ``num_classes``.

    ``[B, C, 32, 32] -> [B, K]``. The last block outputs 2x2 at 32x32 and is the Grad-CAM layer.
    """

    cam_layer = "blocks.3"

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = MultiScaleStem(in_channels)
        widths = [128, 64, 128, 256, 512]
        self.blocks = nn.Sequential(*(DepthwiseBlock(cin, cout) for cin, cout in pairwise(widths)))
        self.classifier = nn.Sequential(
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


@register_model("efficient_cnn", input_size=(32, 32))
def efficient_cnn(in_channels: int = 3, num_classes: int = 10) -> EfficientCNN:
    """Multi-scale stem + four depthwise-separable blocks, for 32x32 images."""
    return EfficientCNN(in_channels, num_classes)
