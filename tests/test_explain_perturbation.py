"""Perturbation methods against known answers: occlusion by hand, Shapley values and ridge fits of linear
models, RISE's expectation; seeding, chunking, segmentation, shapes. Captum parity: test_explain_captum.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch import Tensor, nn

from conftest import LinearModel, calibrated_model
from conftest import TinyCNN as SharedTinyCNN
from xailab.errors import ConfigError
from xailab.explain import perturbation as P
from xailab.explain.base import explain

SEEDED = ("lime", "kernel_shap", "rise")
FAST = {"lime": {"n_samples": 60}, "kernel_shap": {"n_samples": 60}, "rise": {"n_masks": 60}, "occlusion": {}}


def digit_image() -> Tensor:
    """A 28x28 MNIST-like "7" (white strokes on black), normalised with MNIST's mean and std: [1, 1, 28, 28]."""
    image = torch.zeros(28, 28)
    image[6:9, 6:22] = 1.0  # the bar
    for row in range(9, 24):  # the diagonal stroke
        col = 21 - (row - 9) // 2
        image[row, col - 1 : col + 2] = 1.0
    return ((image - 0.1307) / 0.3081)[None, None]


@pytest.fixture(scope="module")
def mnist_model() -> nn.Module:
    return calibrated_model("mnist_cnn", 1, 28)


def inputs_for(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def smooth_inputs(shape: tuple[int, int, int, int]) -> Tensor:
    """Random images with structure (8x8 noise upsampled), which SLIC can segment, unlike pixel noise."""
    coarse = inputs_for((*shape[:2], 8, 8))
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)


# --- occlusion -------------------------------------------------------------------------------------------


def occlusion_by_hand(
    weight: np.ndarray, x: np.ndarray, window: tuple[int, int], stride: tuple[int, int], baseline: float
) -> np.ndarray:
    """Occlusion of a linear model, window by window: a window's drop is ``sum w (x - baseline)`` over it
    (all channels); a pixel's attribution is the mean drop of the windows covering it. ``x`` [C, H, W]."""
    _, height, width = x.shape

    def starts(size: int, win: int, step: int) -> list[int]:
        out = [0]
        while out[-1] + win < size:  # slide until a window reaches the edge (it may be cut off)
            out.append(out[-1] + step)
        return out

    total, count = np.zeros((height, width)), np.zeros((height, width))
    for top in starts(height, window[0], stride[0]):
        for left in starts(width, window[1], stride[1]):
            region = (slice(None), slice(top, top + window[0]), slice(left, left + window[1]))
            drop = (weight[region] * (x[region] - baseline)).sum()
            total[region[1:]] += drop
            count[region[1:]] += 1
    return total / count


def test_occlusion_of_a_linear_model_matches_the_hand_computation() -> None:
    shape = (3, 12, 10)
    model = LinearModel(shape)
    x = inputs_for((2, *shape))
    target = torch.tensor([2, 0])
    got = explain(
        model, x, "occlusion", target=target, reduce=None, window=(4, 3), stride=(3, 2), baseline=0.5
    )
    assert got.shape == (2, *shape) and got.dtype == torch.float32
    for b in range(2):
        weight = model.fc.weight[target[b]].detach().view(shape).double().numpy()
        expected = occlusion_by_hand(weight, x[b].double().numpy(), (4, 3), (3, 2), 0.5)
        for c in range(3):  # windows span all channels: every channel carries the same map
            torch.testing.assert_close(got[b, c], torch.from_numpy(expected).float(), rtol=1e-4, atol=1e-5)
    # registered reduce="mean": the single map is that per-pixel value
    torch.testing.assert_close(
        explain(model, x, "occlusion", target=target, window=(4, 3), stride=(3, 2), baseline=0.5), got[:, :1]
    )


