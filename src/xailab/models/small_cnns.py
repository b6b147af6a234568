"""The seeds' small CNNs: the JAX CIFAR-10 and MNIST VGG-style nets and the Keras CIFAR-10 net."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.models.base import register_model


class ConvBlock(nn.Sequential):
    """``num_convs`` x (3x3 'same' conv + BN + ReLU), then an optional 2x2 max-pool.

    ``[B, in, H, W] -> [B, out, H', W']`` with ``H' = H // 2`` when pooling, else ``H``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, pool: bool = True) -> None:
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class VGGStyleCNN(nn.Module):
    """Conv blocks, global average pool, dense ``hidden`` + ReLU + dropout, dense ``num_classes``.

    ``blocks``: ``(out_channels, num_convs, pool)`` per block. The last block is the Grad-CAM layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks: list[tuple[int, int, bool]],
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out for out, _, _ in blocks]
        self.features = nn.Sequential(
            *(ConvBlock(cin, cout, n, pool) for cin, (cout, n, pool) in zip(widths, blocks, strict=False))
        )
        self.classifier = nn.Sequential(
            nn.Linear(widths[-1], hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.cam_layer = f"features.{len(blocks) - 1}"

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@register_model("simple_cnn", input_size=(32, 32))
def simple_cnn(in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5) -> VGGStyleCNN:
    """VGG-style CIFAR-10 CNN (JAX seed), 32x32.

    Blocks conv64 x2, conv128 x2, conv256 x3 (each 3x3 'same' conv + BN + ReLU), a 2x2 max-pool after each
    block; global average pool; dense 512 + ReLU + dropout (``dropout``, 0.5); dense ``num_classes``.
    ``[B, C, 32, 32] -> [B, K]``; Grad-CAM layer: the last block (4x4 at 32x32).
    """
    return VGGStyleCNN(
        in_channels, num_classes, [(64, 2, True), (128, 2, True), (256, 3, True)], 512, dropout
    )


@register_model("mnist_cnn", input_size=(28, 28))
def mnist_cnn(in_channels: int = 1, num_classes: int = 10, dropout: float = 0.5) -> VGGStyleCNN:
    """VGG-style MNIST CNN (JAX seed), 28x28.

    conv32 x2 + 2x2 max-pool, conv64 x2 + 2x2 max-pool, conv128 x2 (no pool), each 3x3 'same' conv + BN +
    ReLU; global average pool; dense 256 + ReLU + dropout (``dropout``, 0.5); dense ``num_classes``.
    ``[B, C, 28, 28] -> [B, K]``; Grad-CAM layer: the last block (7x7 at 28x28).
    """
    return VGGStyleCNN(
        in_channels, num_classes, [(32, 2, True), (64, 2, True), (128, 2, False)], 256, dropout
    )


def keras_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Keras/TensorFlow 'same' padding of one dimension: output ``ceil(size / stride)``, the odd pixel at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class KerasConvBlock(nn.Module):
    """Keras ``Conv2D(relu, padding)`` -> ``BatchNormalization`` -> ``MaxPool2D(2)``, in that order.

    ``[B, in, H, W] -> [B, out, ((H - k) // s + 1) // 2, ...]`` ('valid') or ``ceil(H / s) // 2`` ('same',
    TensorFlow's asymmetric padding, which PyTorch's ``padding='same'`` does not offer for strides > 1).
    The conv keeps its bias (Keras' default; the ReLU sits between it and the BN).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: str = "valid"
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride)
        self.relu = nn.ReLU()  # a module, so activation-module tools (guided backprop) see it
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2)
        self.same = padding == "same"

    def pad(self, x: Tensor) -> Tensor:
        if not self.same:
            return x
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        top, bottom = keras_same_padding(x.shape[-2], k, s)
        left, right = keras_same_padding(x.shape[-1], k, s)
        return F.pad(x, (left, right, top, bottom))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.relu(self.conv(self.pad(x)))))


KERAS_STRIDES = (1, 2, 3)
KERAS_KERNEL_SIZES = (3, 4)
KERAS_PADDINGS = ("valid", "same")


