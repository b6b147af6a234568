"""Localisation metrics: known answers (a map equal to the mask, its complement, a uniform map), parity with
Quantus 0.6 on the same inputs, tolerance and ties, Focus on mosaics, and clear errors for bad masks."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from torch import Tensor, nn

from xailab.errors import ConfigError
from xailab.metrics import evaluate_explanations
from xailab.metrics.localisation import (
    LOCALISATION_METRICS,
    focus,
    mosaics,
    pointing_game,
    top_k_intersection,
)

pytestmark = pytest.mark.usefixtures("single_thread")

H = W = 10
K_AREA = 12  # every test mask below has at least this many pixels, so top-k with k = 12 can be perfect


def tiny_model(channels: int = 1, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    ).eval()


def masks(n: int = 5, seed: int = 0) -> Tensor:
    """Rectangles of different sizes and places, ``[n, 1, H, W]`` bool, each at least 12 pixels."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, 1, H, W, dtype=torch.bool)
    for i in range(n):
        h, w = int(torch.randint(3, 6, (1,), generator=g)), int(torch.randint(4, 7, (1,), generator=g))
        top, left = (
            int(torch.randint(0, H - h + 1, (1,), generator=g)),
            int(torch.randint(0, W - w + 1, (1,), generator=g)),
        )
        m[i, 0, top : top + h, left : left + w] = True
    return m


def scores(attributions: Tensor, mask: Tensor, **params) -> dict[str, Tensor]:
    x = torch.randn(mask.shape[0], 1, H, W)
    return evaluate_explanations(
        tiny_model(), x, None, attributions, metrics=list(LOCALISATION_METRICS), mask=mask, **params
    )


def test_a_map_equal_to_the_mask_scores_perfectly_on_every_metric():
    m = masks()
    got = scores(m.float(), m, k=K_AREA)
    for name in LOCALISATION_METRICS:
        torch.testing.assert_close(got[name], torch.ones(5), msg=name)


def test_the_complement_of_the_mask_scores_worst_on_every_metric():
    m = masks()
    got = scores((~m).float(), m, k=K_AREA)
    for name in LOCALISATION_METRICS:
        torch.testing.assert_close(got[name], torch.zeros(5), msg=name)


def test_a_uniform_map_scores_chance():
    m = masks()
    share = m.flatten(1).float().mean(1)  # the mask's share of the image: chance for a map that says nothing
    got = scores(torch.full((5, 1, H, W), 0.3), m, k=K_AREA)
    for name in (
        "pointing_game",
        "attribution_localisation",
        "relevance_mass_accuracy",
        "relevance_rank_accuracy",
        "top_k_intersection",
    ):
        torch.testing.assert_close(got[name], share, msg=name)
    torch.testing.assert_close(got["localisation_auc"], torch.full((5,), 0.5))
    weighted = scores(torch.full((5, 1, H, W), 0.3), m, weighted=True)["attribution_localisation"]
    torch.testing.assert_close(weighted, torch.ones(5))  # Kohlbrenner's size weighting: chance is 1
    x = torch.randn(5, 1, H, W)
    ci = top_k_intersection(
        None, x, None, torch.full((5, 1, H, W), 0.3), mask=m, k=K_AREA, concept_influence=True
    )
    torch.testing.assert_close(ci, torch.ones(5))


def test_random_maps_average_chance():
    """Over many random maps every metric's mean is chance (the mask's share; AUC 0.5)."""
    n = 400
    m = masks(1).expand(n, 1, H, W).clone()
    a = torch.rand(n, 1, H, W, generator=torch.Generator().manual_seed(1))
    share = float(m[0].float().mean())
    got = scores(a, m, k=K_AREA)
    for name in ("pointing_game", "relevance_rank_accuracy", "top_k_intersection"):
        assert abs(float(got[name].mean()) - share) < 0.06, name
    assert abs(float(got["localisation_auc"].mean()) - 0.5) < 0.02


