"""The explanation contract, for every registered method on every model of the zoo: ``[B, 1, H, W]`` float32
finite and repeatable maps, the model's modes and ``requires_grad`` flags restored, no hook left behind (also
when the model raises), no tensors piling up over repeated calls, and helpful errors for unknown names."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
from torch import Tensor, nn

from conftest import TinyCNN as SharedTinyCNN
from conftest import hooks_left
from xailab.errors import ConfigError, UnknownNameError
from xailab.explain import applicable_methods, explain, list_methods
from xailab.models import MODELS, create_model, list_models, model_input_size

NUM_CLASSES = 5
# keep the many-copies methods cheap: the contract does not depend on how many copies they average
CHEAP = {
    "occlusion": {"window": 8, "stride": 8},
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 16},
    "lime": {"n_samples": 16, "segments": "grid"},
    "kernel_shap": {"n_samples": 16, "segments": "grid"},
    "rise": {"n_masks": 16},
    "smooth_gradcam_plus_plus": {"n_samples": 2},
    "ss_cam": {"n_samples": 1},
    "is_cam": {"n_samples": 1},
}
# on 224x224 models only the two fundamental methods run, one image at a time
LARGE_METHODS = ("saliency", "gradcam")
# Score-CAM (and SS-/IS-CAM, per sample) runs one forward pass per channel of the layer (up to 1280 here):
# one image, one call (repeatability is checked on small models in test_explain_cam{,_variants})
PER_CHANNEL_METHODS = ("score_cam", "ss_cam", "is_cam")


pytestmark = pytest.mark.usefixtures("single_thread")


def is_large(name: str) -> bool:
    return model_input_size(name)[0] > 64


def build(name: str, in_channels: int = 3, size: int | None = None) -> nn.Module:
    """A randomly initialised zoo model (no ImageNet files needed) for ``size`` x ``size`` inputs."""
    options = {}
    parameters = inspect.signature(MODELS.get(name).factory).parameters
    if "pretrained" in parameters:
        options["pretrained"] = False
    if "image_size" in parameters and size is not None:
        options["image_size"] = size
    torch.manual_seed(0)
    return create_model(name, in_channels, NUM_CLASSES, **options)


def cases() -> list[tuple[str, str]]:
    return [
        (model, method)
        for model in list_models()
        for method in list_methods()
        if not is_large(model) or method in LARGE_METHODS
    ]


def state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    """Every module's training flag and every parameter's ``requires_grad``."""
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    return modes, flags


def live_tensors() -> int:
    gc.collect()
    # type() rather than isinstance: some lazily deprecated torch objects warn when asked for __class__
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor))


@pytest.mark.parametrize(("model_name", "method"), cases())
def test_contract(model_name, method):
    height, width = model_input_size(model_name)
    channels = 1 if model_name == "mnist_cnn" else 3
    model = build(model_name, channels)
    batch = 1 if is_large(model_name) or method in PER_CHANNEL_METHODS else 2
    inputs = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    target = torch.arange(batch) % NUM_CLASSES
    model.train()
    first = next(model.parameters())
    first.requires_grad_(not first.requires_grad)  # a mix of flags to restore, not all True
    before = state(model)
    params = CHEAP.get(method, {})
    if method not in applicable_methods(model):  # e.g. a transformer method of a CNN: a clear refusal
        with pytest.raises(ConfigError, match="methods that apply to it"):
            explain(model, inputs, method, target, **params)
        assert state(model) == before and hooks_left(model) == []
        return

    maps = explain(model, inputs, method, target, **params)

    assert maps.shape == (batch, 1, height, width)
    assert maps.dtype == torch.float32
    assert maps.device == inputs.device
    assert torch.isfinite(maps).all()
    assert not maps.requires_grad
    assert state(model) == before
    assert hooks_left(model) == []
    if method not in PER_CHANNEL_METHODS:
        torch.testing.assert_close(explain(model, inputs, method, target, **params), maps, rtol=0, atol=0)


class TinyCNN(SharedTinyCNN):
    """The tests' tiny CNN (conftest.py) with ``NUM_CLASSES`` outputs, on 8x8 images here."""

    def __init__(self, in_channels: int = 3, explode: bool = False) -> None:
        super().__init__(in_channels, NUM_CLASSES, explode=explode)


