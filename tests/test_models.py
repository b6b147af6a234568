"""Every registered model: output shapes, gradients, determinism, Grad-CAM layer, and sizes checked against
parameter and MAC counts computed here by hand from the architecture tables."""

from __future__ import annotations

import inspect
import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from xailab.errors import ConfigError
from xailab.explain.tokens import token_grid
from xailab.models import (
    MODELS,
    count_macs,
    count_parameters,
    create_model,
    list_models,
    model_input_size,
    model_table,
)

NUM_CLASSES = 7


def build(name: str, in_channels: int = 3, num_classes: int = NUM_CLASSES, **options) -> nn.Module:
    """``create_model`` with random weights for the models that would otherwise look for ImageNet files."""
    if "pretrained" in inspect.signature(MODELS.get(name).factory).parameters:
        options.setdefault("pretrained", False)
    torch.manual_seed(0)
    return create_model(name, in_channels, num_classes, **options)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def zoo():
    """Models built once per (name, in_channels): the 224x224 ones take a while to construct."""
    cache: dict[tuple[str, int], nn.Module] = {}

    def get(name: str, in_channels: int = 3) -> nn.Module:
        if (name, in_channels) not in cache:
            cache[name, in_channels] = build(name, in_channels)
        return cache[name, in_channels]

    return get


def is_large(name: str) -> bool:
    return max(model_input_size(name)) > 32


def test_sizes(name: str) -> list[tuple[int, int]]:
    """The default input size, plus 28x28 and 32x32 for the small models."""
    sizes = [model_input_size(name)]
    return sizes if is_large(name) else sorted({*sizes, (28, 28), (32, 32)})


test_sizes.__test__ = False  # a helper, not a test