def test_pointing_game_tolerance_grows_the_mask_by_euclidean_distance():
    m = torch.zeros(1, 1, H, W, dtype=torch.bool)
    m[0, 0, 4, 4] = True
    a = torch.zeros(1, 1, H, W)
    a[0, 0, 6, 6] = 1.0  # at distance sqrt(8) = 2.83 from the mask
    x = torch.zeros(1, 1, H, W)
    assert float(pointing_game(None, x, None, a, mask=m)) == 0.0
    assert float(pointing_game(None, x, None, a, mask=m, tolerance=2.5)) == 0.0
    assert float(pointing_game(None, x, None, a, mask=m, tolerance=3)) == 1.0


def test_ties_at_the_maximum_count_in_proportion():
    m = torch.zeros(1, 1, H, W, dtype=torch.bool)
    m[0, 0, 0, :5] = True
    a = torch.zeros(1, 1, H, W)
    a[0, 0, 0, 3:7] = 1.0  # four tied maxima, two of them in the mask
    assert float(pointing_game(None, torch.zeros(1, 1, H, W), None, a, mask=m)) == 0.5


def test_negative_relevance_is_left_out_where_the_papers_say():
    m = masks(2)
    a = torch.where(m, 1.0, -0.5)  # negative outside: only the positive part counts
    got = scores(a, m)
    torch.testing.assert_close(got["attribution_localisation"], torch.ones(2))
    torch.testing.assert_close(got["relevance_mass_accuracy"], torch.ones(2))
    x = torch.randn(2, 1, H, W)
    signed = evaluate_explanations(
        tiny_model(), x, None, a, metrics=["relevance_mass_accuracy"], mask=m, positive=False
    )["relevance_mass_accuracy"]
    inside = m.flatten(1).sum(1).double()
    expected = inside / (inside - 0.5 * (H * W - inside))
    torch.testing.assert_close(signed, expected.float())


# ---------------------------------------------------------------------------------------------------------
# Parity with Quantus 0.6 (continuous maps: no ties, where the two differ on purpose)
# ---------------------------------------------------------------------------------------------------------


def quantus_scores(metric, a: Tensor, m: Tensor) -> np.ndarray:
    model = tiny_model()
    x = torch.randn(a.shape[0], 1, H, W, generator=torch.Generator().manual_seed(9))
    y = torch.zeros(a.shape[0], dtype=torch.long)
    out = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=a.numpy().astype(np.float32),
        s_batch=m.numpy().astype(np.float32),
        device="cpu",
    )
    return np.asarray(out, dtype=np.float64)


def q(cls, **kwargs):
    return cls(normalise=False, abs=False, disable_warnings=True, **kwargs)


@pytest.mark.parametrize("signed", [False, True])
def test_parity_with_quantus(signed):
    m = masks(6, seed=3)
    g = torch.Generator().manual_seed(4)
    a = torch.rand(6, 1, H, W, generator=g) + 0.5 * m  # continuous and leaning towards the mask
    if signed:
        a = a - 0.4
    ours = scores(a, m, k=15)
    cases = {
        "pointing_game": q(quantus.PointingGame),
        "relevance_rank_accuracy": q(quantus.RelevanceRankAccuracy),
        "top_k_intersection": q(quantus.TopKIntersection, k=15),
        "localisation_auc": q(quantus.AUC),
        "attribution_localisation": q(quantus.AttributionLocalisation, positive_attributions=True),
    }
    if not signed:  # Quantus sums signed relevance; on non-negative maps that is the paper's positive part
        cases["relevance_mass_accuracy"] = q(quantus.RelevanceMassAccuracy)
    for name, metric in cases.items():
        np.testing.assert_allclose(ours[name].numpy(), quantus_scores(metric, a, m), atol=1e-6, err_msg=name)
    if signed:
        rma = evaluate_explanations(
            tiny_model(),
            torch.randn(6, 1, H, W),
            None,
            a,
            metrics=["relevance_mass_accuracy"],
            mask=m,
            positive=False,
        )["relevance_mass_accuracy"]
        theirs = quantus_scores(q(quantus.RelevanceMassAccuracy), a, m)
        np.testing.assert_allclose(rma.numpy(), theirs, rtol=1e-5)
    ci = top_k_intersection(None, None, None, a, mask=m, k=15, concept_influence=True)
    theirs = quantus_scores(q(quantus.TopKIntersection, k=15, concept_influence=True), a, m)
    np.testing.assert_allclose(ci.numpy(), theirs, rtol=1e-6)


