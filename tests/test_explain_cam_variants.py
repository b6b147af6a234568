"""XGrad-CAM, LayerCAM, Smooth Grad-CAM++, SS-CAM and IS-CAM: parity with torchcam 0.5.0 on zoo models (the
gradient CAMs on every convolutional zoo model, the ImageNet backbones included; SS-CAM and IS-CAM, one
forward pass per channel, on the 32x32 zoo).

torchcam returns ``ReLU(sum_k w_k A_k)`` at the layer's resolution; ``normalized=False`` and a bilinear
upsampling give xailab's maps. Random methods are compared on the same noise (drawn as torchcam draws it),
Smooth Grad-CAM++ in its deterministic limit (see ``test_smooth_gradcam_plus_plus_matches_torchcam``).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchcam import methods as torchcam_methods

from xailab.errors import ConfigError
from xailab.explain import explain
from xailab.models import MODELS, create_model, model_input_size

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 5
SMALL_MODELS = ("mnist_cnn", "keras_cnn", "simple_cnn", "efficient_cnn", "mobilenetv2", "resnet18")
IMAGENET_MODELS = ("mobilenetv2_imagenet", "densenet169", "transfer_ensemble")  # 224x224: slow on a CPU
# The Score-CAM family runs one forward pass per channel of the explained layer, per sample and image. Beyond
# mnist_cnn and keras_cnn the CAM layers have 256 to 1280 channels (minutes on a shared CPU), so those models
# are compared at a 64-channel layer of theirs, one image, and marked slow; the ImageNet backbones (1280 to
# 2944 channels at 224x224) are left to the gradient CAMs.
SCORE_LAYERS = {
    "simple_cnn": "features.0",
    "resnet18": "layer1",
    "efficient_cnn": "blocks.0",
    "mobilenetv2": "blocks.6",
}
SCORE_SLOW = tuple(SCORE_LAYERS)


def zoo(names, slow=()) -> list:
    """``names`` as test parameters, those in ``slow`` marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


def build(name: str) -> nn.Module:
    options = (
        {"pretrained": False}
        if "pretrained" in inspect.signature(MODELS.get(name).factory).parameters
        else {}
    )
    torch.manual_seed(0)
    model = create_model(name, 3, NUM_CLASSES, **options).eval()
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():  # BN statistics that are not the identity, as after training
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def inputs_for(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model_input_size(name), generator=torch.Generator().manual_seed(0))


def torchcam_map(extractor_class, model, x, target, layer, **options) -> torch.Tensor:
    """torchcam's un-normalised CAM ``[B, h, w]`` upsampled bilinearly to ``[B, 1, H, W]``."""
    with extractor_class(model, layer, **options) as extractor:
        scores = model(x)
        cam = extractor(class_idx=target.tolist(), scores=scores, normalized=False)[0]
    return F.interpolate(cam[:, None].detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)


def assert_maps_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 0  # a map that is all zero would compare equal to anything
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", zoo(SMALL_MODELS + IMAGENET_MODELS, slow=IMAGENET_MODELS))
@pytest.mark.parametrize(("method", "reference"), [("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")])
def test_gradient_cams_match_torchcam(name, method, reference):
    model = build(name)
    x = inputs_for(name, NUM_CLASSES)
    target = torch.arange(NUM_CLASSES)  # every class: some must give a map that is not all zero
    ours = explain(model, x, method, target)
    theirs = torchcam_map(getattr(torchcam_methods, reference), model, x, target, model.cam_layer)
    assert_maps_close(ours, theirs)


@pytest.mark.parametrize("name", zoo(SMALL_MODELS + IMAGENET_MODELS, slow=IMAGENET_MODELS))
@pytest.mark.parametrize("n_samples", [1, 3])
def test_smooth_gradcam_plus_plus_matches_torchcam(name, n_samples):
    """In the limit of no noise, where both definitions meet: torchcam 0.5.0 takes the first derivative and
    the activation of its last noisy sample (xailab: their mean and the clean image's, as in the paper), so
    with real noise the two differ by design, not by error."""
    model = build(name)
    x = inputs_for(name)
    target = torch.tensor([0, 2])
    std = 1e-7
    ours = explain(model, x, "smooth_gradcam_plus_plus", target, n_samples=n_samples, std=std)
    theirs = torchcam_map(
        torchcam_methods.SmoothGradCAMpp, model, x, target, model.cam_layer, num_samples=n_samples, std=std
    )
    assert_maps_close(ours, theirs)