def test_occlusion_rejects_windows_that_do_not_fit() -> None:
    model, x = LinearModel((1, 8, 8)), inputs_for((1, 1, 8, 8))
    with pytest.raises(ConfigError, match="larger than the 8x8"):
        explain(model, x, "occlusion", window=9)
    with pytest.raises(ConfigError, match="stride"):
        explain(model, x, "occlusion", window=2, stride=3)


# --- LIME and Kernel SHAP on linear models: exact answers ------------------------------------------------


def segment_contributions(
    model: LinearModel, x: Tensor, background: Tensor, labels: Tensor, target: Tensor
) -> list[np.ndarray]:
    """Per image, each segment's ``sum w (x - background)`` over its pixels: for a linear model these are
    the exact Shapley values of the segments (an additive game's players get their own contribution)."""
    out = []
    for b in range(len(x)):
        weight = model.fc.weight[target[b]].detach().view(x.shape[1:]).double()
        gain = (weight * (x[b] - background[b]).double()).sum(0)  # [H, W], summed over channels
        out.append(np.array([gain[labels[b] == s].sum().item() for s in labels[b].unique()]))
    return out


def map_values(attribution: Tensor, labels: Tensor) -> list[np.ndarray]:
    """Each segment's value in a ``[B, 1, H, W]`` map (constant over the segment), segments in label order."""
    return [
        np.array([attribution[b, 0][labels[b] == s][0].item() for s in labels[b].unique()])
        for b in range(len(labels))
    ]


@pytest.fixture
def uneven_segments() -> Tensor:
    """Image 0: a 4x4 grid (16 segments), image 1: a 3x3 grid (9), labels sparse (10 s + 5), so that
    renumbering and padding to the larger count are both exercised."""
    return (
        torch.stack(
            [P.grid_segments(16, 16, 4, torch.device("cpu")), P.grid_segments(16, 16, 3, torch.device("cpu"))]
        )
        * 10
        + 5
    )


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur", 0.3])
def test_kernel_shap_recovers_exact_shapley_values_of_a_linear_model(
    uneven_segments: Tensor, baseline: str | float
) -> None:
    shape = (3, 16, 16)
    model, x, target = LinearModel(shape), inputs_for((2, *shape)), torch.tensor([1, 2])
    got = explain(
        model,
        x,
        "kernel_shap",
        target=target,
        segments=uneven_segments,
        baseline=baseline,
        n_samples=80,
        seed=5,
    )
    assert got.shape == (2, 1, 16, 16) and got.dtype == torch.float32
    expected = segment_contributions(model, x, P.baseline_images(x, baseline), uneven_segments, target)
    for values, exact in zip(map_values(got, uneven_segments), expected, strict=True):
        np.testing.assert_allclose(values, exact, atol=1e-4)


def test_lime_recovers_a_linear_model(uneven_segments: Tensor) -> None:
    shape = (1, 16, 16)
    model, x, target = LinearModel(shape), inputs_for((2, *shape)), torch.tensor([0, 1])
    expected = segment_contributions(model, x, torch.zeros_like(x), uneven_segments, target)
    # Without the ridge penalty the weighted fit of an exactly linear response is exact
    exact = explain(
        model, x, "lime", target=target, segments=uneven_segments, baseline="zero", alpha=0.0, n_samples=200
    )
    for values, truth in zip(map_values(exact, uneven_segments), expected, strict=True):
        np.testing.assert_allclose(values, truth, atol=1e-4)
    # lime_image's alpha=1 only shrinks the coefficients a little: same signs, same ordering in effect
    shrunk = explain(
        model, x, "lime", target=target, segments=uneven_segments, baseline="zero", n_samples=500
    )
    for values, truth in zip(map_values(shrunk, uneven_segments), expected, strict=True):
        assert np.corrcoef(values, truth)[0, 1] > 0.99
        np.testing.assert_allclose(values, truth, rtol=0.1, atol=0.05 * np.abs(truth).max())


