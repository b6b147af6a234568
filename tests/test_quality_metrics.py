"""Explanation-quality metrics: known answers on models whose faithful explanation is known (a linear model),
the contract of every registered metric, errors, summaries and agreement."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import Tensor, nn

from xailab.errors import ConfigError, UnknownNameError
from xailab.explain import explain, preserved_state
from xailab.metrics import (
    METRICS,
    agreement_matrix,
    evaluate_explanations,
    linear_imputation,
    list_metrics,
    model_randomisation,
    removal_curve,
    spearman,
    summarise,
)
from xailab.metrics.base import score_explanations
from xailab.metrics.localisation import LOCALISATION_METRICS
from xailab.metrics.randomisation import random_logit, random_off_targets

pytestmark = pytest.mark.usefixtures("single_thread")

H = W = 8


class Linear(nn.Module):
    """Logit 0 is ``w . x`` (no bias), logit 1 is 0: its exact attribution is ``w * x``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.view(1, -1))

    def forward(self, x: Tensor) -> Tensor:
        score = x.flatten(1) @ self.weight.t()
        return torch.cat([score, torch.zeros_like(score)], 1)


def linear_case(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(H * W, generator=g)
    x = torch.rand(n, 1, H, W, generator=g) + 0.1
    return Linear(weight).eval(), x, torch.zeros(n, dtype=torch.long), weight.view(1, 1, H, W) * x


def tiny_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * H * W, classes),
    ).eval()


# ---------------------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------------------


def test_perfect_attribution_of_a_linear_model_has_the_best_deletion_curve():
    model, x, y, perfect = linear_case()
    curve = removal_curve(model, x, y, perfect, n_steps=H * W, softmax=False)
    # the exact curve: the logit minus the largest contributions removed so far
    removed = perfect.flatten(1).sort(1, descending=True).values.cumsum(1)
    full = model(x)[:, 0].detach()
    expected = torch.cat([full[:, None], full[:, None] - removed], 1)
    torch.testing.assert_close(curve, expected, atol=1e-4, rtol=1e-4)
    best = evaluate_explanations(model, x, y, perfect, metrics=["deletion_auc"], softmax=False)[
        "deletion_auc"
    ]
    for seed in range(5):
        other = torch.randn(perfect.shape, generator=torch.Generator().manual_seed(seed))
        worse = evaluate_explanations(model, x, y, other, metrics=["deletion_auc"], softmax=False)
        assert (best <= worse["deletion_auc"] + 1e-5).all()
    reversed_ = evaluate_explanations(model, x, y, -perfect, metrics=["insertion_auc", "deletion_auc"],
                                      softmax=False, insertion_baseline="zero")  # fmt: skip
    perfect_ins = evaluate_explanations(model, x, y, perfect, metrics=["insertion_auc"], softmax=False,
                                        insertion_baseline="zero")  # fmt: skip
    assert (perfect_ins["insertion_auc"] >= reversed_["insertion_auc"]).all()
    assert (reversed_["deletion_auc"] > best).all()


def test_random_attribution_gives_the_expected_deletion_curve():
    # a random order removes on average k/N of every contribution: the expected area is f(x) / 2
    model, x, y, _ = linear_case(n=1)
    reps = 400
    xs, ys = x.expand(reps, -1, -1, -1), y.expand(reps)
    noise = torch.rand(reps, 1, H, W, generator=torch.Generator().manual_seed(1))
    auc = evaluate_explanations(model, xs, ys, noise, metrics=["deletion_auc"], softmax=False, n_steps=16)
    full = float(model(x)[0, 0].detach())
    standard_error = float(auc["deletion_auc"].std()) / math.sqrt(reps)
    assert abs(float(auc["deletion_auc"].mean()) - full / 2) < 4 * standard_error


def test_infidelity_and_sensitivity_of_exact_gradients_of_a_linear_model_are_zero():
    model, x, y, _ = linear_case()
    gradient = model.weight.detach().view(1, 1, H, W).expand_as(x)
    scores = evaluate_explanations(model, x, y, gradient, metrics=["infidelity"])
    assert scores["infidelity"].abs().max() < 1e-8
    # the gradient does not depend on the input, so nothing changes under perturbation
    scores = evaluate_explanations(
        model, x, y, method="saliency", metrics=["max_sensitivity", "avg_sensitivity"]
    )
    assert scores["max_sensitivity"].abs().max() < 1e-6 and scores["avg_sensitivity"].abs().max() < 1e-6


