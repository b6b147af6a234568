"""Gradient attributions: parity with Captum on zoo models, and known answers on hand-built models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

from conftest import LinearModel
from xailab.errors import ConfigError
from xailab.explain import explain
from xailab.explain.base import model_capabilities
from xailab.explain.batching import default_batch_size, gaussian_blur
from xailab.explain.gradients import (
    IG_METHODS,
    deconvnet,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    integrated_gradients_delta,
    relu_module_coverage,
    saliency,
    smoothgrad,
    target_gradients,
)
from xailab.models import create_model

NUM_CLASSES = 10
# Captum warns that it sets requires_grad on the inputs it is given; that is what it is asked to do here
pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
    pytest.mark.usefixtures("single_thread"),
]


def zoo_model(name: str, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, in_channels, NUM_CLASSES).eval()


@pytest.fixture(scope="module", params=[("mnist_cnn", 1, 28), ("simple_cnn", 3, 32)], ids=lambda p: p[0])
def case(request) -> tuple[nn.Module, Tensor, Tensor]:
    """A zoo model in eval mode, 2 random images and their targets."""
    name, channels, size = request.param
    model = zoo_model(name, channels)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, channels, size, size, generator=generator)
    return model, inputs, torch.tensor([3, 7])


def assert_parity(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    """Close up to ``rtol`` of the largest value: random-init models give small gradients, so a fixed
    absolute tolerance would make the comparison vacuous."""
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


class HalfSquare(nn.Module):
    """Logit 0 is ``sum(x^2) / 2``, so the gradient is ``x`` itself; logit 1 is zero."""

    def forward(self, x: Tensor) -> Tensor:
        half_square = 0.5 * x.pow(2).sum(dim=(1, 2, 3))
        return torch.stack([half_square, torch.zeros_like(half_square)], dim=1)


# ---------------------------------------------------------------- parity with Captum


def test_saliency_matches_captum(case):
    model, inputs, target = case
    expected = Saliency(model).attribute(inputs, target=target, abs=True)
    assert_parity(explain(model, inputs, "saliency", target, reduce=None), expected)
    assert_parity(explain(model, inputs, "saliency", target), expected.amax(dim=1, keepdim=True))
    signed = Saliency(model).attribute(inputs, target=target, abs=False)
    assert_parity(saliency(model, inputs, target, abs=False), signed)


def test_input_x_gradient_matches_captum(case):
    model, inputs, target = case
    expected = InputXGradient(model).attribute(inputs, target=target)
    assert_parity(explain(model, inputs, "input_x_gradient", target, reduce=None), expected)
    assert_parity(explain(model, inputs, "input_x_gradient", target), expected.sum(dim=1, keepdim=True))


@pytest.mark.parametrize("method", IG_METHODS)
@pytest.mark.parametrize("n_steps", [4, 13])
def test_integrated_gradients_matches_captum_on_mnist_cnn(method, n_steps):
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 2, 9])
    expected = IntegratedGradients(model).attribute(inputs, target=target, n_steps=n_steps, method=method)
    if method == "riemann_trapezoid":
        # Captum weighs its points 1/n, not their spacing 1/(n - 1): its weights sum to (n - 1) / n
        expected = expected * n_steps / (n_steps - 1)
    # a chunk size that splits the path points of one step over two chunks
    actual = integrated_gradients(
        model, inputs, target, n_steps=n_steps, method=method, internal_batch_size=5
    )
    assert_parity(actual, expected)


def test_integrated_gradients_matches_captum(case):
    model, inputs, target = case
    expected = IntegratedGradients(model).attribute(inputs, target=target, baselines=0.0, n_steps=6)
    assert_parity(explain(model, inputs, "integrated_gradients", target, reduce=None, n_steps=6), expected)
    summed = explain(model, inputs, "integrated_gradients", target, n_steps=6)
    assert_parity(summed, expected.sum(dim=1, keepdim=True))


def test_integrated_gradients_defaults_are_captums():
    """50 Gauss-Legendre steps from a zero baseline."""
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    target = torch.tensor([2, 6])
    expected = IntegratedGradients(model).attribute(inputs, target=target)
    assert_parity(integrated_gradients(model, inputs, target), expected)


def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(case):
    model, inputs, target = case
    n_samples, stdev = 6, 0.3
    # NoiseTunnel draws torch.normal(0, stdev) for the inputs repeated image by image (repeat_interleave)
    torch.manual_seed(123)
    draw = torch.normal(0, torch.full((inputs.shape[0] * n_samples, *inputs.shape[1:]), stdev))
    noise = draw.view(inputs.shape[0], n_samples, *inputs.shape[1:]).transpose(0, 1)
    torch.manual_seed(123)
    expected = NoiseTunnel(Saliency(model)).attribute(
        inputs, nt_type="smoothgrad", nt_samples=n_samples, stdevs=stdev, target=target, abs=True
    )
    assert_parity(explain(model, inputs, "smoothgrad", target, reduce=None, noise=noise), expected)
    assert_parity(
        explain(model, inputs, "smoothgrad", target, noise=noise, internal_batch_size=4),
        expected.amax(dim=1, keepdim=True),
    )


def test_smoothgrad_wraps_integrated_gradients():
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([4, 5])
    noise = 0.2 * torch.randn(3, *inputs.shape, generator=torch.Generator().manual_seed(4))
    expected = torch.stack([integrated_gradients(model, inputs + n, target, n_steps=5) for n in noise]).mean(
        0
    )
    actual = smoothgrad(
        model, inputs, target, base="integrated_gradients", noise=noise, n_steps=5, internal_batch_size=4
    )
    assert_parity(actual, expected)


# ---------------------------------------------------------------- known answers


def test_saliency_of_a_linear_model_is_its_weight_row():
    model = LinearModel((2, 4, 4)).eval()
    inputs = torch.randn(2, 2, 4, 4)
    target = torch.tensor([2, 0])
    expected = model.fc.weight[target].detach().abs().view(2, 2, 4, 4)
    torch.testing.assert_close(saliency(model, inputs, target), expected)
    torch.testing.assert_close(explain(model, inputs, "saliency", target), expected.amax(1, keepdim=True))


def test_input_x_gradient_of_a_linear_model():
    model = LinearModel((2, 4, 4)).eval()
    inputs = torch.randn(2, 2, 4, 4)
    target = torch.tensor([1, 1])
    weights = model.fc.weight[target].detach().view(2, 2, 4, 4)
    torch.testing.assert_close(input_x_gradient(model, inputs, target), inputs * weights)


@pytest.mark.parametrize("method", IG_METHODS)
@pytest.mark.parametrize("baseline", ["zero", "mean", "blur", "tensor"])
def test_integrated_gradients_of_a_linear_model_is_exact(method, baseline):
    model = LinearModel((3, 5, 5)).eval()
    inputs = torch.randn(2, 3, 5, 5)
    target = torch.tensor([0, 2])
    reference = {
        "zero": torch.zeros_like(inputs),
        "mean": inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs),
        "blur": gaussian_blur(inputs, 1.0),
        "tensor": torch.full((3, 5, 5), 0.5),
    }[baseline]
    spec = reference if baseline == "tensor" else baseline
    attributions = integrated_gradients(model, inputs, target, spec, n_steps=7, method=method, blur_sigma=1.0)
    weights = model.fc.weight[target].detach().view(2, 3, 5, 5)
    torch.testing.assert_close(attributions, (inputs - reference) * weights)
    delta = integrated_gradients_delta(model, inputs, target, attributions, spec, blur_sigma=1.0)
    torch.testing.assert_close(delta, torch.zeros(2), atol=1e-5, rtol=0)


def test_integrated_gradients_completeness_within_one_percent_on_a_cnn():
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([3, 8])
    attributions = integrated_gradients(model, inputs, target, n_steps=64, method="gausslegendre")
    delta = integrated_gradients_delta(model, inputs, target, attributions, "zero")
    with torch.no_grad():
        logits = model(torch.cat([inputs, torch.zeros_like(inputs)]))
    change = logits[:2].gather(1, target[:, None]).squeeze(1) - logits[2:].gather(1, target[:, None]).squeeze(
        1
    )
    assert (change.abs() > 0).all()
    assert (delta.abs() <= 0.01 * change.abs()).all(), (delta, change)
    # the reduced map keeps completeness: channels are summed
    summed = explain(model, inputs, "integrated_gradients", target, n_steps=64)
    torch.testing.assert_close(
        summed.sum(dim=(1, 2, 3)), attributions.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6
    )


def test_smoothgrad_with_zero_noise_is_saliency(case):
    model, inputs, target = case
    actual = explain(model, inputs, "smoothgrad", target, noise_level=0.0, n_samples=3)
    assert_parity(actual, explain(model, inputs, "saliency", target), rtol=1e-5)


def test_smoothgrad_noise_has_the_papers_scale():
    """Input x gradient of ``sum(x^2)/2`` at ``x + n`` is ``(x + n)^2``, whose mean over the samples is
    ``sigma^2`` where ``x = 0``; sigma is ``noise_level`` times the image's range (here 1)."""
    inputs = torch.zeros(2, 1, 8, 8)
    inputs[:, :, 0, 0] = 1.0
    maps = smoothgrad(
        HalfSquare(),
        inputs,
        torch.zeros(2, dtype=torch.long),
        base="input_x_gradient",
        n_samples=400,
        noise_level=0.2,
    )
    assert maps[:, :, 1:].mean().item() == pytest.approx(0.2**2, rel=0.03)


