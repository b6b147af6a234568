"""ResNet-18 for 32x32 images: a 3x3 stride-1 stem keeps the resolution CIFAR images cannot spare."""

from __future__ import annotations

from torch import Tensor, nn

from xailab.models.base import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with a shortcut: ``[B, in, H, W] -> [B, out, H / stride, W / stride]``.

    The shortcut is a 1x1 conv + BN projection where the shape changes, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # ReLU modules, not F.relu: methods and tools that act on activation modules (guided backprop, Captum's
        # GuidedBackprop) see every one; two instances, since a module called twice confuses backward hooks
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two basic blocks; the first one changes the width and/or resolution."""
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
    )


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 conv 64 stride 1 + BN + ReLU + 2x2 max-pool; four stages of two basic
    blocks with 64/128/256/512 filters and strides 1/2/2/2 (1x1 conv + BN projection shortcuts where shapes
    change); global average pool; dense ``num_classes``.

    ``[B, C, 32, 32] -> [B, K]``; ``layer4`` outputs 2x2 at 32x32 and is the Grad-CAM layer.
    """

    cam_layer = "layer4"

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.layer1 = stage(64, 64, 1)
        self.layer2 = stage(64, 128, 2)
        self.layer3 = stage(128, 256, 2)
        self.layer4 = stage(256, 512, 2)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


@register_model("resnet18", input_size=(32, 32))
def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet18:
    """ResNet-18 (basic blocks 2-2-2-2) with a 3x3 stride-1 stem, for 32x32 images."""
    return ResNet18(in_channels, num_classes)
