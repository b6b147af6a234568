"""Parity of xailab's occlusion, LIME and Kernel SHAP with Captum on real zoo models (same windows; for
LIME/SHAP the same segments, coalitions, kernel and regression), and the ``captum:<Name>`` bridge."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from torch import Tensor, nn

from conftest import calibrated_model
from xailab.errors import ConfigError, UnknownNameError
from xailab.explain import perturbation as P
from xailab.explain.base import explain
from xailab.models import create_model

captum_attr = pytest.importorskip("captum.attr")
linear_models = pytest.importorskip("captum._utils.models.linear_model")

ZOO = {"mnist_cnn": (1, 28), "simple_cnn": (3, 32)}


def zoo_model(name: str) -> tuple[nn.Module, Tensor]:
    """The calibrated zoo model ``name`` (conftest.py) and two fixed random inputs for it."""
    channels, size = ZOO[name]
    inputs = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    return calibrated_model(name, channels, size), inputs


@pytest.fixture(scope="module", params=list(ZOO))
def zoo(request: pytest.FixtureRequest) -> tuple[nn.Module, Tensor]:
    return zoo_model(request.param)


def replay(rows: Tensor):
    """A Captum ``perturb_func`` generator yielding our coalitions ``[N, S]`` in order, one ``[1, S]`` each."""

    def generate(_inputs: Tensor, **_kwargs: object) -> Iterator[Tensor]:
        yield from (row[None].long() for row in rows)

    return generate


# --- parity: occlusion -----------------------------------------------------------------------------------


def test_occlusion_matches_captum(zoo: tuple[nn.Module, Tensor]) -> None:
    model, x = zoo
    target = torch.tensor([3, 7])
    c = x.shape[1]
    for window, stride in [((8, 8), (6, 6)), ((7, 9), (5, 7))]:  # both leave cut-off windows
        ours = explain(
            model, x, "occlusion", target=target, reduce=None, window=window, stride=stride, baseline=0.5
        )
        reference = captum_attr.Occlusion(model).attribute(
            x,
            target=target,
            sliding_window_shapes=(c, *window),
            strides=(c, *stride),
            baselines=0.5,
            perturbations_per_eval=64,
        )
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
        assert reference.abs().max() > 1e-3  # the comparison is not between two near-zero maps


# --- parity: LIME -----------------------------------------------------------------------------------------


def test_lime_matches_captum_lime_on_the_same_samples(zoo: tuple[nn.Module, Tensor]) -> None:
    """Captum's Lime fed our coalitions (perturb_func), our kernel (similarity_func) and sklearn's Ridge
    (alpha=1, lime_image's) must fit the same coefficients."""
    model, x = zoo
    target, n, seed = torch.tensor([2, 5]), 60, 3
    ours = explain(model, x, "lime", target=target, segments="grid", grid=4, n_samples=n, seed=seed)
    labels, counts = P.segment_images(x, "grid", grid=4)
    coalitions = P.lime_coalitions(counts, n, P.seeded_generator(x, seed))
    background = P.baseline_images(x, "mean")
    for b in range(len(x)):

        def similarity(_original: Tensor, _perturbed: Tensor, z: Tensor, **_kwargs: object) -> Tensor:
            return P.lime_weights(z.float()[None], counts[b : b + 1])[0]  # noqa: B023 (used within the iteration)

        lime = captum_attr.Lime(
            model,
            interpretable_model=linear_models.SkLearnRidge(alpha=1.0),
            similarity_func=similarity,
            perturb_func=replay(coalitions[b]),
        )
        reference = lime.attribute(
            x[b : b + 1],
            target=target[b : b + 1],
            baselines=background[b : b + 1],
            feature_mask=labels[b][None, None],
            n_samples=n,
            perturbations_per_eval=64,
        )
        torch.testing.assert_close(ours[b : b + 1], reference[:, :1], rtol=1e-4, atol=1e-6)
        assert reference.abs().max() > 1e-3


# --- parity: Kernel SHAP ----------------------------------------------------------------------------------


def test_kernel_shap_matches_captum_and_a_float64_reference(zoo: tuple[nn.Module, Tensor]) -> None:
    """Captum's KernelShap replaying our coalitions (all-ones, all-zeros, then Shapley-kernel sizes) gives
    the ends weight 1e6 and fits in float32; we impose them as exact constraints. The difference is
    Captum's float32 rounding: a float64 weighted fit with weight 1e9 matches ours to 1e-6."""
    model, x = zoo
    target, n, seed = torch.tensor([1, 8]), 60, 4
    ours = explain(
        model,
        x,
        "kernel_shap",
        target=target,
        segments="grid",
        grid=4,
        baseline="zero",
        n_samples=n,
        seed=seed,
    )
    labels, counts = P.segment_images(x, "grid", grid=4)
    coalitions = P.shapley_coalitions(counts, n, P.seeded_generator(x, seed))
    background = P.baseline_images(x, "zero")
    scores = P.coalition_scores(model, x, target, labels, coalitions, background, 64)
    for b in range(len(x)):
        shap = captum_attr.KernelShap(model)
        shap.perturb_func = replay(coalitions[b])
        reference = shap.attribute(
            x[b : b + 1],
            target=target[b : b + 1],
            baselines=background[b : b + 1],
            feature_mask=labels[b][None, None],
            n_samples=n,
            perturbations_per_eval=64,
        )
        scale = reference.abs().max()
        assert scale > 1e-3
        torch.testing.assert_close(ours[b : b + 1], reference[:, :1], rtol=0, atol=float(1e-3 * scale))

        weights = np.ones(n)
        weights[:2] = 1e9
        exact = LinearRegression().fit(
            coalitions[b].double().numpy(), scores[b].double().numpy(), sample_weight=weights
        )
        per_segment = [ours[b, 0][labels[b] == segment][0].item() for segment in range(int(counts[b]))]
        np.testing.assert_allclose(per_segment, exact.coef_, atol=1e-6)


@pytest.mark.parametrize(
    ("mask", "baseline", "expected"),
    [
        # Captum's test_simple_kernel_shap_with_mask (its sampling reaches 273.78 / 116.22)
        ([0, 0, 1], "zero", [275.0, 275.0, 115.0]),
        # Captum's test_simple_kernel_shap_with_baselines (by hand: v(0) = 40, v(A) = 288, v(B) = 144,
        # v(AB) = 392, so phi_A = (248 + 248) / 2, phi_B = (104 + 104) / 2)
        ([0, 0, 1], 4.0, [248.0, 248.0, 104.0]),
        # three features of a non-additive model: Captum's exact [76.67, 196.67, 116.67]
        ([0, 1, 2], "zero", [76.66666, 196.66666, 116.66666]),
    ],
)
def test_kernel_shap_enumerates_every_coalition_when_affordable(mask, baseline, expected) -> None:
    """With ``2**S <= n_samples`` every coalition is evaluated and weighted by the Shapley kernel, the empty
    and full ones as constraints: the exact Shapley values, within Captum's test tolerance (1e-4)."""
    from captum.testing.helpers.basic_models import BasicModel_MultiLayer

    model = nn.Sequential(nn.Flatten(), BasicModel_MultiLayer()).eval()
    x = torch.tensor([20.0, 50.0, 30.0]).view(1, 1, 1, 3)
    segments = torch.tensor(mask).view(1, 1, 3)
    for n_samples in (2 ** len(set(mask)), 500):  # exact whatever the budget above 2**S; seeds play no part
        got = explain(
            model,
            x,
            "kernel_shap",
            target=0,
            segments=segments,
            baseline=baseline,
            n_samples=n_samples,
            seed=n_samples,
        )
        torch.testing.assert_close(got.flatten(), torch.tensor(expected), atol=1e-4, rtol=0)


def test_enumerated_coalitions_carry_the_shapley_kernel_weights() -> None:
    z, weights = P.enumerated_coalitions(torch.tensor([3, 2]))
    assert z.shape == (2, 8, 3) and z[0, 0].tolist() == [1, 1, 1] and z[0, 1].tolist() == [0, 0, 0]
    # S = 3: kernel (S - 1) / (C(S, k) k (S - k)) = 1/3 for k = 1 and k = 2; ends are constraints (0)
    torch.testing.assert_close(weights[0], torch.tensor([0, 0, *[1 / 3] * 6], dtype=torch.float64))
    # S = 2 in a batch padded to 3: padding never kept, each real coalition repeated (uniform multiplicity)
    assert (z[1, :, 2] == 0).all() and z[1, 0].tolist() == [1, 1, 0]
    assert torch.equal(weights[1] > 0, (z[1].sum(1) == 1))


# --- the captum:<Name> bridge -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DeepLift", "GuidedBackprop", "GuidedGradCam", "LayerGradCam"])
def test_captum_methods_run_through_explain(name: str) -> None:
    model, x = zoo_model("mnist_cnn")
    attribution = explain(model, x, f"captum:{name}", target=3)
    assert attribution.shape == (2, 1, 28, 28) and attribution.dtype == torch.float32
    assert torch.isfinite(attribution).all() and attribution.abs().max() > 0


def test_captum_guided_grad_cam_uses_the_models_cam_layer() -> None:
    model, x = zoo_model("simple_cnn")
    ours = explain(model, x, "captum:GuidedGradCam", target=4, reduce=None)
    layer = model.get_submodule(model.cam_layer)
    torch.testing.assert_close(ours, captum_attr.GuidedGradCam(model, layer).attribute(x, target=4))
    # a layer attribution comes back summed over the layer's channels and upsampled to the input
    cam = captum_attr.LayerGradCam(model, layer).attribute(x, target=4)
    expected = captum_attr.LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    torch.testing.assert_close(explain(model, x, "captum:LayerGradCam", target=4), expected)
    other = explain(model, x, "captum:LayerGradCam", target=4, layer="features.1")
    assert not torch.allclose(other, expected)


@pytest.mark.parametrize("name", ["GuidedBackprop", "Deconvolution", "GuidedGradCam"])
def test_captum_relu_module_methods_are_refused_where_they_would_return_the_plain_gradient(name: str) -> None:
    # MobileNetV2's ReLU6 are not nn.ReLU modules: Captum's hooks miss them (16 ReLUs, 1 nn.ReLU in the head)
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 3, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(
        ConfigError,
        match=rf"captum:{name} changes the backward pass of nn.ReLU modules only.*15 of its 16 ReLUs are ReLU6 or functional",
    ):
        explain(model, x, f"captum:{name}", target=3)
    # what Captum would have returned stays close to the plain gradient (only the head's nn.ReLU rectified);
    # xailab's guided backprop, rectifying all 16, is far from it (measured: 0.76 and 0.23)
    captum = captum_attr.GuidedBackprop(model).attribute(x, target=3)
    plain = captum_attr.Saliency(model).attribute(x, target=3, abs=False)
    ours = explain(model, x, "guided_backprop", target=3, reduce=None)
    assert torch.corrcoef(torch.stack([captum.flatten(), plain.flatten()]))[0, 1] > 0.6
    assert torch.corrcoef(torch.stack([ours.flatten(), plain.flatten()]))[0, 1] < 0.35


def test_captum_bridge_restores_the_models_state() -> None:
    model, x = zoo_model("mnist_cnn")
    model.train()
    model.classifier.requires_grad_(False)
    explain(model, x, "captum:GuidedBackprop", target=0)
    assert model.training and not model.classifier[0].weight.requires_grad
    assert model.features[0][0].weight.requires_grad


def test_unknown_captum_name_suggests_the_closest() -> None:
    model, x = zoo_model("mnist_cnn")
    with pytest.raises(UnknownNameError, match="Did you mean 'DeepLift'"):
        explain(model, x, "captum:DeepLfit")
    with pytest.raises(ConfigError, match="NoiseTunnel"):  # in captum.attr, but not built from a model
        explain(model, x, "captum:NoiseTunnel")


def test_missing_captum_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # makes `import captum.attr` raise ImportError
    model, x = zoo_model("mnist_cnn")
    with pytest.raises(ConfigError, match="pip install captum"):
        explain(model, x, "captum:DeepLift")
