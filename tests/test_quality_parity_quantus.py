"""Parity with Quantus 0.6 (and Captum's ``infidelity`` / ``sensitivity_max``): the same inputs, attributions
and perturbation settings give the same scores. Where Quantus draws random numbers, its draw is replayed
(numpy seeded, the same calls in the same order) and handed to xailab explicitly, so both compute with the
same noise. Quantus treats channel values as features; the tests use settings where that equals xailab's
whole-pixel definition (one-channel images, or ``features_in_step = C * pixels_per_step``)."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from quantus.functions.similarity_func import ssim as quantus_ssim
from torch import Tensor, nn

from xailab.explain import explain
from xailab.metrics import evaluate_explanations, model_randomisation, pixel_flipping_curve, road_curve, ssim
from xailab.metrics.faithfulness import linear_imputation, random_subsets
from xailab.metrics.randomisation import max_normalised

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 4


def tiny_cnn(channels: int, seed: int = 0) -> nn.Module:
    """A small conv net with a batch norm (so randomisation resets a normalisation layer too)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, NUM_CLASSES),
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch(channels: int, size: int = 8, n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    a = torch.randn(n, 1, size, size, generator=g)  # continuous: no ties in the orderings
    return x, y, a


def q_explain(method: str, normalise: bool = False):
    """A Quantus ``explain_func`` running ``xailab.explain`` (numpy in, numpy out)."""

    def explain_func(model, inputs, targets, **kwargs):
        maps = explain(model, torch.as_tensor(inputs), method, torch.as_tensor(targets).long())
        return (max_normalised(maps) if normalise else maps).numpy()

    return explain_func


def np_(t: Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_flipping_curve(channels):
    model = tiny_cnn(channels)
    x, y, a = batch(channels, size=12)  # Quantus wants features_in_step = C * 4 to divide H * W
    ours = pixel_flipping_curve(model, x, y, a, pixels_per_step=4, baseline="black")
    metric = quantus.PixelFlipping(features_in_step=4 * channels, disable_warnings=True)
    theirs = np.array(metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu"))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    auc = evaluate_explanations(model, x, y, a, metrics=["pixel_flipping"], pixels_per_step=4)[
        "pixel_flipping"
    ]
    # Quantus's return_auc_per_sample calls np.trapz, which numpy 2 removed: its definition on its curve
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(theirs, dx=1, axis=1), atol=1e-4)


def gradcam_maps(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Grad-CAM maps of the first convolution: ReLU zeros and flat regions, so many tied values."""
    return explain(model, x, "gradcam", y, layer="0")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pixel_flipping_and_road_curves_equal_quantus_on_maps_with_ties(seed):
    # Quantus orders tied pixels as numpy's (unstable) argsort of the negated map does; so does
    # ``descending_order``, so curves agree also where a step splits a group of equal values
    model = tiny_cnn(1, seed=seed)
    x, _, _ = batch(1, size=12, n=8, seed=seed)
    y = model(x).argmax(1)
    a = gradcam_maps(model, x, y)
    a[:, :, :3] = a[:, :, :3].round(decimals=1)  # plus a flat border of equal non-zero values
    flat = a.flatten(1)
    assert all(len(row.unique()) < row.numel() - 10 for row in flat)  # ties indeed
    ours = pixel_flipping_curve(model, x, y, a, pixels_per_step=6, baseline="black")
    metric = quantus.PixelFlipping(features_in_step=6, disable_warnings=True)
    theirs = np.array(metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu"))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    percentages = [10, 30, 50, 70, 90]
    ours_road = road_curve(model, x, y, a, percentages=tuple(percentages), noise=0.0)
    road = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)
    theirs_road = road(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu")
    np.testing.assert_allclose(ours_road.mean(0).numpy(), [theirs_road[p] for p in percentages], atol=1e-6)


def test_faithfulness_correlation_with_replayed_subsets():
    model = tiny_cnn(1)
    x, y, a = batch(1)
    runs, k = 20, 16
    np.random.seed(7)
    draws = []
    for _ in range(runs):  # Quantus's loop: one subset per image, then its baseline helper draws a
        draws.append(np.stack([np.random.choice(64, k, replace=False) for _ in range(len(x))]))
        np.random.uniform(size=len(x))  # "uniform" baseline it evaluates (and discards) on every call
    subsets = np.stack(draws, 1)
    np.random.seed(7)
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=runs, subset_size=k, return_aggregate=False, disable_warnings=True
    )
    theirs = metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu")
    scores = evaluate_explanations(
        model, x, y, a, metrics=["faithfulness_correlation"], subsets=torch.as_tensor(subsets)
    )
    np.testing.assert_allclose(scores["faithfulness_correlation"].numpy(), np.array(theirs), atol=1e-4)


def test_random_subsets_are_seeded_and_without_replacement():
    x = torch.zeros(3, 1, 8, 8)
    s = random_subsets(x, 5, 10, seed=3)
    assert torch.equal(s, random_subsets(x, 5, 10, seed=3))
    assert not torch.equal(s, random_subsets(x, 5, 10, seed=4))
    assert all(len(set(row.tolist())) == 10 for row in s.flatten(0, 1))


def test_linear_imputation_matches_quantus_sparse_solve():
    x, _, a = batch(1, size=10, n=3)
    order = a.flatten(1).argsort(1, descending=True)
    for count in (5, 50, 99):
        masks = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, order[:, :count], True).view(3, 1, 10, 10)
        ours = linear_imputation(x.double(), masks)
        for i in range(3):
            theirs = quantus.functions.perturb_func.noisy_linear_imputation(
                arr=x[i].double().numpy(), indices=order[i, :count].numpy(), noise=0.0
            )
            np.testing.assert_allclose(ours[i].numpy(), theirs, atol=1e-7)


def test_road_curve_without_noise():
    model = tiny_cnn(1)
    x, _, a = batch(1, n=8)
    y = model(x).argmax(1)  # ROAD counts how often the prediction survives: start from correct ones
    percentages = [10, 30, 50, 70, 90]
    ours = road_curve(model, x, y, a, percentages=tuple(percentages), noise=0.0)
    metric = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)
    theirs = metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu")
    np.testing.assert_allclose(ours.mean(0).numpy(), [theirs[p] for p in percentages], atol=1e-6)


def test_infidelity_patches_as_quantus():
    model = tiny_cnn(3)
    x, y, a = batch(3)
    ours = evaluate_explanations(
        model, x, y, a, metrics=["infidelity"], perturbation="patches", patch_size=4, baseline="black"
    )["infidelity"]
    metric = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, disable_warnings=True)
    theirs = metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu")
    np.testing.assert_allclose(ours.numpy(), np.array(theirs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalise", [False, True])
def test_infidelity_gaussian_as_captum(normalise):
    model = tiny_cnn(3)
    x, y, a = batch(3)
    n = 16
    noise = torch.randn(len(x), n, *x.shape[1:], generator=torch.Generator().manual_seed(5)) * 0.1
    ours = evaluate_explanations(
        model, x, y, a, metrics=["infidelity"], perturbations=noise, normalise=normalise
    )["infidelity"]

    def perturb(inputs):  # Captum repeats each image n times in a row: hand out the same noise
        flat = noise.flatten(0, 1)
        return flat, inputs - flat

    theirs = captum_infidelity(
        model, perturb, x, a.expand_as(x), target=y, n_perturb_samples=n, normalize=normalise
    )
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["max_sensitivity", "avg_sensitivity"])
def test_sensitivity_with_replayed_noise(name):
    model = tiny_cnn(1)
    x, y, _ = batch(1)
    a = explain(model, x, "saliency", y)
    n, radius = 6, 0.2
    np.random.seed(11)
    draws = [np.random.uniform(-radius, radius, size=(len(x), 64)) for _ in range(n)]
    noise = torch.as_tensor(np.stack(draws, 1), dtype=torch.float32).view(len(x), n, 1, 8, 8)
    # Quantus adds float64 noise to the float32 input and then explains in float32: do the same rounding
    x_noisy = (x.double()[:, None] + noise.double()).float()
    noise = x_noisy - x[:, None]
    metric_cls = quantus.MaxSensitivity if name == "max_sensitivity" else quantus.AvgSensitivity
    metric = metric_cls(nr_samples=n, lower_bound=radius, disable_warnings=True)
    np.random.seed(11)
    theirs = metric(
        model=model,
        x_batch=np_(x),
        y_batch=y.numpy(),
        a_batch=np_(a),
        device="cpu",
        explain_func=q_explain("saliency"),
    )
    ours = evaluate_explanations(model, x, y, method="saliency", metrics=[name], noise=noise)[name]
    np.testing.assert_allclose(ours.numpy(), np.array(theirs), rtol=1e-4, atol=1e-5)


def test_max_sensitivity_as_captum():
    model = tiny_cnn(3)
    x, y, _ = batch(3)
    n = 5
    noise = (torch.rand(len(x), n, *x.shape[1:], generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.05

    def perturb(inputs, perturb_radius=0.0):  # Captum repeats each image n times in a row
        return (inputs[0] if isinstance(inputs, tuple) else inputs) + noise.flatten(0, 1)

    def explanation(inputs, target):  # Captum hands inputs over as a tuple and wants a tuple back
        maps = explain(model, inputs[0] if isinstance(inputs, tuple) else inputs, "input_x_gradient", target)
        return (maps,)

    theirs = captum_sensitivity_max(explanation, x, perturb_func=perturb, n_perturb_samples=n, target=y)
    ours = evaluate_explanations(
        model, x, y, method="input_x_gradient", metrics=["max_sensitivity"], noise=noise
    )["max_sensitivity"]
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("name", ["sparseness", "complexity"])
def test_complexity_metrics(name, normalise):
    # ours scale maps to max |a| = 1 (Quantus's default normalise=True); without Quantus's normalisation its
    # absolute 1e-7 weighs differently, by less than the tolerance on maps of unit scale
    model = tiny_cnn(1)
    x, y, a = batch(1)
    metric = {"sparseness": quantus.Sparseness, "complexity": quantus.Complexity}[name](
        normalise=normalise, disable_warnings=True
    )
    theirs = metric(model=model, x_batch=np_(x), y_batch=y.numpy(), a_batch=np_(a), device="cpu")
    ours = evaluate_explanations(model, x, y, a, metrics=[name])[name]
    np.testing.assert_allclose(ours.numpy(), np.array(theirs), rtol=1e-5)


def test_ssim_matches_quantus_and_scikit_image():
    _, _, a = batch(1, size=12)
    _, _, b = batch(1, size=12, seed=9)
    b = a + 0.5 * b  # related maps: an SSIM well away from 0
    theirs = [quantus_ssim(p[0].double().numpy(), q[0].double().numpy()) for p, q in zip(a, b, strict=True)]
    np.testing.assert_allclose(ssim(a, b).numpy(), theirs, atol=1e-6)


def test_model_randomisation_per_layer_as_quantus_mprt():
    model = tiny_cnn(1)
    x, y, _ = batch(1)
    a = explain(model, x, "saliency", y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    result = model_randomisation(model, x, y, method="saliency", attributions=a, seed=42)
    # the caller's model and RNG are untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng_before, torch.random.get_rng_state())
    metric = quantus.MPRT(seed=42, disable_warnings=True)
    theirs = metric(
        model=model,
        x_batch=np_(x),
        y_batch=y.numpy(),
        a_batch=np_(a),
        device="cpu",
        explain_func=q_explain("saliency"),
    )
    assert result.layers == [k for k in theirs if k != "original"]
    for i, layer in enumerate(result.layers):
        np.testing.assert_allclose(result.spearman[i].numpy(), np.array(theirs[layer]), atol=1e-5)


def test_random_logit_as_quantus_with_2d_ssim():
    model = tiny_cnn(1)
    x, y, _ = batch(1, size=10)
    a = explain(model, x, "saliency", y)
    np.random.seed(42)  # Quantus's draw of the other classes
    draw = np.random.randint(0, NUM_CLASSES - 1, len(x))
    off = torch.as_tensor(draw) + (torch.as_tensor(draw) >= y).long()

    def ssim_2d(a, b, batched=True, **kwargs):  # Quantus's ssim on the maps as images, not flattened
        return [quantus_ssim(p.reshape(10, 10), q.reshape(10, 10)) for p, q in zip(a, b, strict=True)]

    metric = quantus.RandomLogit(
        num_classes=NUM_CLASSES, seed=42, similarity_func=ssim_2d, normalise=False, disable_warnings=True
    )
    theirs = metric(
        model=model,
        x_batch=np_(x),
        y_batch=y.numpy(),
        a_batch=np_(max_normalised(a)),
        device="cpu",
        explain_func=q_explain("saliency", normalise=True),
    )
    ours = evaluate_explanations(model, x, y, method="saliency", metrics=["random_logit"], off_targets=off)
    np.testing.assert_allclose(ours["random_logit"].numpy(), np.array(theirs), atol=1e-5)