def test_gini_of_a_one_hot_map_is_maximal_and_of_a_constant_map_zero():
    model, x, y, _ = linear_case(n=2)
    one_hot = torch.zeros(2, 1, H, W)
    one_hot[:, 0, 3, 5] = 1.0
    constant = torch.ones(2, 1, H, W)
    n = H * W
    sparse = evaluate_explanations(model, x, y, one_hot, metrics=["sparseness", "complexity"])
    flat = evaluate_explanations(model, x, y, constant, metrics=["sparseness", "complexity"])
    torch.testing.assert_close(sparse["sparseness"], torch.full((2,), 1 - 1 / n), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat["sparseness"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse["complexity"], torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat["complexity"], torch.full((2,), math.log(n)), atol=1e-5, rtol=0)
    random = torch.rand(2, 1, H, W)
    assert (
        evaluate_explanations(model, x, y, random, metrics=["sparseness"])["sparseness"] < 1 - 1 / n
    ).all()


def test_faithfulness_correlation_of_the_exact_attribution_of_a_linear_model_is_one():
    model, x, y, perfect = linear_case()
    scores = evaluate_explanations(
        model, x, y, perfect, metrics=["faithfulness_correlation"], baseline="zero", n_runs=20, subset_size=10
    )
    torch.testing.assert_close(scores["faithfulness_correlation"], torch.ones(4), atol=1e-5, rtol=0)


def test_linear_imputation_recovers_a_linear_ramp_inside_the_image():
    rows, cols = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    ramp = (0.3 * rows - 0.7 * cols + 2.0).expand(2, 3, 10, 10).double()
    mask = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    mask[:, :, 2:8, 3:7] = True
    filled = linear_imputation(ramp.masked_fill(mask, 99.0), mask)
    torch.testing.assert_close(filled, ramp, atol=1e-6, rtol=0)


def test_randomisation_sanity_check_fails_a_model_independent_map_and_passes_gradients():
    model = tiny_cnn()
    x = torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)

    def image_only(model, inputs, targets):  # looks only at the image, never at the model
        return inputs.abs().sum(1, keepdim=True)

    blind = model_randomisation(model, x, y, explain_fn=image_only)
    torch.testing.assert_close(blind.mean_spearman, torch.ones(len(blind.layers), dtype=torch.float32))
    torch.testing.assert_close(blind.mean_ssim, torch.ones(len(blind.layers), dtype=torch.float32))
    faithful = model_randomisation(model, x, y, method="saliency")
    assert faithful.layers == ["5", "2", "0"]  # cascading from the top layer down
    assert faithful.mean_spearman[-1] < 0.5
    assert faithful.maps.shape == (4, 4, 1, H, W)  # original + 3 stages, 4 example images
    off_class = evaluate_explanations(model, x, y, method="saliency", metrics=["random_logit"])
    assert (off_class["random_logit"] < 0.99).all()