def test_where_quantus_departs_from_the_papers_xailab_follows_the_papers():
    """The documented departures, each shown on the same inputs: (1) tied maxima — Quantus's pointing game
    counts a hit if any tied pixel hits, xailab the share that hit (the chance that one picked at random
    does); (2) Kohlbrenner's size weighting ``mu * S_tot / S_in`` — Quantus multiplies by ``S_in`` over the
    size of ``x_batch[2:]`` (the batch array without its first two images) instead."""
    m = masks(6, seed=3)
    tied = 0.5 * torch.rand(6, 1, H, W, generator=torch.Generator().manual_seed(5))
    flat, inside = tied.view(6, -1), m.view(6, -1)
    for i in range(6):  # four tied maxima: one mask pixel and three outside it
        flat[i, inside[i].nonzero()[0]] = 1.0
        flat[i, (~inside[i]).nonzero()[:3].flatten()] = 1.0
    np.testing.assert_array_equal(quantus_scores(q(quantus.PointingGame), tied, m), np.ones(6))
    torch.testing.assert_close(scores(tied, m)["pointing_game"], torch.full((6,), 0.25))

    a = torch.rand(6, 1, H, W, generator=torch.Generator().manual_seed(4)) + 0.5 * m
    plain = quantus_scores(q(quantus.AttributionLocalisation, positive_attributions=True), a, m)
    weighted = quantus_scores(
        q(quantus.AttributionLocalisation, positive_attributions=True, weighted=True), a, m
    )
    area = m.flatten(1).sum(1).double().numpy()
    np.testing.assert_allclose(weighted, plain * area / ((6 - 2) * H * W), rtol=1e-6)  # Quantus's weighting
    ours = scores(a, m, weighted=True)["attribution_localisation"]
    np.testing.assert_allclose(ours.numpy(), plain * (H * W) / area, rtol=1e-5)  # the paper's


# ---------------------------------------------------------------------------------------------------------
# Focus on mosaics
# ---------------------------------------------------------------------------------------------------------


def test_mosaics_hold_two_target_tiles_and_focus_reads_their_share():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 4, 4, generator=g)
    labels = torch.arange(12) % 3
    mos = mosaics(images, labels, n=8, seed=1)
    assert mos.inputs.shape == (8, 1, 8, 8) and mos.mask.shape == (8, 1, 8, 8)
    assert (mos.mask.flatten(1).sum(1) == 32).all()  # two of the four 4x4 tiles
    for i in range(8):
        tiles = [
            mos.inputs[i, :, :4, :4],
            mos.inputs[i, :, :4, 4:],
            mos.inputs[i, :, 4:, :4],
            mos.inputs[i, :, 4:, 4:],
        ]
        for t, j in zip(tiles, mos.index[i].tolist(), strict=True):
            torch.testing.assert_close(t, images[j])
        assert (labels[mos.index[i]] == mos.targets[i]).sum() == 2
    again = mosaics(images, labels, n=8, seed=1)
    assert torch.equal(again.index, mos.index)
    perfect = focus(None, mos.inputs, mos.targets, mos.mask.float(), mask=mos.mask)
    uniform = focus(None, mos.inputs, mos.targets, torch.ones(8, 1, 8, 8), mask=mos.mask)
    complement = focus(None, mos.inputs, mos.targets, (~mos.mask).float(), mask=mos.mask)
    torch.testing.assert_close(perfect, torch.ones(8))
    torch.testing.assert_close(complement, torch.zeros(8))
    torch.testing.assert_close(uniform, torch.full((8,), 0.5))