def test_smoothgrad_is_seeded_and_repeatable():
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1])
    first = smoothgrad(model, inputs, target, n_samples=5, seed=7)
    torch.testing.assert_close(smoothgrad(model, inputs, target, n_samples=5, seed=7), first, rtol=0, atol=0)
    assert not torch.equal(smoothgrad(model, inputs, target, n_samples=5, seed=8), first)


def test_gaussian_blur_matches_scipy():
    image = torch.randn(1, 2, 9, 11, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # same kernel radius (3 sigma, edges replicated) as scipy's truncate=3, mode="nearest"
    expected = np.stack(
        [gaussian_filter(channel, 2.0, mode="nearest", truncate=3.0) for channel in image[0].numpy()]
    )
    torch.testing.assert_close(gaussian_blur(image, 2.0)[0], torch.from_numpy(expected))


def test_gradients_are_computed_under_no_grad():
    model = zoo_model("mnist_cnn", 1)
    inputs = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        maps = explain(model, inputs, "saliency", 0)
    assert maps.abs().sum() > 0


def test_default_batch_size_scales_with_pixels_and_is_smaller_without_the_accelerator():
    assert default_batch_size(torch.empty(1, 3, 28, 28), grad=True) == 256
    assert default_batch_size(torch.empty(1, 3, 64, 64), grad=True) == 256
    assert default_batch_size(torch.empty(1, 3, 224, 224), grad=True) == 20
    assert default_batch_size(torch.empty(1, 3, 32, 32), grad=False) == 128
    assert default_batch_size(torch.empty(1, 3, 224, 224), grad=False) == 2
    meta = torch.empty(1, 3, 224, 224, device="meta")  # any non-CPU device counts as an accelerator
    assert default_batch_size(meta, grad=False) == 41
    assert default_batch_size(meta, grad=True) == 41


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"baseline": "noise"}, "unknown baseline 'noise'"),
        ({"method": "simpson"}, "unknown integration method 'simpson'"),
        ({"method": "riemann_left", "n_steps": 1}, "n_steps=1"),
    ],
)
def test_integrated_gradients_rejects_bad_params(params, message):
    model = LinearModel((1, 2, 2))
    with pytest.raises(ConfigError, match=message):
        integrated_gradients(model, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), **params)