def test_coalitions_follow_lime_and_the_shapley_kernel() -> None:
    counts, n = torch.tensor([10, 4]), 20000
    shapley = P.shapley_coalitions(counts, n, torch.Generator().manual_seed(0))
    assert shapley.shape == (2, n, 10) and shapley[1, :, 4:].eq(0).all()  # padding is never kept
    assert shapley[0, 0].eq(1).all() and shapley[0, 1].eq(0).all()  # the full and empty coalitions first
    k = torch.arange(1, 10, dtype=torch.float64)
    kernel = 9 / (k * (10 - k))
    sizes = torch.bincount(shapley[0, 2:].sum(1).long(), minlength=11)[1:10].double()
    torch.testing.assert_close(sizes / sizes.sum(), kernel / kernel.sum(), rtol=0, atol=0.01)
    assert shapley[0, 2:].mean(0).sub(0.5).abs().max() < 0.02  # given the size, every segment is as likely

    lime = P.lime_coalitions(counts, n, torch.Generator().manual_seed(0))
    assert lime[:, 0, :4].eq(1).all() and lime[1, :, 4:].eq(0).all()  # the unperturbed image first
    assert lime[0, 1:].mean(0).sub(0.5).abs().max() < 0.02


def test_lime_equals_sklearn_weighted_ridge_on_the_same_samples(mnist_model: nn.Module) -> None:
    x, target, n = inputs_for((2, 1, 28, 28)), torch.tensor([4, 9]), 150
    got = explain(mnist_model, x, "lime", target=target, segments="grid", grid=6, n_samples=n, seed=11)
    labels, counts = P.segment_images(x, "grid", grid=6)
    z = P.lime_coalitions(counts, n, P.seeded_generator(x, 11))
    scores = P.coalition_scores(mnist_model, x, target, labels, z, P.baseline_images(x, "mean"), 64)
    for b in range(2):
        zb = z[b].double().numpy()
        # lime_image: cosine distance to the unperturbed sample, kernel sqrt(exp(-d^2 / 0.25^2))
        distance = 1 - zb.sum(1) / (np.linalg.norm(zb, axis=1) * np.sqrt(zb.shape[1]) + 1e-300)
        weight = np.sqrt(np.exp(-(distance**2) / 0.25**2))
        ridge = Ridge(alpha=1.0).fit(zb, scores[b].double().numpy(), sample_weight=weight)
        np.testing.assert_allclose(map_values(got[b : b + 1], labels[b : b + 1])[0], ridge.coef_, atol=1e-6)


def test_lime_and_kernel_shap_give_informative_maps_on_a_28x28_digit(mnist_model: nn.Module) -> None:
    """The issue: Captum's default Lime gave all-zero maps on mnist_cnn and quickshift finds 1-3 segments
    on small images. The default grid must give many segments with distinct non-zero attributions."""
    x = digit_image()
    labels, counts = P.segment_images(x)  # the default below 64x64: a 7x7 grid
    assert int(counts[0]) == 49
    for method in ("lime", "kernel_shap"):
        values = map_values(explain(mnist_model, x, method, target=7), labels)[0]
        informative = np.unique(np.round(values[np.abs(values) > 1e-6 * np.abs(values).max()], 9))
        assert len(informative) >= 10, f"{method}: only {len(informative)} distinct non-zero segments"


# --- RISE --------------------------------------------------------------------------------------------------


class ConstantModel(nn.Module):
    """Logits that ignore the input: RISE's saliency is then the target probability times mean(M) / p."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(len(x), -1)


class RegionModel(nn.Module):
    """Logits ``(4 m - 2, 0)`` for ``m`` the mean of a square region: only that region matters, and the
    target's probability spans 0.12-0.88 (unsaturated) as ``m`` goes from 0 to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: Tensor) -> Tensor:
        region = x[:, :, 8:16, 4:12].mean(dim=(1, 2, 3))
        return torch.stack([self.scale * region - 2, torch.zeros_like(region)], 1)


