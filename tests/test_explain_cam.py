"""Class activation maps: parity with Captum's LayerGradCam, hand-computed maps on a one-conv model, layer
detection, and Score-CAM against a loop transcribing the authors' algorithm."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.explain import explain
from xailab.explain.cam import capture_activation, find_cam_layer, gradcam, gradcam_plus_plus, score_cam
from xailab.models import create_model

pytestmark = pytest.mark.usefixtures("single_thread")


class OneConv(nn.Module):
    """``1x1 conv (1 -> 2) -> global mean -> linear (2 -> 2)`` with hand-picked weights.

    On ``x``: ``A_0 = x``, ``A_1 = 1 - x``; logit 0 is ``2 mean(A_0) + mean(A_1)``.
    """

    cam_layer = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 3.0]]))
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


X = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]]])  # A_0 = X, A_1 = [[0, -1], [-2, 5]], both with mean 0.5


def test_gradcam_by_hand():
    """d logit_0 / d A_k = fc.weight[0, k] / 4 everywhere, so w = (0.5, 0.25) and
    ReLU(0.5 A_0 + 0.25 A_1) = ReLU([[0.5, 0.75], [1.0, -0.75]])."""
    expected = torch.tensor([[[[0.5, 0.75], [1.0, 0.0]]]])
    torch.testing.assert_close(gradcam(OneConv(), X, torch.tensor([0])), expected)


def test_gradcam_plus_plus_by_hand():
    """g = (0.5, 0.25) and sum(A_k) = 2 for both maps: alpha_0 = 0.25 / (0.5 + 2 * 0.125) = 1/3,
    alpha_1 = 0.0625 / (0.125 + 2 * 0.015625) = 0.4; w_k = 4 alpha_k g_k = (2/3, 0.4), so the map is
    ReLU(2/3 A_0 + 0.4 A_1) = ReLU([[2/3, 14/15], [1.2, -2/3]])."""
    expected = torch.tensor([[[[2 / 3, 14 / 15], [1.2, 0.0]]]])
    torch.testing.assert_close(
        gradcam_plus_plus(OneConv(), X, torch.tensor([0])), expected, rtol=0, atol=1e-5
    )


def test_score_cam_by_hand():
    """Masks: A_0 = X min-max normalised = [[5, 6], [7, 0]] / 7; A_1 = [[2, 1], [0, 7]] / 7. The masked
    input m * X gives A_0 = m X, A_1 = 1 - m X, so logits (2 s + (1 - s), -s + 3 (1 - s)) with s = mean(m X)."""
    weights = []
    for mask in ([[5, 6], [7, 0]], [[2, 1], [0, 7]]):
        s = (torch.tensor(mask) / 7 * X[0, 0]).mean()
        logits = torch.stack([2 * s + (1 - s), -s + 3 * (1 - s)])
        weights.append(logits.softmax(0)[0])
    a0, a1 = X[0, 0], 1 - X[0, 0]
    expected = F.relu(weights[0] * a0 + weights[1] * a1)[None, None]
    torch.testing.assert_close(score_cam(OneConv(), X, torch.tensor([0])), expected)


class StridedConvs(nn.Module):
    """Two convs (the second stride 2, 4 channels) and a linear head, without ``cam_layer``: ``conv2`` sees
    4x4 at 8x8 inputs, ``conv3`` runs on the pooled 1x1 map, and the modules are declared out of
    execution order."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv3 = nn.Conv2d(4, 5, 1)
        self.conv1 = nn.Conv2d(in_channels, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(self.conv3(x.mean(dim=(2, 3), keepdim=True)).flatten(1))


def test_automatic_layer_is_the_last_conv_with_spatial_output():
    model = StridedConvs()
    inputs = torch.randn(2, 1, 8, 8)
    assert find_cam_layer(model, inputs) == "conv2"
    target = torch.tensor([0, 2])
    torch.testing.assert_close(gradcam(model, inputs, target), gradcam(model, inputs, target, layer="conv2"))
    assert not any(m._forward_hooks for m in model.modules())


def test_declared_cam_layer_wins_and_layer_overrides_it():
    model = create_model("mnist_cnn", 1, 10).eval()
    inputs = torch.randn(1, 1, 28, 28)
    target = torch.tensor([1])
    declared = gradcam(model, inputs, target, layer=model.cam_layer)
    torch.testing.assert_close(gradcam(model, inputs, target), declared)
    assert not torch.allclose(gradcam(model, inputs, target, layer="features.0"), declared)


def test_unknown_layer_suggests_the_nearest():
    with pytest.raises(ConfigError, match=re.escape("no layer 'conv22'. Did you mean 'conv2'")):
        gradcam(StridedConvs(), torch.randn(1, 1, 8, 8), torch.tensor([0]), layer="conv22")


class WithSideBranch(StridedConvs):
    """Also runs a conv whose output the logits ignore."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(1, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.side(x)
        return super().forward(x)


def test_layer_the_output_does_not_depend_on_is_rejected():
    with pytest.raises(ConfigError, match="does not depend on layer 'side'"):
        gradcam(WithSideBranch(), torch.randn(1, 1, 8, 8), torch.tensor([0]), layer="side")


def test_layer_without_a_map_is_rejected():
    with pytest.raises(ConfigError, match="'fc' must output a \\[B, K, h, w\\] tensor"):
        gradcam(StridedConvs(), torch.randn(1, 1, 8, 8), torch.tensor([0]), layer="fc")


@pytest.mark.parametrize(("name", "channels", "size"), [("mnist_cnn", 1, 28), ("resnet18", 3, 32)])
def test_gradcam_matches_captum(name, channels, size):
    """Captum's LayerGradCam with ``relu_attributions=True`` (the paper's ReLU on the layer map), upsampled by
    ``LayerAttribution.interpolate``; the order matters since ReLU and bilinear upsampling do not commute."""
    torch.manual_seed(0)
    model = create_model(name, channels, 10).eval()
    inputs = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 4, 9])
    layer_map = LayerGradCam(model, model.get_submodule(model.cam_layer)).attribute(
        inputs, target=target, relu_attributions=True
    )
    expected = LayerAttribution.interpolate(layer_map, (size, size), "bilinear")
    actual = explain(model, inputs, "gradcam", target)
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def reference_score_cam(model: nn.Module, inputs: Tensor, target: Tensor, layer: str) -> Tensor:
    """The authors' Score-CAM loop, one image and one channel at a time (with the ReLU before the final
    upsampling, as for Grad-CAM)."""
    maps = []
    for x, t in zip(inputs, target, strict=True):
        with capture_activation(model, layer) as captured, torch.no_grad():
            model(x[None])
        activation = captured.activation[0]
        cam = torch.zeros(activation.shape[-2:])
        for a in activation:
            mask = F.interpolate(a[None, None], size=inputs.shape[-2:], mode="bilinear", align_corners=False)
            if mask.max() == mask.min():
                continue
            mask = (mask - mask.min()) / (mask.max() - mask.min())
            with torch.no_grad():
                score = model(x[None] * mask).softmax(1)[0, t]
            cam += score * a
        maps.append(F.interpolate(F.relu(cam)[None, None], size=inputs.shape[-2:], mode="bilinear"))
    return torch.cat(maps)


def test_score_cam_matches_the_reference_loop_in_any_chunking():
    model = StridedConvs(in_channels=3).eval()
    with torch.no_grad():
        model.conv2.bias[1] = -10.0  # tanh saturates: a constant map, which gets no weight
    inputs = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2])
    expected = reference_score_cam(model, inputs, target, "conv2")
    for batch_size in (None, 1, 5):
        torch.testing.assert_close(score_cam(model, inputs, target, internal_batch_size=batch_size), expected)


def test_gradients_reach_the_layer_of_a_frozen_model():
    """transfer_ensemble's backbones are frozen: the layer's gradient must flow from the inputs."""
    model = StridedConvs().eval()
    inputs = torch.randn(2, 1, 8, 8)
    target = torch.tensor([1, 2])
    expected = gradcam(model, inputs, target), gradcam_plus_plus(model, inputs, target)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(
        (gradcam(model, inputs, target), gradcam_plus_plus(model, inputs, target)), expected
    )
    assert not inputs.requires_grad


def test_capture_activation_removes_its_hook_when_the_block_raises():
    model = StridedConvs()
    with pytest.raises(RuntimeError, match="boom"), capture_activation(model, "conv1") as captured:
        model(torch.randn(1, 1, 8, 8))
        assert captured.activation.shape == (1, 3, 8, 8)
        raise RuntimeError("boom")
    assert not model.conv1._forward_hooks