def test_random_logit_of_a_class_blind_map_is_one():
    model = tiny_cnn()
    x = torch.randn(3, 1, H, W, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(3, dtype=torch.long)
    blind = random_logit(model, x, y, x.abs(), explain_fn=lambda model, inputs, targets: inputs.abs())
    torch.testing.assert_close(blind, torch.ones(3))
    targets = torch.arange(3).repeat(100)
    off = random_off_targets(targets, 3, seed=0)
    assert (off != targets).all() and set(off.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------------------
# Contract of every registered metric
# ---------------------------------------------------------------------------------------------------------

CHEAP = {
    "max_sensitivity": {"n_samples": 3},
    "avg_sensitivity": {"n_samples": 3},
    "faithfulness_correlation": {"n_runs": 8, "subset_size": 8},
    "infidelity": {"n_samples": 8},
    "road": {"percentages": (20, 60)},
}
# The localisation metrics score against a ground-truth mask [B, 1, H, W] (tests/test_localisation.py).
GROUND_TRUTH = torch.zeros(5, 1, H, W, dtype=torch.bool)
GROUND_TRUTH[:, :, 2:5, 3:7] = True
CHEAP.update({name: {"mask": GROUND_TRUTH} for name in (*LOCALISATION_METRICS, "focus")})


@pytest.mark.parametrize("name", list_metrics())
def test_every_metric_gives_one_finite_repeatable_score_per_image(name):
    model = tiny_cnn()
    model.train()  # the modes must come back as they were
    x = torch.randn(5, 1, H, W, generator=torch.Generator().manual_seed(3))
    first = evaluate_explanations(model, x, None, method="saliency", metrics=[name], **CHEAP.get(name, {}))
    again = evaluate_explanations(model, x, None, method="saliency", metrics=[name], **CHEAP.get(name, {}))
    assert model.training and all(m.training for m in model.modules())
    assert first[name].shape == (5,) and first[name].dtype == torch.float32
    assert torch.isfinite(first[name]).all()
    torch.testing.assert_close(first[name], again[name])
    assert METRICS.get(name).better in ("higher", "lower", "none")


def test_scores_do_not_depend_on_the_batch_size():
    model = tiny_cnn()
    x = torch.randn(6, 1, H, W, generator=torch.Generator().manual_seed(4))
    a = torch.randn(6, 1, H, W, generator=torch.Generator().manual_seed(5))
    names = ["deletion_auc", "insertion_auc", "pixel_flipping", "infidelity"]
    small = evaluate_explanations(model, x, None, a, metrics=names, batch_size=7)
    large = evaluate_explanations(model, x, None, a, metrics=names, batch_size=1000)
    for name in names:
        torch.testing.assert_close(small[name], large[name], atol=1e-5, rtol=1e-5)


# Metrics that score a map's ranking or shape, not its unit (infidelity once its least-squares scale is fitted)
SCALE_FREE = {
    "sparseness": {},
    "complexity": {},
    "deletion_auc": {},
    "insertion_auc": {},
    "pixel_flipping": {},
    "faithfulness_correlation": {"n_runs": 20},
    "road": {"percentages": (10, 50, 90)},
    "infidelity": {"normalise": True},
}
SCALES = (1e-6, 1e-3, 1e3)


@pytest.mark.parametrize("name", SCALE_FREE)
def test_scores_do_not_depend_on_the_scale_of_the_map(name):
    model, x = tiny_cnn(), torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(3))
    a = torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(4)).relu()  # ties at 0
    y = model(x).argmax(1)
    base = evaluate_explanations(model, x, y, a, metrics=[name], **SCALE_FREE[name])[name]
    for scale in SCALES:
        scaled = evaluate_explanations(model, x, y, a * scale, metrics=[name], **SCALE_FREE[name])[name]
        torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5, msg=f"{name} at scale {scale}")


@pytest.mark.parametrize(
    "name", ["max_sensitivity", "avg_sensitivity", "random_logit", "model_randomisation"]
)
def test_scores_of_re_explaining_metrics_do_not_depend_on_the_scale_of_the_maps(name):
    model, x = tiny_cnn(), torch.randn(4, 1, H, W, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)

    def scaled(scale: float):
        return lambda m, inputs, targets: scale * explain(m, inputs, "saliency", targets)

    with preserved_state(model):
        base = score_explanations(model, x, y, explain(model, x, "saliency", y), [name], scaled(1.0))[name]
        for scale in SCALES:
            a = scale * explain(model, x, "saliency", y)
            got = score_explanations(model, x, y, a, [name], scaled(scale))[name]
            torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-5, msg=f"{name} at scale {scale}")


def test_sparseness_of_a_small_valued_map_is_that_of_the_map():
    # the case: an absolute epsilon made a 1e-6-scaled map look far less sparse (0.80 -> 0.43)
    model, x, y, perfect = linear_case()
    a = perfect.abs() ** 4  # a concentrated map
    one = evaluate_explanations(model, x, y, a, metrics=["sparseness"])["sparseness"]
    tiny = evaluate_explanations(model, x, y, a * 1e-6, metrics=["sparseness"])["sparseness"]
    assert float(one.min()) > 0.5
    torch.testing.assert_close(tiny, one, rtol=1e-5, atol=1e-6)


def test_superpixel_steps_and_baselines():
    model, x, y, perfect = linear_case()
    for baseline in ("zero", "mean", "blur", 0.5):
        grid = removal_curve(model, x, y, perfect, n_steps=4, segments="grid", grid=4, baseline=baseline)
        assert grid.shape == (4, 5) and torch.isfinite(grid).all()
    # with one superpixel per pixel, superpixel steps are pixel steps
    labels = torch.arange(H * W).view(H, W)
    pixels = removal_curve(model, x, y, perfect, n_steps=8)
    torch.testing.assert_close(removal_curve(model, x, y, perfect, n_steps=8, segments=labels), pixels)