def test_smoothgrad_rejects_an_unknown_base():
    with pytest.raises(ConfigError, match="unknown SmoothGrad base 'gradcam'"):
        smoothgrad(
            LinearModel((1, 2, 2)), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), base="gradcam"
        )


@pytest.mark.parametrize("base", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_smoothgrad_reduces_channels_as_its_base(base):
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    params = {"n_steps": 8} if base == "integrated_gradients" else {}
    smooth = explain(model, x, "smoothgrad", target=3, base=base, noise_level=0.0, n_samples=2, **params)
    plain = explain(model, x, base, target=3, **params)
    torch.testing.assert_close(smooth, plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- copies stored as the caller's inputs are


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_path_points_and_noisy_copies_reach_the_model_in_the_inputs_layout(case, method):
    """Interpolated / noisy copies of channels_last inputs (as xailab's data pipeline stores them) reach the
    model channels_last, as Captum's do; NCHW inputs give NCHW copies; the maps agree up to float rounding."""
    model, inputs, target = case
    seen: list[bool] = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x: Tensor) -> Tensor:
            seen.append(x.stride(1) == 1)
            return self.model(x)

    params = {"n_samples": 6} if method == "smoothgrad" else {"n_steps": 6}
    maps = {}
    for name, x in (("nchw", inputs), ("nhwc", inputs.clone(memory_format=torch.channels_last))):
        seen.clear()
        maps[name] = explain(Recorder(), x, method, target=target, internal_batch_size=4, **params)
        assert len(seen) == 3 and all(s == (name == "nhwc") for s in seen)
    # Rounding differs between the two layouts' convolution kernels; a copy lying near a ReLU kink can then take
    # the other side (one noisy copy in 12 on mnist_cnn moves its gradient by 3% of the map's maximum)
    assert_parity(maps["nhwc"], maps["nchw"], rtol=5e-2)
    if method == "integrated_gradients":  # Captum's path points keep the inputs' layout too: the same kernels
        nhwc = inputs.clone(memory_format=torch.channels_last)
        expected = IntegratedGradients(model).attribute(
            nhwc, target=target, n_steps=6, method="gausslegendre"
        )
        assert_parity(maps["nhwc"], expected.sum(1, keepdim=True))


# ---------------------------------------------------------------- guided backprop and deconvnet


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [("mnist_cnn", 1, 28), ("resnet18", 3, 32), ("keras_cnn", 3, 32), ("efficient_cnn", 3, 32)],
)
def test_guided_backprop_and_deconvnet_match_captum_on_relu_module_networks(name, channels, size):
    # every ReLU of these is an nn.ReLU module, which is all Captum's hooks see
    model = zoo_model(name, channels)
    inputs = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    relus, modules, others = relu_module_coverage(model, inputs)
    assert relus == modules > 0 and not others
    guided = guided_backprop(model, inputs, target)
    assert_parity(guided, GuidedBackprop(model).attribute(inputs, target=target), rtol=1e-6)
    assert_parity(
        deconvnet(model, inputs, target), Deconvolution(model).attribute(inputs, target=target), rtol=1e-6
    )
    assert not torch.allclose(guided, target_gradients(model, inputs, target))  # the rule changed something


