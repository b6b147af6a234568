"""A small MobileNetV2 for 32x32 images (the research framework's CIFAR variant)."""

from __future__ import annotations

from torch import Tensor, nn

from xailab.models.base import register_model


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias: the BN has one) + BN + ReLU6 with 'same' padding; torchvision's layout (keys ``.0``, ``.1``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6 (skipped when ``expansion == 1``), 3x3 depthwise + BN + ReLU6, 1x1 linear
    projection + BN: ``[B, in, H, W] -> [B, out, H / stride, W / stride]``, plus the input when shapes match.

    Module names follow torchvision (``conv.0.0.weight`` ...), so ImageNet weights load as they are.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            # linear bottleneck: a ReLU on the narrow projection would destroy information
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (in, out, stride, expansion) of the seven inverted-residual blocks
BLOCKS = (
    (32, 16, 1, 1),
    (16, 24, 2, 6),
    (24, 24, 1, 6),
    (24, 32, 2, 6),
    (32, 32, 1, 6),
    (32, 64, 2, 6),
    (64, 64, 1, 6),
)


class MobileNetV2Small(nn.Module):
    """MobileNetV2 for 32x32 inputs: 3x3 conv 32 stride 2 + BN + ReLU6; seven inverted-residual blocks
    32->16 (s1, t1), 16->24 (s2, t6), 24->24 (s1), 24->32 (s2), 32->32 (s1), 32->64 (s2), 64->64 (s1);
    1x1 conv 1280 + BN + ReLU6; global average pool; dense 128 + ReLU + dropout 0.2; dense ``num_classes``.

    ``[B, C, 32, 32] -> [B, K]``. The head conv sees a 2x2 map at 32x32, so it is the Grad-CAM layer.
    """

    cam_layer = "head"

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU6(in_channels, 32, 3, stride=2)
        self.blocks = nn.Sequential(*(InvertedResidual(*block) for block in BLOCKS))
        self.head = ConvBNReLU6(64, 1280, 1)
        self.classifier = nn.Sequential(
            nn.Linear(1280, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


@register_model("mobilenetv2", input_size=(32, 32))
def mobilenetv2(in_channels: int = 3, num_classes: int = 10) -> MobileNetV2Small:
    """MobileNetV2 (7 inverted-residual blocks, 1280-channel head) for 32x32 images."""
    return MobileNetV2Small(in_channels, num_classes)