def test_errors_name_the_problem():
    model, x, y, perfect = linear_case()
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate_explanations(model, x, y)
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate_explanations(model, x, y, perfect, method="saliency")
    with pytest.raises(ConfigError, match="need method"):
        evaluate_explanations(model, x, y, perfect, metrics=["max_sensitivity"])
    with pytest.raises(UnknownNameError, match="deletion_auc"):
        evaluate_explanations(model, x, y, perfect, metrics=["deletion_acu"])
    with pytest.raises(ConfigError, match="n_stepz"):
        evaluate_explanations(model, x, y, perfect, metrics=["deletion_auc"], n_stepz=3)
    with pytest.raises(ConfigError, match=r"\[4, 1, 8, 8\]"):
        evaluate_explanations(model, x, y, perfect[:2], metrics=["sparseness"])
    with pytest.raises(ConfigError, match="baseline"):
        evaluate_explanations(model, x, y, perfect, metrics=["deletion_auc"], baseline="purple")


# ---------------------------------------------------------------------------------------------------------
# Summaries, rank correlation and agreement
# ---------------------------------------------------------------------------------------------------------


def test_summarise_gives_a_seeded_bootstrap_interval_around_the_mean():
    scores = {"m": torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 10.0])}
    s = summarise(scores)
    assert s["m"]["n"] == 5 and s["m"]["mean"] == pytest.approx(4.0)
    assert s["m"]["ci_low"] < 4.0 < s["m"]["ci_high"]
    assert summarise(scores) == s
    assert summarise({"m": torch.full((3,), float("nan"))})["m"]["n"] == 0


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()
    b = torch.randn(3, 40, generator=g)
    expected = [scipy.stats.spearmanr(p, q).statistic for p, q in zip(a.numpy(), b.numpy(), strict=True)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float64))


def test_agreement_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 1, H, W, generator=g)
    other = torch.randn(4, 1, H, W, generator=g)
    result = agreement_matrix({"a": a, "minus_a": -a, "other": other}, k_fraction=0.25)
    assert result["methods"] == ["a", "minus_a", "other"]
    for key in ("spearman", "topk_iou"):
        m = result[key]
        assert m.shape == (3, 3)
        torch.testing.assert_close(m, m.t())
        torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
        assert m[0, 1] == pytest.approx(1.0)  # by magnitude, a sign flip is full agreement
        assert m[0, 2] < 0.6


class _LayoutRecorder(nn.Module):
    """Records, per call, whether the batch reaching the model is stored channels_last (channel stride 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.channels_last = model, []

    def forward(self, x: Tensor) -> Tensor:
        self.channels_last.append(x.stride(1) == 1 and x.shape[0] > 1)
        return self.model(x)


@pytest.mark.parametrize("name", ["deletion", "pixel_flipping", "faithfulness", "road", "infidelity"])
def test_metric_copies_reach_the_model_in_the_inputs_layout(name):
    """The metrics' perturbed copies of channels_last inputs (xailab's data pipeline) reach the model
    channels_last, as the explanation methods' do (batching.in_layout), and score as NCHW copies do."""
    from xailab.metrics.faithfulness import (
        faithfulness_correlation,
        infidelity,
        pixel_flipping_curve,
        removal_curve,
        road_curve,
    )

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 2])
    run = {
        "deletion": lambda m, i: removal_curve(m, i, t, a, n_steps=4, batch_size=8),
        "pixel_flipping": lambda m, i: pixel_flipping_curve(m, i, t, a, pixels_per_step=16, batch_size=8),
        "faithfulness": lambda m, i: faithfulness_correlation(
            m, i, t, a, n_runs=6, subset_size=8, batch_size=8
        ),
        "road": lambda m, i: road_curve(m, i, t, a, percentages=(10.0, 50.0), batch_size=8),
        "infidelity": lambda m, i: infidelity(m, i, t, a, n_samples=4, batch_size=8),
    }[name]
    out = {}
    for layout, inputs in (("nchw", x), ("nhwc", x.clone(memory_format=torch.channels_last))):
        model = _LayoutRecorder(net)
        out[layout] = run(model, inputs)
        assert any(model.channels_last) == (layout == "nhwc"), (layout, model.channels_last)
    torch.testing.assert_close(out["nhwc"], out["nchw"], rtol=1e-4, atol=1e-5)