class TwoLayer(nn.Module):
    """``x [B, 1, 1, 2] -> h = act(W1 x) [B, 3] -> W2 h [B, 2]`` with hand-picked weights: every unit of h
    in a known regime (below 0, between 0 and 6, above 6) and logit 0 reading them with mixed signs."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, (1, 2), bias=False)  # W1: one 1x2 kernel per hidden unit
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0], [4.0, 4.0]]).reshape(3, 1, 1, 2))
            self.head.weight.copy_(torch.tensor([[-2.0, 3.0, 5.0], [1.0, 1.0, 1.0]]))
        self.activation = activation
        self.relu6 = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).flatten(1)
        h = (
            self.relu6(h) if self.activation == "relu6" else torch.nn.functional.relu(h)
        )  # functional on purpose
        return self.head(h)


@pytest.mark.parametrize("activation", ["relu6", "functional_relu"])
def test_guided_backprop_and_deconvnet_known_answers(activation):
    model = TwoLayer(activation).eval()
    x = torch.tensor([1.0, 0.5]).reshape(1, 1, 1, 2)  # h_pre = (2, -0.5, 6)
    w1 = model.conv.weight.reshape(3, 2)
    w2 = model.head.weight[0]  # (-2, 3, 5)
    upper = 6.0 if activation == "relu6" else float("inf")
    pre = w1 @ x.reshape(2)
    live = ((pre > 0) & (pre < upper)).float()  # relu6: only unit 0 (2); relu: units 0 and 2 (2 and 6)
    plain = (w2 * live) @ w1
    guided = (w2.clamp(min=0) * live) @ w1  # negative w2 entries blocked on the way back
    deconv = w2.clamp(min=0) @ w1  # the forward regime ignored
    target = torch.tensor([0])
    torch.testing.assert_close(target_gradients(model, x, target).reshape(2), plain)
    torch.testing.assert_close(guided_backprop(model, x, target).reshape(2), guided)
    torch.testing.assert_close(deconvnet(model, x, target).reshape(2), deconv)
    expected_live = [1.0, 0.0, 0.0] if activation == "relu6" else [1.0, 0.0, 1.0]
    assert live.tolist() == expected_live  # the cases the weights were picked for


def test_a_network_with_another_activation_is_refused_by_name():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(2, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(torch.nn.functional.gelu(self.relu(self.conv(x))).mean(dim=(2, 3)))

    model = Mixed().eval()
    assert "relu" in model_capabilities(model)
    x = torch.randn(2, 1, 8, 8)
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(
            ConfigError, match=rf"{method} is defined for ReLU networks; Mixed also applies gelu"
        ):
            explain(model, x, method, target=0)


def test_the_relu_methods_apply_to_relu_networks_only():
    assert "relu" in model_capabilities(zoo_model("mobilenetv2", 3))  # ReLU6 modules
    assert "relu" not in model_capabilities(zoo_model("vit_tiny", 3))  # GELU
    with pytest.raises(ConfigError, match="needs a model with relu"):
        explain(zoo_model("vit_tiny", 3), torch.randn(1, 3, 32, 32), "guided_backprop", target=0)
