"""The metrics' fast mode (``precision="auto"``): bf16 autocast of the forward passes of perturbed copies only
where the autotuner measured it faster (timings injected, so nothing depends on this machine's speed), in the
chunk measured fastest at that precision; exact fp32 by default; explicit settings win; the off switch; the
target class chosen in fp32; fast values within the documented tolerance of exact ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from conftest import TinyCNN
from xailab import autotune
from xailab.autotune import Config
from xailab.metrics import assess, evaluate_explanations
from xailab.metrics.base import FAST_MODE_TOLERANCE, METRICS, ForwardMode, forward_mode

pytestmark = pytest.mark.usefixtures("single_thread")

# Every registered metric that scores perturbed copies (the ones a fast mode applies to), with settings that
# keep the test small.
COPY_METRICS = {
    "deletion_auc": {"n_steps": 8},
    "insertion_auc": {"n_steps": 8},
    "pixel_flipping": {"pixels_per_step": 12},
    "faithfulness_correlation": {"n_runs": 30, "subset_size": 16},  # 180 copies: more than one chunk
    "road": {"percentages": tuple(range(5, 100, 10)), "noise": 0.0},
    "infidelity": {"n_samples": 8},
}


class Recording(TinyCNN):
    """The tests' tiny CNN ``[B, 1, 12, 12] -> [B, 4]`` recording, per forward call, whether bf16 autocast
    was on and how many images it got. ``bf16_class``: under autocast, add a large constant to that class's
    logit (a bf16 path that would pick another class; it does not change any gradient)."""

    def __init__(self, bf16_class: int | None = None) -> None:
        super().__init__(in_channels=1, classes=4)
        self.calls: list[tuple[bool, int]] = []
        self.bf16_class = bf16_class

    def forward(self, x: Tensor) -> Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        self.calls.append((autocast, x.shape[0]))
        out = super().forward(x)
        if autocast and self.bf16_class is not None:
            out = out + 100.0 * nn.functional.one_hot(torch.tensor(self.bf16_class), out.shape[1])
        return out


def calibrated(model: nn.Module, shape: tuple[int, ...] = (16, 1, 12, 12)) -> nn.Module:
    """``model`` with BatchNorm statistics of one noise batch and its classifier's weights scaled by 10, in
    eval mode: its logits differ by several units between inputs (an untrained model's barely move), so
    the probabilities and predicted classes the metrics score change as pixels are removed."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
        model.fc.weight.mul_(10.0)
    return model.eval()


def bf16_fast(pass_name: str, c: Config) -> float:
    """Injected seconds per image: bf16 twice as fast and fastest at 32 images; fp32 fastest at 128."""
    peak = 6 if c.precision == "bf16" else 8
    return 1e-3 * (0.5 if c.precision == "bf16" else 1) * (1 + abs(c.batch.bit_length() - peak) * 0.05)


def bf16_slow(pass_name: str, c: Config) -> float:
    """Injected seconds per image: bf16 eight times slower (emulated), fp32 fastest at 64 images."""
    return 1e-3 * (8 if c.precision == "bf16" else 1) * (1 + abs(c.batch.bit_length() - 7) * 0.05)


def injected(seconds_per_image: Callable[[str, Config], float]) -> Callable:
    """A ``tune`` timer giving ``seconds_per_image`` per image of each call, running nothing."""
    return lambda pass_name, config, run: seconds_per_image(pass_name, config) * config.batch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Autotuning on, with a private cache."""
    monkeypatch.setenv("XAILAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XAILAB_AUTOTUNE", "1")
    return tmp_path / "autotune"


@pytest.fixture
def data() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A calibrated recording model, 6 seeded images ``[6, 1, 12, 12]``, their fp32 classes and a seeded
    map per image."""
    torch.manual_seed(0)
    model = calibrated(Recording())
    x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    maps = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    model.calls.clear()
    return model, x, y, maps


def tuned(model: nn.Module, x: Tensor, timings: Callable[[str, Config], float]) -> autotune.Tuning:
    """The explanation passes of ``model`` tuned on ``x`` with injected timings (cached, as the metrics
    will find them)."""
    return autotune.tune(model, x.shape, x.device, autotune.EXPLAIN_PASSES, timer=injected(timings), sample=x)


def scores(model, x, y, maps, **kwargs) -> dict[str, Tensor]:
    params = {k: v for p in COPY_METRICS.values() for k, v in p.items()}
    return evaluate_explanations(model, x, y, maps, metrics=list(COPY_METRICS), **params, **kwargs)


def test_every_metric_that_scores_copies_is_covered():
    """A new copy-scoring metric must be added here (and so tested in fast mode)."""
    assert {name for name in METRICS.names() if METRICS.get(name).scores_copies} == set(COPY_METRICS)


def test_exact_fp32_is_the_default_and_auto_is_bf16_only_where_measured_faster(cache, data):
    model, x, y, maps = data
    tuning = tuned(model, x, bf16_fast)
    assert tuning.choices["forward"] == Config("bf16", False, 32) and tuning.bf16_accurate
    exact = scores(model, x, y, maps)
    assert model.calls and not any(on for on, _ in model.calls)  # default: never under autocast
    assert max(n for _, n in model.calls) == 128  # the chunk measured fastest in fp32, not bf16's 32
    model.calls.clear()
    fast = scores(model, x, y, maps, precision="auto")
    assert all(on for on, _ in model.calls)  # every forward pass of copies under bf16 autocast
    assert max(n for _, n in model.calls) == 32  # in bf16's fastest chunk
    forced = scores(model, x, y, maps, precision="bf16")
    assert all(torch.equal(fast[m], forced[m]) for m in COPY_METRICS)  # auto resolved to bf16
    assert any(not torch.equal(fast[m], exact[m]) for m in COPY_METRICS)  # and bf16 did run
    assert forward_mode(model, x, "auto") == forward_mode(model, x, "bf16")


def test_auto_stays_exact_where_bf16_is_slower(cache, data):
    model, x, y, maps = data
    tuned(model, x, bf16_slow)
    exact = scores(model, x, y, maps)
    model.calls.clear()
    auto = scores(model, x, y, maps, precision="auto")
    assert not any(on for on, _ in model.calls)
    assert all(torch.equal(auto[m], exact[m]) for m in COPY_METRICS)  # bit for bit
    assert forward_mode(model, x, "auto") == ForwardMode("fp32", 64)


def test_auto_stays_exact_when_bf16_breaks_the_accuracy_guard(cache, data):
    _, x, y, maps = data

    class Broken(Recording):
        """bf16 adds a large input-dependent term to every logit: its maps lose the rank correlation."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("r", torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(4)))

        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            if torch.is_autocast_enabled(x.device.type):
                out = out + 500 * (x**2 * self.r).sum((1, 2, 3))[:, None]
            return out

    torch.manual_seed(0)
    model = calibrated(Broken())
    tuning = tuned(model, x, bf16_fast)
    assert tuning.rank_correlation is not None and tuning.rank_correlation < autotune.RANK_GUARD
    model.calls.clear()
    scores(model, x, y, maps, precision="auto")
    assert model.calls and not any(on for on, _ in model.calls)
    assert forward_mode(model, x, "bf16").precision == "bf16"  # an explicit bf16 is obeyed


def test_explicit_settings_win(cache, data):
    model, x, y, maps = data
    tuned(model, x, bf16_fast)
    scores(model, x, y, maps, precision="auto", batch_size=7)
    assert all(on for on, _ in model.calls) and max(n for _, n in model.calls) == 7  # the given chunk
    model.calls.clear()
    scores(model, x, y, maps, precision="fp32")
    assert not any(on for on, _ in model.calls)
    with pytest.raises(autotune.ConfigError, match="precision='fp16'"):
        scores(model, x, y, maps, precision="fp16")


def test_the_off_switch_measures_nothing_and_keeps_the_fixed_rules(cache, data, monkeypatch):
    model, x, y, maps = data
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "bf16_is_fast", lambda device: False)
    assert forward_mode(model, x, "auto") == ForwardMode("fp32", None)  # chunk: the metric's own rule
    exact = scores(model, x, y, maps)
    auto = scores(model, x, y, maps, precision="auto")
    assert all(torch.equal(auto[m], exact[m]) for m in COPY_METRICS)
    monkeypatch.setattr(autotune, "bf16_is_fast", lambda device: True)  # a device with native bf16
    assert forward_mode(model, x, "auto") == ForwardMode("bf16", None)
    assert not cache.exists()  # nothing measured, nothing written


def test_the_target_class_is_chosen_in_fp32(cache, data):
    model, x, _, maps = data
    tuned(model, x, bf16_fast)
    model.bf16_class = 3  # under bf16 autocast, class 3 would win every image
    with torch.no_grad():
        fp32_classes = model(x).argmax(1)
    assert (fp32_classes != 3).any()
    model.calls.clear()
    fast = scores(model, x, None, maps, precision="bf16")
    assert model.calls[0] == (False, len(x))  # the target chosen first, in fp32
    given = scores(model, x, fp32_classes, maps, precision="bf16")
    assert all(torch.equal(fast[m], given[m]) for m in COPY_METRICS)


def test_metrics_that_re_explain_run_at_the_methods_precision(cache, data):
    model, x, y, _ = data
    tuned(model, x, bf16_fast)
    kwargs = {"metrics": ["max_sensitivity"], "method": "saliency", "n_samples": 3}
    exact = evaluate_explanations(model, x, y, **kwargs)
    model.calls.clear()
    forced = evaluate_explanations(model, x, y, precision="bf16", **kwargs)
    assert not any(on for on, _ in model.calls)  # precision is about the forward passes of copies
    assert torch.equal(exact["max_sensitivity"], forced["max_sensitivity"])


def test_fast_values_stay_within_the_documented_tolerance_of_exact(cache, data):
    """bf16 autocast rounds the model's inputs and weights to 8 significant bits: on a calibrated model the
    per-image values of every copy-scoring metric stay within ``FAST_MODE_TOLERANCE`` of the exact ones."""
    model, x, y, maps = data
    tuned(model, x, bf16_fast)
    exact = scores(model, x, y, maps)
    fast = scores(model, x, y, maps, precision="bf16")
    for metric in COPY_METRICS:
        atol, rtol = FAST_MODE_TOLERANCE[metric]
        torch.testing.assert_close(fast[metric], exact[metric], atol=atol, rtol=rtol, msg=metric)


def test_assess_takes_the_same_fast_mode(cache, data):
    model, x, y, maps = data
    tuned(model, x, bf16_fast)
    metrics = ("deletion_auc", "faithfulness_correlation")
    params = {"n_steps": 8, "n_runs": 10, "subset_size": 16}
    record = assess(model, x, y, ["saliency"], metrics, metric_params=params, precision="auto")
    maps = record.maps["saliency"]
    direct = evaluate_explanations(model, x, y, maps, metrics=metrics, precision="bf16", **params)
    for metric in metrics:
        assert record.per_image["saliency"][metric] == tuple(direct[metric].tolist())