def test_smooth_gradcam_plus_plus_averages_over_the_noise():
    """With real noise, the map is Grad-CAM++'s formula on the derivatives averaged over the noisy copies:
    checked against that average computed here, copy by copy, from the same noise."""
    from xailab.explain.cam import activation_and_gradient

    model = build("mnist_cnn")
    x = inputs_for("mnist_cnn")
    target = torch.tensor([0, 2])
    noise = 0.3 * torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    ours = explain(model, x, "smooth_gradcam_plus_plus", target, noise=noise)
    activation, _ = activation_and_gradient(model, x, target, model.cam_layer)
    grads = torch.stack([activation_and_gradient(model, x + n, target, model.cam_layer)[1] for n in noise])
    d1, d2, d3 = grads.mean(0), grads.pow(2).mean(0), grads.pow(3).mean(0)
    alpha = d2 / (2 * d2 + (d3 * activation).sum(dim=(2, 3), keepdim=True) + 1e-8)
    weights = (alpha * F.relu(d1)).sum(dim=(2, 3))
    cam = F.relu((weights[:, :, None, None] * activation).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert_maps_close(ours, expected)


@pytest.mark.parametrize("name", zoo(SMALL_MODELS, slow=SCORE_SLOW))
def test_ss_cam_matches_torchcam_on_the_same_noise(name):
    model = build(name)
    batch = 1 if name in SCORE_SLOW else 2
    layer = SCORE_LAYERS.get(name, model.cam_layer)
    x = inputs_for(name, batch)
    target = torch.tensor([4, 1])[:batch]
    n_samples, std = 2, 2.0
    with torch.no_grad():
        from xailab.explain.cam import capture_activation

        with capture_activation(model, layer) as captured:
            model(x)
        channels = captured.activation.shape[1]
    # torchcam draws one [B, K, H, W] sample per round from the global generator, in order
    torch.manual_seed(11)
    normal = torch.distributions.normal.Normal(0, std)
    noise = torch.stack([normal.sample((batch, channels, *x.shape[-2:])) for _ in range(n_samples)])
    ours = explain(model, x, "ss_cam", target, layer=layer, noise=noise)
    torch.manual_seed(11)
    theirs = torchcam_map(torchcam_methods.SSCAM, model, x, target, layer, num_samples=n_samples, std=std)
    assert_maps_close(ours, theirs)


@pytest.mark.parametrize("name", zoo(SMALL_MODELS, slow=SCORE_SLOW))
def test_is_cam_matches_torchcam(name):
    model = build(name)
    batch = 1 if name in SCORE_SLOW else 2
    layer = SCORE_LAYERS.get(name, model.cam_layer)
    x = inputs_for(name, batch)
    target = torch.tensor([2, 3])[:batch]
    ours = explain(model, x, "is_cam", target, layer=layer, n_samples=3, internal_batch_size=50)
    theirs = torchcam_map(torchcam_methods.ISCAM, model, x, target, layer, num_samples=3)
    assert_maps_close(ours, theirs)


def test_seeded_random_cams_repeat_and_chunking_changes_nothing():
    model = build("keras_cnn")
    x = inputs_for("keras_cnn")
    first = explain(model, x, "ss_cam", 1, n_samples=2, seed=3)
    again = explain(model, x, "ss_cam", 1, n_samples=2, seed=3, internal_batch_size=7)
    other = explain(model, x, "ss_cam", 1, n_samples=2, seed=4)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(other, first)
    smooth = explain(model, x, "smooth_gradcam_plus_plus", 1, seed=3)
    torch.testing.assert_close(
        explain(model, x, "smooth_gradcam_plus_plus", 1, seed=3, internal_batch_size=3), smooth
    )


def test_bad_sample_counts_are_refused():
    model = build("mnist_cnn")
    x = inputs_for("mnist_cnn", 1)
    for method in ("smooth_gradcam_plus_plus", "ss_cam", "is_cam"):
        with pytest.raises(ConfigError, match="n_samples"):
            explain(model, x, method, 0, n_samples=0)