def quadrant_flags(mos) -> list[tuple[int, int, int, int]]:
    """Quantus's ``custom_batch`` for Focus: per mosaic, whether each tile (top left, top right, bottom left,
    bottom right) shows the target class, read from the mosaic's mask."""
    h, w = mos.mask.shape[-2] // 2, mos.mask.shape[-1] // 2
    corners = mos.mask[:, 0, ::h, ::w].flatten(1)  # [M, 4]: the tiles' top-left pixels, in reading order
    return [tuple(int(v) for v in row) for row in corners]


@pytest.mark.parametrize("normalise", [False, True])
def test_focus_matches_quantus_focus_on_the_same_mosaics(normalise):
    """Quantus 0.6's ``Focus`` (positive relevance on the target tiles over all positive relevance) on the
    same mosaics and maps: equal, for non-negative and signed maps, with and without its default max
    normalisation (a positive rescaling, which the ratio ignores)."""
    g = torch.Generator().manual_seed(2)
    images = torch.rand(16, 1, 5, 5, generator=g)
    labels = torch.arange(16) % 4
    mos = mosaics(images, labels, n=7, seed=3)
    flags = quadrant_flags(mos)
    assert all(sum(f) == 2 for f in flags)
    model = tiny_model(classes=4)
    for signed in (False, True):
        a = torch.rand(7, 1, 10, 10, generator=g) + 0.3 * mos.mask  # continuous, leaning to the target tiles
        if signed:
            a = a - 0.5
        ours = focus(model, mos.inputs, mos.targets, a, mask=mos.mask)
        metric = quantus.Focus(normalise=normalise, abs=False, disable_warnings=True)
        theirs = metric(
            model=model,
            x_batch=mos.inputs.numpy(),
            y_batch=mos.targets.numpy(),
            a_batch=a.numpy().astype(np.float32),
            custom_batch=flags,
            device="cpu",
        )
        np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-5)
        assert float(ours.mean()) > 0.55  # the lean towards the target tiles shows


def test_focus_departs_from_quantus_only_on_a_map_without_positive_relevance():
    """The documented difference: a map with no positive relevance localises nothing. xailab says NaN (as
    attribution localisation does), Quantus 0 (its ``+ 1e-9`` in the denominator); other maps agree."""
    images = torch.rand(8, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    mos = mosaics(images, torch.arange(8) % 2, n=2, seed=0)
    a = -torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    a[1, 0, 0, 0] = 1.0  # one positive pixel: its tile decides the score
    ours = focus(None, mos.inputs, mos.targets, a, mask=mos.mask)
    theirs = quantus.Focus(normalise=False, abs=False, disable_warnings=True)(
        model=tiny_model(classes=2),
        x_batch=mos.inputs.numpy(),
        y_batch=mos.targets.numpy(),
        a_batch=a.numpy(),
        custom_batch=quadrant_flags(mos),
        device="cpu",
    )
    assert torch.isnan(ours[0]) and theirs[0] == 0.0
    expected = float(mos.mask[1, 0, 0, 0])  # 1 when the top-left tile is a target tile, else 0
    assert float(ours[1]) == expected
    np.testing.assert_allclose(theirs[1], expected, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_masks_raise_clear_errors():
    m = masks(2)
    a = torch.rand(2, 1, H, W)
    with pytest.raises(ConfigError, match=r"mask has shape \(2, 1, 5, 5\).*\[2, 1, 10, 10\]"):
        scores(a, torch.ones(2, 1, 5, 5, dtype=torch.bool))
    empty = m.clone()
    empty[1] = False
    with pytest.raises(ConfigError, match=r"image\(s\) \[1\] is empty"):
        scores(a, empty)
    with pytest.raises(ConfigError, match="only 0 and 1"):
        scores(a, m.float() * 2)
    with pytest.raises(ConfigError, match="mask="):
        evaluate_explanations(tiny_model(), torch.randn(2, 1, H, W), None, a, metrics=["pointing_game"])
    with pytest.raises(ConfigError, match="k=0"):
        scores(a, m, k=0)
    with pytest.raises(ConfigError, match="tolerance"):
        scores(a, m, tolerance=-1)