class TinyCNNWithoutCamLayer(TinyCNN):
    """The same without ``cam_layer``: the class activation maps find their layer with a forward pass."""

    cam_layer = None


# the methods that apply to a CNN (transformer methods refuse it: tested in test_contract)
CNN_METHODS = applicable_methods(TinyCNN())


@pytest.mark.parametrize("model_class", [TinyCNN, TinyCNNWithoutCamLayer])
@pytest.mark.parametrize("method", CNN_METHODS)
def test_state_is_restored_and_no_hook_survives_an_exception(model_class, method):
    model = model_class(explode=True)
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = state(model)
    with pytest.raises(RuntimeError, match="exploded in forward"):
        explain(model, torch.randn(2, 3, 8, 8), method, target=1, **CHEAP.get(method, {}))
    assert state(model) == before
    assert hooks_left(model) == []


@pytest.mark.parametrize("method", CNN_METHODS)
def test_no_tensors_pile_up_over_repeated_calls(method):
    torch.manual_seed(0)
    model = TinyCNN()
    inputs = torch.randn(2, 3, 8, 8)
    params = CHEAP.get(method, {})
    explain(model, inputs, method, **params)  # first call: lazily created state (e.g. kernels) may stay
    before = live_tensors()
    for _ in range(50):
        explain(model, inputs, method, **params)
    assert live_tensors() <= before


@pytest.mark.parametrize("model_name", [name for name in list_models() if not is_large(name)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam"])
def test_gray_and_color_inputs_at_28_and_32(model_name, channels, size, method):
    model = build(model_name, channels, size)
    inputs = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    maps = explain(model, inputs, method, **CHEAP.get(method, {}))
    assert maps.shape == (2, 1, size, size)
    assert torch.isfinite(maps).all()
    if method != "gradcam":  # a ReLU'd class activation map may legitimately be all zero
        assert maps.abs().sum() > 0


@pytest.mark.parametrize("method", CNN_METHODS)
def test_reduce_none_returns_a_per_channel_map_or_a_single_one(method):
    model = TinyCNN()
    inputs = torch.randn(2, 3, 8, 8)
    maps = explain(model, inputs, method, target=0, reduce=None, **CHEAP.get(method, {}))
    assert maps.shape[0] == 2 and maps.shape[1] in (1, 3) and maps.shape[2:] == (8, 8)


def test_unknown_method_suggests_the_nearest_name():
    with pytest.raises(UnknownNameError, match="'gradcam'") as error:
        explain(TinyCNN(), torch.randn(1, 3, 8, 8), "gradcan")
    assert "Did you mean" in str(error.value)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam"])
def test_bf16_precision_gives_float32_maps_close_in_rank_and_restores_the_model(method):
    torch.manual_seed(0)
    model = create_model("mnist_cnn", in_channels=1, num_classes=NUM_CLASSES)
    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    exact = explain(model, inputs, method, **CHEAP.get(method, {}))
    fast = explain(model, inputs, method, precision="bf16", **CHEAP.get(method, {}))
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert "forward" not in vars(model)
    # bf16 keeps 8 bits of mantissa: the maps keep their ordering (measured 0.96-1.0 on a random model, closer
    # on trained ones) though not their last digits
    assert min(spearman(exact[i], fast[i]) for i in range(4)) > 0.9
    assert not torch.equal(exact, fast) or method == "gradcam"


def test_bf16_precision_restores_forward_after_an_exception_and_rejects_unknown_precisions():
    model = TinyCNN(explode=True)
    with pytest.raises(RuntimeError, match="exploded in forward"):
        explain(model, torch.randn(2, 3, 8, 8), "saliency", target=1, precision="bf16")
    assert "forward" not in vars(model)
    with pytest.raises(ConfigError, match="precision='fp16'"):
        explain(TinyCNN(), torch.randn(1, 3, 8, 8), "saliency", precision="fp16")


def spearman(a: Tensor, b: Tensor) -> float:
    ranks = [t.flatten().argsort().argsort().double() for t in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])
