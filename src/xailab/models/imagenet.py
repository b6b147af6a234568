"""ImageNet backbones whose state_dicts match torchvision's, and the chest X-ray transfer-learning ensemble.

``mobilenetv2_imagenet`` and ``densenet169`` use torchvision's parameter and buffer names, so torchvision's
published ``.pth`` files load without conversion (torchvision itself is not needed). ``pretrained`` is
``True`` (torchvision's file in the torch hub cache), ``"auto"`` (that file when it is there, else random init
with a warning: what an offline study uses), a path to a ``.pth``/``.safetensors`` state_dict (torchvision's,
or an xailab run's ``model.safetensors`` of the same architecture), a folder holding torchvision's file, or
``False`` (random init). ``num_classes=0`` drops the classifier and
makes ``forward`` return the pooled features. A study may name one of its own cells instead of a path
(``"cell:<model>"``, see ``xailab.study.runner``); the study resolves it, so outside a study it is an error.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from xailab.config import CELL_REFERENCE
from xailab.errors import CheckpointError, ConfigError, XailabWarning
from xailab.models.base import register_model
from xailab.models.mobilenetv2 import ConvBNReLU6, InvertedResidual

Pretrained = bool | str | Path

DOWNLOAD_URL = "https://download.pytorch.org/models/{}"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
DENSENET169_FILE = "densenet169-b2777c0a.pth"

# torchvision's DenseNet checkpoints predate module names with dots: "norm.1" stands for "norm1"
OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def rgb(x: Tensor, in_channels: int) -> Tensor:
    """ImageNet backbones need 3 channels: a gray ``[B, 1, H, W]`` batch is repeated to ``[B, 3, H, W]``."""
    return x.repeat(1, 3, 1, 1) if in_channels == 1 else x


def check_in_channels(in_channels: int, model: str) -> None:
    if in_channels not in (1, 3):
        raise ConfigError(
            f"{model}: in_channels={in_channels} is invalid; ImageNet backbones take 1 (gray) or 3"
        )


# (expansion t, out channels c, repeats n, first stride s) per stage, width multiplier 1.0
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0), torchvision's layout: ``features.0`` 3x3 conv 32 stride 2 + BN + ReLU6;
    ``features.1-17`` inverted-residual blocks (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2)
    (6,96,3,1) (6,160,3,2) (6,320,1,1); ``features.18`` 1x1 conv 1280 + BN + ReLU6; global average pool;
    ``classifier`` dropout 0.2 + dense ``num_classes``.

    ``[B, C, 224, 224] -> [B, K]``; ``forward_features`` gives the pooled ``[B, 1280]``. Grad-CAM layer:
    ``features.18`` (7x7 at 224x224).
    """

    cam_layer = "features.18"
    num_features = 1280

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        check_in_channels(in_channels, "mobilenetv2_imagenet")
        self.in_channels = in_channels
        self.num_classes = num_classes
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, 3, stride=2)]
        width = 32
        for t, c, n, s in MOBILENET_V2_STAGES:
            for i in range(n):
                layers.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        layers.append(ConvBNReLU6(width, self.num_features, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = (
            nn.Sequential(nn.Dropout(0.2), nn.Linear(self.num_features, num_classes))
            if num_classes
            else nn.Identity()
        )
        self.weights_source = "random"
        for m in self.modules():  # torchvision's init, so random weights behave like its random weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 1280]`` globally average-pooled features."""
        return self.features(rgb(x, self.in_channels)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


class DenseLayer(nn.Module):
    """BN + ReLU + 1x1 conv (``bn_size * growth``), BN + ReLU + 3x3 conv (``growth``):
    ``[B, C, H, W] -> [B, growth, H, W]`` new features, which the block concatenates to its input."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each fed all earlier outputs: ``[B, C, H, W] -> [B, C + n * growth, H, W]``."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(in_channels + i * growth, growth, bn_size)
                for i in range(num_layers)
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """BN + ReLU + 1x1 conv + 2x2 average pool: ``[B, C, H, W] -> [B, C // 2, H / 2, W / 2]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                relu=nn.ReLU(),
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                pool=nn.AvgPool2d(2, stride=2),
            )
        )


class DenseNet169(nn.Module):
    """ImageNet DenseNet-169, torchvision's layout: ``conv0`` 7x7 conv 64 stride 2 + ``norm0`` BN + ReLU +
    3x3 max-pool stride 2; dense blocks of 6/12/32/32 layers (growth 32, bn_size 4) with a halving transition
    (BN + ReLU + 1x1 conv + 2x2 average pool) between blocks; ``norm5`` BN + ReLU; global average pool;
    ``classifier`` dense ``num_classes``.

    ``[B, C, 224, 224] -> [B, K]``; ``forward_features`` gives the pooled ``[B, 1664]``. Grad-CAM layer:
    ``features.norm5`` (the normalised last dense block output, 7x7 at 224x224).
    """

    cam_layer = "features.norm5"
    num_features = 1664

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        growth: int = 32,
        block_config: tuple[int, ...] = (6, 12, 32, 32),
        bn_size: int = 4,
        init_features: int = 64,
    ) -> None:
        super().__init__()
        check_in_channels(in_channels, "densenet169")
        self.in_channels = in_channels
        self.num_classes = num_classes
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, init_features, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(init_features),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        width = init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, width, growth, bn_size)
            width += num_layers * growth
            if i < len(block_config) - 1:
                layers[f"transition{i + 1}"] = Transition(width, width // 2)
                width //= 2
        layers["norm5"] = nn.BatchNorm2d(width)
        self.features = nn.Sequential(layers)
        self.relu5 = nn.ReLU()  # a module (not F.relu), so activation-module tools see it; no parameters
        self.classifier = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.weights_source = "random"
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 1664]`` globally average-pooled features."""
        # not in place: the Grad-CAM hook on norm5 must see its output unchanged
        return self.relu5(self.features(rgb(x, self.in_channels))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def hub_checkpoint_dirs() -> list[Path]:
    """Where torchvision caches downloads: ``$TORCH_HOME/hub/checkpoints``, then ``~/.cache/torch/hub/checkpoints``."""
    dirs = [
        Path(torch.hub.get_dir()) / "checkpoints",
        Path.home() / ".cache" / "torch" / "hub" / "checkpoints",
    ]
    return list(dict.fromkeys(dirs))


def missing_weights(filename: str, looked_for: list[Path]) -> CheckpointError:
    """The error for absent ImageNet weights: where we looked, where to get them, and how to do without."""
    return CheckpointError(
        f"ImageNet weights not found (looked for {', '.join(str(p) for p in looked_for)}). Download "
        f"{DOWNLOAD_URL.format(filename)} into {hub_checkpoint_dirs()[0]} or pass pretrained=<path to the file>; "
        "pretrained=False allows random init."
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A ``.safetensors`` or ``.pth`` state_dict, the latter loaded with ``weights_only=True`` (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    # a plain dict carries no version metadata, so BN fills in the num_batches_tracked old files lack
    return {OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


def missing_weights_file(option: str, given: str, path: Path, filename: str) -> CheckpointError:
    """The error for a weights path that was given and is not a file: which option, the value, what to pass."""
    looked = f" (looked for {path})" if str(path) != given else ""
    return CheckpointError(
        f"{option}={given!r}: no such weights file{looked}. Pass the path of a .safetensors or .pth state_dict "
        f"(an xailab run's model.safetensors, or torchvision's {filename} from {DOWNLOAD_URL.format(filename)}), "
        f"or {option}=False for random init."
    )


def load_imagenet_weights(
    model: MobileNetV2 | DenseNet169, pretrained: Pretrained, filename: str, option: str = "pretrained"
) -> None:
    """Load ``pretrained`` into ``model`` and set ``model.weights_source``.

    The backbone is checked strictly; the ImageNet classifier is loaded only when ``model`` has 1000 classes.
    ``option`` names the model option the value came from, for error messages.
    """
    if pretrained is False:
        model.weights_source = "random"
        return
    if pretrained == "auto":
        candidates = [d / filename for d in hub_checkpoint_dirs()]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            # offline: train from scratch rather than fail, and say so (the run's weights_source records it)
            warnings.warn(
                f"{type(model).__name__}: ImageNet weights {filename} not found (looked in "
                f"{', '.join(str(d) for d in hub_checkpoint_dirs())}); training from scratch (random init). "
                f"Download {DOWNLOAD_URL.format(filename)} there to use the ImageNet variant.",
                XailabWarning,
                stacklevel=3,
            )
            model.weights_source = "random (ImageNet weights absent)"
            return
        pretrained = found
    if pretrained is True:
        candidates = [d / filename for d in hub_checkpoint_dirs()]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise missing_weights(filename, candidates)
    else:
        if isinstance(pretrained, str) and pretrained.startswith(CELL_REFERENCE):
            raise ConfigError(
                f"{type(model).__name__}: weights {pretrained!r} name a study cell, which only a study's "
                "model_options can resolve; outside a study pass the path of that run's model.safetensors"
            )
        path = Path(pretrained)
        if path.is_dir():  # a folder of torchvision files serves both backbones of the ensemble
            path = path / filename
        if not path.is_file():
            raise missing_weights_file(option, str(pretrained), path, filename)
    state = read_state_dict(path)
    keep_classifier = model.num_classes == 1000
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise CheckpointError(f"weights {path} do not fit {type(model).__name__}: {e}") from e
    missing = [k for k in result.missing_keys if keep_classifier or not k.startswith("classifier.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"weights {path} do not fit {type(model).__name__}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    # an xailab run's weights (its config.json beside them) are not ImageNet's: say whose they are
    from_run = path.name == "model.safetensors" and (path.parent / "config.json").is_file()
    model.weights_source = f"xailab run:{path.parent}" if from_run else f"imagenet:{path}"


@register_model("mobilenetv2_imagenet", input_size=(224, 224))
def mobilenetv2_imagenet(
    in_channels: int = 3, num_classes: int = 1000, pretrained: Pretrained = True
) -> MobileNetV2:
    """ImageNet MobileNetV2 (torchvision-compatible weights), 224x224."""
    model = MobileNetV2(in_channels, num_classes)
    load_imagenet_weights(model, pretrained, MOBILENET_V2_FILE)
    return model


@register_model("densenet169", input_size=(224, 224))
def densenet169(in_channels: int = 3, num_classes: int = 1000, pretrained: Pretrained = True) -> DenseNet169:
    """ImageNet DenseNet-169 (torchvision-compatible weights), 224x224."""
    model = DenseNet169(in_channels, num_classes)
    load_imagenet_weights(model, pretrained, DENSENET169_FILE)
    return model


class TransferEnsemble(nn.Module):
    """Chest X-ray transfer ensemble: frozen ImageNet MobileNetV2 and DenseNet-169 feature extractors, globally
    average-pooled and concatenated (1280 + 1664 = 2944) -> BN -> dense 256 + ReLU -> dropout 0.5 -> BN ->
    dense 128 + ReLU -> dropout 0.5 -> output: ``num_classes`` logits (``head="softmax"``) or the seed's single
    sigmoid unit ``z`` (``head="sigmoid"``, two classes), returned as logits ``[0, z]`` so that
    ``softmax(logits)[:, 1] == sigmoid(z)`` and the ``[B, K]`` contract holds.

    ``[B, C, 224, 224] -> [B, K]``. Frozen backbones stay in eval mode (ImageNet BN statistics) in ``train()``.
    ``freeze``: True freezes the backbones, False trains them end to end; None (default) freezes them exactly
    when both hold pretrained weights, so an offline (random-init) ensemble learns its features.
    ``mobilenet_weights`` / ``densenet_weights``: that backbone's weights instead of ``pretrained``'s (same
    values), e.g. the ``model.safetensors`` of an xailab run that trained the member on the same task: the
    offline stand-in for the seed's frozen ImageNet features (in a study: ``"cell:mobilenetv2_imagenet"``).
    Grad-CAM layer: DenseNet-169's ``features.norm5`` (7x7), the last spatial map of the backbone that
    contributes most features (1664 of 2944); both backbones end at 7x7, and one layer must be chosen.
    Since the backbones are frozen, gradients reach that layer only when the input requires grad.
    """

    cam_layer = "densenet.features.norm5"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        head: str = "softmax",
        pretrained: Pretrained = True,
        freeze: bool | None = None,
        mobilenet_weights: Pretrained | None = None,
        densenet_weights: Pretrained | None = None,
    ) -> None:
        super().__init__()
        if head not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"transfer_ensemble: head={head!r} is invalid; valid heads: 'softmax', 'sigmoid'"
            )
        if head == "sigmoid" and num_classes != 2:
            raise ConfigError(
                f"transfer_ensemble: head='sigmoid' is a binary head; num_classes must be 2, got {num_classes}"
            )
        self.head_type = head
        self.mobilenet = MobileNetV2(in_channels, num_classes=0)
        self.densenet = DenseNet169(in_channels, num_classes=0)
        for backbone, own, option, filename in (
            (self.mobilenet, mobilenet_weights, "mobilenet_weights", MOBILENET_V2_FILE),
            (self.densenet, densenet_weights, "densenet_weights", DENSENET169_FILE),
        ):
            if own is None:
                load_imagenet_weights(backbone, pretrained, filename)
            else:
                load_imagenet_weights(backbone, own, filename, option)
        if freeze is None:
            freeze = not any(m.weights_source.startswith("random") for m in (self.mobilenet, self.densenet))
        self.frozen = freeze
        for p in [*self.mobilenet.parameters(), *self.densenet.parameters()]:
            p.requires_grad_(not freeze)
        self.weights_source = f"mobilenetv2_imagenet={self.mobilenet.weights_source}; densenet169={self.densenet.weights_source}"
        width = MobileNetV2.num_features + DenseNet169.num_features
        self.head = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.Linear(width, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.BatchNorm1d(256),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, 1 if head == "sigmoid" else num_classes),
        )
        self.train()  # modules start in train mode: this puts the backbones in eval mode from the start

    def train(self, mode: bool = True) -> TransferEnsemble:
        super().train(mode)
        if self.frozen:
            # frozen feature extractors keep their ImageNet BN statistics instead of drifting to the batch's
            self.mobilenet.eval()
            self.densenet.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        features = torch.cat([self.mobilenet.forward_features(x), self.densenet.forward_features(x)], dim=1)
        out = self.head(features)
        if self.head_type == "sigmoid":
            return torch.cat([torch.zeros_like(out), out], dim=1)
        return out


@register_model("transfer_ensemble", input_size=(224, 224))
def transfer_ensemble(
    in_channels: int = 3,
    num_classes: int = 2,
    head: str = "softmax",
    pretrained: Pretrained = True,
    freeze: bool | None = None,
    mobilenet_weights: Pretrained | None = None,
    densenet_weights: Pretrained | None = None,
) -> TransferEnsemble:
    """MobileNetV2 + DenseNet-169 features -> dense head (chest X-ray seed), 224x224; backbones frozen when
    pretrained (per backbone: ``mobilenet_weights``, ``densenet_weights``)."""
    return TransferEnsemble(
        in_channels, num_classes, head, pretrained, freeze, mobilenet_weights, densenet_weights
    )