def test_rise_is_the_probability_weighted_mean_of_its_masks() -> None:
    x = inputs_for((2, 3, 24, 24))
    saliency = explain(ConstantModel(), x, "rise", target=2, n_masks=1000, p=0.5)
    probability = torch.tensor([0.5, -1.0, 2.0]).softmax(0)[2]
    # E[M] = p, so the saliency is the constant probability, up to the sampling noise of 1000 masks
    assert ((saliency / probability) - 1).abs().max() < 0.2
    assert abs(saliency.mean() / probability - 1) < 0.05


def test_rise_highlights_the_region_the_model_uses() -> None:
    saliency = explain(RegionModel(), torch.ones(1, 1, 24, 24), "rise", target=0, n_masks=500, cells=6)[0, 0]
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[8:16, 4:12] = True
    assert saliency[inside].mean() > saliency[~inside].mean() + 0.03
    assert inside.flatten()[saliency.argmax()]


def test_rise_masks_are_shifted_upsampled_grids() -> None:
    grids = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    unshifted = P.rise_masks(grids, torch.tensor([[0, 0]]), 8, 8)
    assert unshifted.shape == (1, 8, 8) and unshifted.min() >= 0 and unshifted.max() <= 1
    assert (
        unshifted[0, 0, 0] == 1 and unshifted[0, 0, 7] < 0.5
    )  # in the kept top-left cell, towards the hidden one
    shifted = P.rise_masks(grids, torch.tensor([[2, 3]]), 8, 8)
    upsampled = torch.nn.functional.interpolate(
        grids[:, None], size=(12, 12), mode="bilinear", align_corners=False
    )[0, 0]
    torch.testing.assert_close(shifted[0], upsampled[2:10, 3:11])


# --- seeding, chunking, shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SEEDED)
def test_seed_makes_results_reproducible_and_another_seed_differs(
    mnist_model: nn.Module, method: str
) -> None:
    x = inputs_for((2, 1, 28, 28))
    first = explain(mnist_model, x, method, seed=3, **FAST[method])
    assert torch.equal(first, explain(mnist_model, x, method, seed=3, **FAST[method]))
    assert not torch.allclose(first, explain(mnist_model, x, method, seed=4, **FAST[method]))


def TinyCNN(channels: int) -> nn.Module:
    """The tests' tiny CNN (conftest.py), cheap for shape tests up to 224x224: a stride-4 first conv."""
    return SharedTinyCNN(channels, stride=4, batch_norm=False)


@pytest.mark.parametrize("method", ["occlusion", *SEEDED])
def test_chunk_size_does_not_change_results(method: str) -> None:
    torch.manual_seed(0)
    model, x = TinyCNN(1), inputs_for((3, 1, 28, 28))  # chunks of 7 straddle the images' perturbations
    small = explain(model, x, method, internal_batch_size=7, **FAST[method])
    large = explain(model, x, method, internal_batch_size=512, **FAST[method])
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (1, 3, 64, 64), (1, 3, 224, 224)])
@pytest.mark.parametrize("method", ["occlusion", *SEEDED])
def test_every_method_returns_one_float32_map_per_image(
    shape: tuple[int, int, int, int], method: str
) -> None:
    torch.manual_seed(0)
    attribution = explain(TinyCNN(shape[1]), smooth_inputs(shape), method, **FAST[method])
    assert attribution.shape == (shape[0], 1, *shape[2:]) and attribution.dtype == torch.float32
    assert torch.isfinite(attribution).all() and attribution.abs().max() > 0


# --- segmentation -------------------------------------------------------------------------------------------


def test_grid_segments_partition_the_image() -> None:
    labels = P.grid_segments(28, 32, 7, torch.device("cpu"))
    assert labels.unique().tolist() == list(range(49))
    assert labels[0, 0] == 0 and labels[27, 31] == 48 and labels[4, 0] == 7  # 28 rows: cells of 4