def cam_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, output of model.cam_layer)`` of one no-grad forward."""
    captured = []
    handle = model.get_submodule(model.cam_layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return logits, captured[0]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_output_shape_and_cam_layer(zoo, name: str, in_channels: int) -> None:
    model = zoo(name, in_channels).eval()
    batch = 1 if is_large(name) else 2  # 224x224 forwards are slow on CPU
    for size in test_sizes(name):
        if name == "keras_cnn" and size != (32, 32):
            continue  # its dense layer is sized for image_size; other sizes are tested below
        x = torch.randn(batch, in_channels, *size)
        out, cam = cam_output(model, x)
        assert out.shape == (batch, NUM_CLASSES), (name, size)
        assert out.dtype == torch.float32
        if size == model_input_size(name):
            grid = token_grid(model, x)  # a ViT's cam_layer outputs tokens: their declared patch grid
            if grid is not None:
                assert grid.fits(cam), (model.cam_layer, cam.shape)
                cam = grid.to_grid(cam)
            assert cam.ndim == 4 and min(cam.shape[-2:]) > 1, (model.cam_layer, cam.shape)


# ImageNet backbones run at 32x32 too (final map 1x1): enough for gradients and determinism, and far faster
def small_size(name: str) -> tuple[int, int]:
    return (32, 32) if is_large(name) else model_input_size(name)


@pytest.mark.parametrize("name", list_models())
def test_gradients_are_finite(zoo, name: str) -> None:
    model = zoo(name).train()
    model.zero_grad()
    out = model(torch.randn(2, 3, *small_size(name)))
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n  # frozen backbone parameters
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_eval_is_deterministic(zoo, name: str) -> None:
    model = zoo(name).eval()
    x = torch.randn(2, 3, *small_size(name))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# ---- parameter counts by hand (no conv bias before BN; biases where a ReLU or nothing follows) ----


def conv(k: int, cin: int, cout: int, groups: int = 1, bias: bool = False) -> int:
    return k * k * cin // groups * cout + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def dense(i: int, o: int) -> int:
    return i * o + o


def mobilenetv2_params(c: int, k: int) -> int:
    n = conv(3, c, 32) + bn(32)
    for cin, cout, _, t in [
        (32, 16, 1, 1),
        (16, 24, 2, 6),
        (24, 24, 1, 6),
        (24, 32, 2, 6),
        (32, 32, 1, 6),
        (32, 64, 2, 6),
        (64, 64, 1, 6),
    ]:
        h = cin * t
        n += conv(1, cin, h) + bn(h) if t != 1 else 0
        n += conv(3, h, h, groups=h) + bn(h) + conv(1, h, cout) + bn(cout)
    return n + conv(1, 64, 1280) + bn(1280) + dense(1280, 128) + dense(128, k)


def efficient_cnn_params(c: int, k: int) -> int:
    n = sum(conv(ks, c, 32, bias=True) for ks in (1, 3, 5, 1)) + bn(128)
    for cin, cout in pairwise([128, 64, 128, 256, 512]):
        n += conv(3, cin, cin, groups=cin) + bn(cin) + conv(1, cin, cout) + bn(cout)
    return n + dense(512, 256) + dense(256, k)


def resnet18_params(c: int, k: int) -> int:
    n = conv(3, c, 64) + bn(64)
    for cin, cout, stride in [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
        n += conv(3, cin, cout) + bn(cout) + 3 * (conv(3, cout, cout) + bn(cout))
        n += conv(1, cin, cout) + bn(cout) if stride != 1 or cin != cout else 0
    return n + dense(512, k)


def vgg_params(c: int, k: int, blocks: list[tuple[int, int]], hidden: int) -> int:
    n = 0
    for width, convs in blocks:
        for _ in range(convs):
            n += conv(3, c, width) + bn(width)
            c = width
    return n + dense(c, hidden) + dense(hidden, k)


def keras_side(image: int, kernel: int, stride: int) -> int:
    """Side of the map after both valid convs and 2x2 max-pools."""
    for _ in range(2):
        image = ((image - kernel) // stride + 1) // 2
    return image


def keras_params(c: int, k: int, kernel: int = 3, stride: int = 1, image: int = 32) -> int:
    n = conv(kernel, c, 32, bias=True) + bn(32) + conv(kernel, 32, 64, bias=True) + bn(64)
    return n + dense(64 * keras_side(image, kernel, stride) ** 2, k)


def vit_params(c: int, k: int, width: int = 192, depth: int = 12, patch: int = 4, image: int = 32) -> int:
    """Patch projection, class token, position embeddings (one per patch + class token), per block two
    LayerNorms + qkv + output projection + a 4x MLP, final LayerNorm, head."""
    tokens = 1 + (image // patch) ** 2
    n = dense(c * patch * patch, width) + width + tokens * width
    block = 2 * 2 * width + dense(width, 3 * width) + dense(width, width)
    block += dense(width, 4 * width) + dense(4 * width, width)
    return n + depth * block + 2 * width + dense(width, k)


EXPECTED_PARAMS = {
    "mobilenetv2": mobilenetv2_params,
    "efficient_cnn": efficient_cnn_params,
    "resnet18": resnet18_params,
    "simple_cnn": lambda c, k: vgg_params(c, k, [(64, 2), (128, 2), (256, 3)], 512),
    "mnist_cnn": lambda c, k: vgg_params(c, k, [(32, 2), (64, 2), (128, 2)], 256),
    "keras_cnn": keras_params,
    "vit_tiny": vit_params,
}


@pytest.mark.parametrize("in_channels, num_classes", [(3, 10), (1, 7)])
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_matches_layer_table(name: str, in_channels: int, num_classes: int) -> None:
    model = build(name, in_channels, num_classes)
    assert count_parameters(model) == EXPECTED_PARAMS[name](in_channels, num_classes)


def test_every_small_model_has_a_parameter_formula() -> None:
    assert {n for n in list_models() if not is_large(n)} == set(EXPECTED_PARAMS)


def test_resnet18_parameter_count() -> None:
    assert resnet18_params(3, 10) == 11_173_962
    assert count_parameters(build("resnet18", 3, 10)) == 11_173_962


def test_frozen_parameters_are_not_trainable() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 16 + 10
    assert count_parameters(model, trainable_only=True) == 10


# ---- MACs by hand: k*k*cin/groups*cout per output pixel for convs, in*out for dense layers ----


def test_count_macs_of_one_conv_and_a_dense_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    assert count_macs(model, (10, 10)) == 3 * 3 * 3 * 8 * 10 * 10 + 800 * 5


def test_count_macs_of_resnet18() -> None:
    side = 32
    macs = conv(3, 3, 64) * side**2
    side //= 2  # max-pool
    for cin, cout, stride in [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
        side //= stride
        macs += (conv(3, cin, cout) + 3 * conv(3, cout, cout)) * side**2
        macs += conv(1, cin, cout) * side**2 if stride != 1 or cin != cout else 0
    macs += 512 * 10
    model = build("resnet18", 3, 10).train()
    assert count_macs(model, (32, 32)) == macs
    assert model.training  # the mode is restored


def test_model_table_lists_every_model() -> None:
    rows = model_table()
    assert [r["name"] for r in rows] == list_models()
    for row in rows:
        assert row["input_size"] == model_input_size(row["name"])
        assert 0 < row["trainable"] <= row["params"] and row["macs"] > 0
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet18"]["params"] == 11_173_962


# ---- keras_cnn options ----

KERAS_SETTINGS = [(s, k) for s in (1, 2, 3) for k in (3, 4)]


@pytest.mark.parametrize("stride, kernel_size", KERAS_SETTINGS)
def test_keras_cnn_settings(stride: int, kernel_size: int) -> None:
    # at 32x32, stride 3 leaves a 1x1 map before the second pool (10 -> 5 -> 1), as in Keras; 64x64 fits
    image = 64 if stride == 3 else 32
    model = build("keras_cnn", 3, 10, stride=stride, kernel_size=kernel_size, image_size=image)
    assert count_parameters(model) == keras_params(3, 10, kernel_size, stride, image)
    out, cam = cam_output(model, torch.randn(2, 3, image, image))
    assert out.shape == (2, 10)
    assert min(cam.shape[-2:]) > 1


@pytest.mark.parametrize("stride, kernel_size", KERAS_SETTINGS)
def test_keras_cnn_same_padding_follows_tensorflow(stride: int, kernel_size: int) -> None:
    # TensorFlow 'same': each conv outputs ceil(size / stride); every stride fits CIFAR's 32x32.
    side = math.ceil(math.ceil(32 / stride) // 2 / stride) // 2
    model = build("keras_cnn", 3, 10, stride=stride, kernel_size=kernel_size, padding="same")
    assert model.classifier[1].in_features == 64 * side * side
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    _, cam = cam_output(model, torch.randn(2, 3, 32, 32))
    assert min(cam.shape[-2:]) > 1


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_keras_cnn_rejects_maps_too_small_to_pool(kernel_size: int) -> None:
    with pytest.raises(ConfigError, match="max-pool"):
        build("keras_cnn", stride=3, kernel_size=kernel_size)


@pytest.mark.parametrize(
    "options, listed",
    [
        ({"stride": 4}, "(1, 2, 3)"),
        ({"kernel_size": 5}, "(3, 4)"),
        ({"weight_decay": -1.0}, ">= 0"),
        ({"padding": "full"}, "same"),
    ],
)
def test_keras_cnn_rejects_bad_options(options: dict, listed: str) -> None:
    with pytest.raises(ConfigError) as error:
        build("keras_cnn", **options)
    assert listed in str(error.value)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ConfigError, match="stride"):
        build("resnet18", stride=2)


@pytest.mark.parametrize("weight_decay", [None, 0.01])
def test_keras_cnn_regularization_loss(weight_decay: float | None) -> None:
    options = {} if weight_decay is None else {"weight_decay": weight_decay}
    model = build("keras_cnn", **options)
    l2 = 1e-4 if weight_decay is None else weight_decay  # the seed gives no L2 factor: 1e-4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    expected = l2 * sum((m.weight**2).sum() for m in convs)
    loss = model.regularization_loss()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(convs[0].weight.grad, 2 * l2 * convs[0].weight)