class KerasCNN(nn.Module):
    """The Keras CIFAR-10 CNN: conv 32 kxk + ReLU -> BN -> 2x2 max-pool, conv 64 kxk + ReLU -> BN -> 2x2
    max-pool ('valid' padding, stride ``stride``), flatten, dense ``num_classes``.

    ``[B, C, image_size, image_size] -> [B, K]``. The flatten size depends on stride, kernel and image size,
    so it is measured with a dummy forward here. L2 on the conv kernels (Keras ``kernel_regularizer``) is
    returned by ``regularization_loss()`` for the training loop to add to the loss. The seed names L2 but not
    its factor, so ``weight_decay`` defaults to the common 1e-4 (Keras' bare ``l2()`` would be 0.01).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        stride: int = 1,
        kernel_size: int = 3,
        image_size: int = 32,
        weight_decay: float = 1e-4,
        padding: str = "valid",
    ) -> None:
        super().__init__()
        if stride not in KERAS_STRIDES:
            raise ConfigError(f"keras_cnn: stride={stride!r} is invalid; valid strides: {KERAS_STRIDES}")
        if kernel_size not in KERAS_KERNEL_SIZES:
            raise ConfigError(
                f"keras_cnn: kernel_size={kernel_size!r} is invalid; valid kernel sizes: {KERAS_KERNEL_SIZES}"
            )
        if padding not in KERAS_PADDINGS:
            raise ConfigError(f"keras_cnn: padding={padding!r} is invalid; valid paddings: {KERAS_PADDINGS}")
        if weight_decay < 0:
            raise ConfigError(f"keras_cnn: weight_decay={weight_decay!r} must be >= 0")
        self.weight_decay = weight_decay
        self.block1 = KerasConvBlock(in_channels, 32, kernel_size, stride, padding)
        self.block2 = KerasConvBlock(32, 64, kernel_size, stride, padding)
        setting = f"stride={stride}, kernel_size={kernel_size}, padding={padding!r}, image_size={image_size}"
        with torch.no_grad():
            x = torch.zeros(1, in_channels, image_size, image_size)
            x = self.block1.pool(self._checked_conv("block1", x, setting))
            x = self.block2.pool(self._checked_conv("block2", x, setting))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(x.numel(), num_classes))
        # Grad-CAM needs a map wider than one pixel; at stride 2 the last pool leaves 1x1, so use the BN before it
        self.cam_layer = "block2" if x.shape[-1] > 1 else "block2.bn"

    def _checked_conv(self, name: str, x: Tensor, setting: str) -> Tensor:
        """``getattr(self, name).conv(x)`` on a dummy map, raising ConfigError where the map gets too small."""
        block = getattr(self, name)
        x = block.pad(x)
        size = x.shape[-1]
        if size < block.conv.kernel_size[0]:
            raise ConfigError(
                f"keras_cnn: with {setting} {name} gets a {size}x{size} map, smaller than its kernel; "
                "use a smaller stride or kernel_size, padding='same', or a larger image_size"
            )
        x = block.conv(x)
        if x.shape[-1] < 2:
            raise ConfigError(
                f"keras_cnn: with {setting} {name}'s conv outputs {x.shape[-1]}x{x.shape[-1]}, too small for its "
                "2x2 max-pool; use a smaller stride or kernel_size, padding='same', or a larger image_size"
            )
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.block2(self.block1(x)))

    def regularization_loss(self) -> Tensor:
        """Keras ``l2(weight_decay)`` on both conv kernels: ``weight_decay * sum(w ** 2)`` (biases excluded)."""
        squares = sum(block.conv.weight.pow(2).sum() for block in (self.block1, self.block2))
        return self.weight_decay * cast(Tensor, squares)  # a sum of two tensors, never sum()'s start 0


@register_model("keras_cnn", input_size=(32, 32))
def keras_cnn(
    in_channels: int = 3,
    num_classes: int = 10,
    stride: int = 1,
    kernel_size: int = 3,
    image_size: int = 32,
    weight_decay: float = 1e-4,
    padding: str = "valid",
) -> KerasCNN:
    """Two-conv Keras CIFAR-10 CNN (stride 1/2/3, kernel 3/4, 'valid'/'same' padding, L2 1e-4), 32x32."""
    return KerasCNN(in_channels, num_classes, stride, kernel_size, image_size, weight_decay, padding)