@pytest.mark.parametrize("channels", [1, 3])
def test_slic_is_the_default_from_64_pixels_and_finds_many_segments(channels: int) -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = torch.stack([torch.sin(6 * xx) * torch.cos(4 * yy), xx * yy, 1 - xx][:channels])[None]
    labels, counts = P.segment_images(image)
    assert labels.shape == (1, 64, 64) and 10 <= int(counts[0]) <= 80
    assert labels.unique().tolist() == list(range(int(counts[0])))
    grid_labels, _ = P.segment_images(image, "grid", grid=4)
    assert not torch.equal(labels, grid_labels)


def test_slic_warns_when_it_finds_only_a_few_superpixels() -> None:
    noise = inputs_for((1, 3, 64, 64))  # SLIC merges colour noise into one or two segments
    with pytest.warns(UserWarning, match="SLIC found only"):
        _, counts = P.segment_images(noise, "slic")
    assert int(counts[0]) < 10
    grid_counts = P.segment_images(noise, "slic", compactness=1000.0)[1]  # the suggested fix
    assert int(grid_counts[0]) >= 10


def test_bad_segments_are_rejected() -> None:
    x = inputs_for((2, 1, 16, 16))
    with pytest.raises(ConfigError, match="segments"):
        P.segment_images(x, "quickshift")
    with pytest.raises(ConfigError, match=r"\[B, H, W\]"):
        P.segment_images(x, torch.zeros(3, 16, 16, dtype=torch.long))
    with pytest.raises(ConfigError, match="baseline"):
        P.baseline_images(x, "noise")  # type: ignore[arg-type]


# ---------------------------------------------------------------- copies stored as the caller's inputs are


class LayoutRecorder(nn.Module):
    """Wraps a model and records, per call, whether its batch was stored channels_last (channel stride 1)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.channels_last = model, []

    def forward(self, x: Tensor) -> Tensor:
        self.channels_last.append(x.stride(1) == 1)
        return self.model(x)


def nhwc(x: Tensor) -> Tensor:
    """``x`` ``[B, C, H, W]`` stored as ``xailab.data.transforms.to_model_input`` stores model inputs: a
    permuted ``[B, H, W, C]`` tensor (channels_last; with one channel, the channel stride is 1)."""
    return x.clone(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels", [1, 3])
def test_in_layout_stores_copies_as_the_inputs_are(channels):
    from xailab.explain.batching import in_layout, inputs_channels_last

    x = inputs_for((4, channels, 6, 5))
    assert not inputs_channels_last(x) and inputs_channels_last(nhwc(x))
    assert in_layout(x, False) is x
    cl = in_layout(x, True)
    assert inputs_channels_last(cl) and torch.equal(cl, x)
    if channels == 1:  # the same bytes: a view, no copy
        assert cl.data_ptr() == x.data_ptr()
    assert in_layout(cl, True) is cl


@pytest.mark.parametrize("method", ["occlusion", "lime", "kernel_shap", "rise"])
def test_perturbed_copies_reach_the_model_in_the_inputs_layout(mnist_model, method):
    """Copies of channels_last inputs (what xailab's data pipeline gives) reach the model channels_last,
    which runs its convolutions faster on CPUs, as Captum's and lime's copies do; NCHW inputs give NCHW
    copies. The maps are equal up to float rounding (the convolution kernels differ)."""
    x = torch.cat([digit_image(), inputs_for((1, 1, 28, 28))])
    maps = {}
    for name, inputs in (("nchw", x), ("nhwc", nhwc(x))):
        model = LayoutRecorder(mnist_model)
        maps[name] = explain(model, inputs, method, target=7, internal_batch_size=16, **FAST[method])
        calls = model.channels_last[1:]  # the first call chose nothing: the target is given; occlusion's f(x)
        assert len(calls) > 1 and all(calls) == (name == "nhwc") and any(calls) == (name == "nhwc")
    scale = maps["nchw"].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(maps["nhwc"], maps["nchw"], rtol=1e-4, atol=1e-4 * scale)
