"""The autotuner: choices from (injected) timings, the on-disk cache, the bf16 accuracy guard, the off switch
and explicit settings. Timings are injected through ``timer`` so no test times anything real for long."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from xailab import autotune
from xailab.autotune import Config, choose, tune
from xailab.autotune import busy_load as real_busy_load
from xailab.device import bf16_is_fast

pytestmark = pytest.mark.usefixtures("single_thread")


class Tiny(nn.Module):
    """A small conv net ``[B, 1, 8, 8] -> [B, 3]``; ``perturb`` adds a large input-dependent term to the
    logits only under autocast, i.e. a bf16 path that breaks the explanations."""

    def __init__(self, channels: int = 4, perturb: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 16, 3)
        self.perturb = perturb
        self.register_buffer("r", torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(nn.functional.avg_pool2d(self.bn(self.conv(x)).relu(), 2).flatten(1))
        if self.perturb and torch.is_autocast_enabled(x.device.type):
            out = out + 50 * (x**2 * self.r).sum((1, 2, 3))[:, None]
        return out


class FakeTimer:
    """``seconds_per_image(pass, config)`` as the timing of a call; counts the calls, runs nothing."""

    def __init__(self, seconds_per_image: Callable[[str, Config], float]):
        self.seconds_per_image = seconds_per_image
        self.calls: list[tuple[str, Config]] = []

    def __call__(self, pass_name: str, config: Config, run: Callable[[], object]) -> float:
        self.calls.append((pass_name, config))
        return self.seconds_per_image(pass_name, config) * config.batch


def avx2_like(pass_name: str, c: Config) -> float:
    """bf16 emulated (8x slower), channels_last 10% faster, chunks fastest at 64 images."""
    s = 1e-3 * (8 if c.precision == "bf16" else 1) * (0.9 if c.channels_last else 1)
    return s * (1 + abs(c.batch.bit_length() - 7) * 0.05)  # 64 has bit_length 7


def bf16_cpu_like(pass_name: str, c: Config) -> float:
    """bf16 twice as fast, best with channels_last; chunks fastest at 32 images."""
    s = 1e-3 * (0.5 if c.precision == "bf16" else 1) * (0.8 if c.channels_last else 1)
    return s * (1 + abs(c.batch.bit_length() - 6) * 0.05)


@pytest.fixture(autouse=True)
def _seeded():
    """Seeded weights: the bf16 accuracy guard's value depends on them."""
    torch.manual_seed(0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache dir (also as XAILAB_CACHE_DIR) with autotuning switched on."""
    monkeypatch.setenv("XAILAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XAILAB_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "busy_load", lambda device: None)  # the machine's load must not matter
    return tmp_path / "autotune"


def test_choose_is_a_pure_function_of_the_timings():
    a, b, c = Config("fp32", False, 32), Config("fp32", True, 32), Config("bf16", True, 32)
    assert choose({a: 2.0, b: 1.0, c: 0.5}) == c
    assert choose({a: 2.0, b: 1.0, c: 0.5}, allow_bf16=False) == b
    assert choose({a: 1.0, b: 1.0}) == a  # a tie goes to the simpler configuration
    assert choose({b: 1.0, a: 1.0}) == a  # whatever the order of the table
    with pytest.raises(autotune.ConfigError):
        choose({c: 1.0}, allow_bf16=False)


def test_the_choice_follows_the_measurements_not_the_processor(cache):
    model = Tiny()
    avx2 = tune(model, (1, 8, 8), timer=FakeTimer(avx2_like), cache_dir=cache / "a")
    assert {p: (c.precision, c.channels_last) for p, c in avx2.choices.items()} == {
        "train_step": ("fp32", True),
        "forward": ("fp32", False),  # explanations keep the model's own layout (NCHW here)
        "input_grad": ("fp32", False),
    }
    assert avx2.choices["forward"].batch == 64
    assert avx2.choices["input_grad"].batch == 64  # the cap with gradients for 8x8 images is 256
    assert avx2.rank_correlation is None  # bf16 never won: no accuracy check needed
    fast = tune(model, (1, 8, 8), timer=FakeTimer(bf16_cpu_like), cache_dir=cache / "b")
    assert fast.choices["train_step"] == Config("bf16", True, 32)
    assert fast.choices["forward"] == Config("bf16", False, 32)
    two = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(144, 3))
    nchw = tune(two, (2, 8, 8), timer=FakeTimer(bf16_cpu_like), cache_dir=cache / "b")
    two.to(memory_format=torch.channels_last)  # a model already in channels_last keeps that layout
    cl = tune(two, (2, 8, 8), timer=FakeTimer(bf16_cpu_like), cache_dir=cache / "b")
    assert nchw.choices["forward"] == Config("bf16", False, 32)
    assert cl.path != nchw.path and cl.choices["forward"] == Config("bf16", True, 32)
    assert fast.rank_correlation is not None and fast.rank_correlation >= autotune.RANK_GUARD


def test_clear_losers_cost_one_small_probe_and_the_sweep_stops_past_the_peak(cache):
    timer = FakeTimer(avx2_like)
    tune(Tiny(), (1, 8, 8), passes=("forward",), timer=timer, cache_dir=cache)
    bf16_calls = [c for _, c in timer.calls if c.precision == "bf16"]
    # a one-image screen, nothing more: 8x slower than fp32's stage-0 probe (16 / 8 = 2 images)
    assert [c.batch for c in bf16_calls] == [1]
    assert all(not c.channels_last for _, c in timer.calls)  # the model's own layout only
    batches = [c.batch for _, c in timer.calls if c.precision == "fp32"]
    # a one-image screen (every candidate gets one: screens are compared with screens), the probe, then the
    # sweep: 128 and 256 slower than 64: stop, 512 never tried
    sweep = [1, 2, 16, 32, 64, 128, 256]
    assert batches == sweep + [64, 32, 128] * autotune.CONFIRM_ROUNDS  # the three fastest, interleaved


def test_the_confirmation_rounds_undo_a_lucky_call_of_the_sweep(cache):
    """A drift of the machine during the sweep (the call timing 32 images ran at twice the speed) would pick
    32; re-timed in interleaved rounds, the median picks the truly fastest chunk, 64."""
    seen: dict[int, int] = {}

    def drifting(pass_name: str, c: Config) -> float:
        seen[c.batch] = seen.get(c.batch, 0) + 1
        lucky = c.precision == "fp32" and c.batch == 32 and seen[32] == 1
        return avx2_like(pass_name, c) * (0.5 if lucky else 1)

    tuning = tune(Tiny(), (1, 8, 8), passes=("forward",), timer=FakeTimer(drifting), cache_dir=cache)
    assert seen[32] == 1 + autotune.CONFIRM_ROUNDS
    assert tuning.choices["forward"].batch == 64
    assert tuning.timings["forward"][Config("fp32", False, 32)] == avx2_like(
        "forward", Config("fp32", False, 32)
    )


def test_a_second_call_measures_nothing(cache):
    model = Tiny()
    first_timer, second_timer = FakeTimer(avx2_like), FakeTimer(avx2_like)
    first = tune(model, (1, 8, 8), timer=first_timer, cache_dir=cache)
    assert first_timer.calls and not first.cached
    trained = Tiny()  # other weights, same architecture: same fingerprint, same decision
    second = tune(trained, (5, 1, 8, 8), timer=second_timer, cache_dir=cache)
    assert second_timer.calls == []
    assert second.cached and second.choices == first.choices and second.timings == first.timings
    assert second.path == first.path and first.path.is_file()
    other = tune(Tiny(channels=6), (1, 8, 8), timer=second_timer, cache_dir=cache)  # another architecture
    assert second_timer.calls and other.path != first.path


def test_a_missing_pass_is_measured_alone_and_merged(cache):
    timer = FakeTimer(avx2_like)
    tune(Tiny(), (1, 8, 8), passes=("train_step",), timer=timer, cache_dir=cache)
    timer.calls.clear()
    both = tune(Tiny(), (1, 8, 8), passes=("train_step", "forward"), timer=timer, cache_dir=cache)
    assert {p for p, _ in timer.calls} == {"forward"}
    assert set(both.timings) == {"train_step", "forward"}


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated: corrupt JSON
        lambda text: text.replace('"seconds_per_image": ', '"seconds_per_image": -'),  # impossible timing
        lambda text: text.replace(f'"version": {autotune.VERSION}', '"version": 0'),  # an older format
        lambda text: text.replace(torch.__version__, "1.0.0"),  # stale: written by another torch
    ],
    ids=["truncated", "negative-timing", "old-format", "other-torch"],
)
def test_a_corrupt_or_stale_cache_file_is_ignored_with_a_warning_and_rewritten(cache, caplog, damage):
    model = Tiny()
    first = tune(model, (1, 8, 8), timer=FakeTimer(avx2_like), cache_dir=cache)
    first.path.write_text(damage(first.path.read_text()))
    timer = FakeTimer(avx2_like)
    with caplog.at_level(logging.WARNING, logger="xailab.autotune"):
        again = tune(model, (1, 8, 8), timer=timer, cache_dir=cache)
    assert any("ignoring autotune cache" in r.message for r in caplog.records)
    assert timer.calls and again.choices == first.choices
    assert json.loads(first.path.read_text()) == again.to_dict()  # rewritten whole
    assert tune(model, (1, 8, 8), timer=timer, cache_dir=cache).cached


def test_the_fast_mode_stays_fp32_when_bf16_breaks_the_rank_correlation_guard(cache, monkeypatch):
    broken = Tiny(perturb=True)
    tuning = tune(broken, (1, 8, 8), timer=FakeTimer(bf16_cpu_like))
    assert tuning.rank_correlation < autotune.RANK_GUARD
    assert tuning.choices["train_step"].precision == "bf16"  # training has no such guard
    assert tuning.choices["forward"].precision == "fp32"
    assert tuning.choices["input_grad"].precision == "fp32"
    assert tuning.best("forward", precision="bf16").precision == "bf16"  # an explicit bf16 is obeyed
    x = torch.randn(4, 1, 8, 8)
    assert autotune.explain_precision(broken, x, "auto") == "fp32"  # reads the cache written above
    assert autotune.explain_precision(broken, x, "bf16") == "bf16"
    sound = Tiny()
    tune(sound, (1, 8, 8), timer=FakeTimer(bf16_cpu_like), cache_dir=None, refresh=True)
    assert autotune.explain_precision(sound, x, "auto") == "bf16"  # bf16 faster and accurate
    assert autotune.chunk_size(sound, x, grad=False) == 32


def test_the_off_switch_falls_back_to_the_fixed_rules_and_measures_nothing(cache, monkeypatch):
    model, x, cpu = Tiny(), torch.randn(2, 1, 8, 8), torch.device("cpu")
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")
    rule = "bf16" if bf16_is_fast(cpu) else "fp32"
    assert autotune.train_settings(model, x.shape, cpu) == (rule, rule == "bf16")
    assert autotune.explain_precision(model, x, "auto") == rule
    assert autotune.chunk_size(model, x, grad=True) is None  # the caller keeps its rule
    assert not cache.exists()  # nothing measured, nothing written
    monkeypatch.setenv("XAILAB_AUTOTUNE", "1")
    assert not autotune.enabled(False) and autotune.enabled()
    assert autotune.chunk_size(model, x, grad=True, autotune=False) is None
    monkeypatch.setenv("XAILAB_AUTOTUNE", "off")
    assert autotune.enabled(True) and not autotune.enabled()


def test_explicit_settings_win(cache):
    model, cpu = Tiny(), torch.device("cpu")
    timer = FakeTimer(bf16_cpu_like)
    options = {"timer": timer}
    assert autotune.train_settings(model, (1, 8, 8), cpu, "fp32", False, tune_options=options) == (
        "fp32",
        False,
    )
    assert timer.calls == [] and not cache.exists()  # fully explicit: nothing to measure
    assert autotune.train_settings(model, (1, 8, 8), cpu, tune_options=options) == ("bf16", True)
    assert autotune.train_settings(model, (1, 8, 8), cpu, "fp32", tune_options=options) == ("fp32", True)
    assert autotune.train_settings(model, (1, 8, 8), cpu, channels_last=False, tune_options=options) == (
        "bf16",
        False,
    )
    with pytest.raises(autotune.ConfigError, match="precision='fp16'"):
        autotune.train_settings(model, (1, 8, 8), cpu, "fp16")


def test_the_fingerprint_is_the_architecture_not_the_weights():
    assert autotune.fingerprint(Tiny()) == autotune.fingerprint(Tiny())
    assert autotune.fingerprint(Tiny()) != autotune.fingerprint(Tiny(channels=5))
    strided = Tiny()
    strided.conv = nn.Conv2d(1, 4, 3, padding=1, stride=2)  # same shapes, other settings
    assert autotune.fingerprint(strided) != autotune.fingerprint(Tiny())


def test_real_tuning_runs_on_copies_and_leaves_the_model_alone(cache):
    model = Tiny().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        tuning = tune(model, (1, 8, 8), budget_s=0.2, train_batch=8)
    finally:
        handle.remove()
    assert calls == [] and model.training and "forward" not in vars(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert set(tuning.choices) == set(autotune.PASSES)
    assert all(s > 0 for t in tuning.timings.values() for s in t.values())
    text = tuning.table()
    assert "<- chosen" in text and "train_step" in text and "choice:" in text


def test_a_model_with_batchnorm1d_is_tuned_for_training_without_a_single_image_batch(cache):
    # train mode: BatchNorm1d over [1, C] raises, so the training step is never timed on one image (the
    # chest X-ray ensemble's head stopped a study so)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    tuning = tune(model, (1, 8, 8), passes=("train_step",), budget_s=0.2, train_batch=8)
    assert tuning.timings["train_step"] and all(c.batch >= 2 for c in tuning.timings["train_step"])
    assert autotune.train_settings(model, (1, 8, 8), torch.device("cpu"))[0] in ("fp32", "bf16")


def test_explanations_take_the_tuned_chunk_and_precision(cache, monkeypatch):
    from xailab.explain import explain
    from xailab.explain.batching import default_batch_size

    torch.manual_seed(0)  # the weights: the accuracy guard depends on them and on the sample
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sound, broken = Tiny(), Tiny(channels=5, perturb=True)  # another architecture: its own cache entry
    tuned = [
        tune(model, x.shape, timer=FakeTimer(bf16_cpu_like), passes=autotune.EXPLAIN_PASSES, sample=x)
        for model in (sound, broken)
    ]
    assert tuned[0].bf16_accurate and not tuned[1].bf16_accurate
    assert default_batch_size(x, grad=False, model=sound) == 32  # the measured peak, not the fixed rule
    fp32 = explain(sound, x, "saliency", precision="fp32")
    auto = explain(sound, x, "saliency", precision="auto")
    assert torch.equal(auto, explain(sound, x, "saliency", precision="bf16")) and not torch.equal(auto, fp32)
    assert torch.equal(explain(broken, x, "saliency", precision="auto"), explain(broken, x, "saliency"))
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")
    rule = default_batch_size(x, grad=False)
    assert default_batch_size(x, grad=False, model=sound) == rule != 32


def test_training_takes_the_tuned_precision_and_layout_unless_set(cache):
    from xailab.train import TrainConfig
    from xailab.train.loop import resolve_precision

    model, cpu = Tiny(), torch.device("cpu")
    tune(model, (1, 8, 8), passes=("train_step",), timer=FakeTimer(bf16_cpu_like), train_batch=32)
    auto = TrainConfig(model="mnist_cnn", dataset="digits")
    assert resolve_precision(auto, cpu, model, (1, 8, 8), 128) == (torch.bfloat16, True)
    exact = TrainConfig(model="mnist_cnn", dataset="digits", precision="fp32")
    assert resolve_precision(exact, cpu, model, (1, 8, 8), 128) == (None, True)  # fp32's fastest layout
    nchw = TrainConfig(model="mnist_cnn", dataset="digits", channels_last=False)
    assert resolve_precision(nchw, cpu, model, (1, 8, 8), 128) == (torch.bfloat16, False)


def test_the_speed_command_prints_the_table_and_the_choice(cache, capsys):
    from xailab import cli
    from xailab.models import create_model, random_init_options

    model = create_model("mnist_cnn", in_channels=1, num_classes=10, **random_init_options("mnist_cnn"))
    tune(model, (1, 28, 28), torch.device("cpu"), timer=FakeTimer(avx2_like))  # what `speed` will find
    assert cli.main(["speed", "--model", "mnist_cnn", "--channels", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cached:" in out  # nothing measured
    chosen = [line for line in out.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 3 and "fp32 channels_last" in chosen[0] and "fp32 NCHW" in chosen[1]
    assert chosen[1].startswith("forward") and " 64 " in chosen[1]
    assert chosen[1].split()[-3] == "1000.0"  # the injected 1 ms per image, as images/s
    assert out.strip().splitlines()[-1].startswith("choice: train_step: fp32 channels_last")


def test_the_cli_prints_the_autotuners_logged_warnings_as_xailab_lines(cache, capsys, monkeypatch):
    # an unusable cache file is logged as a warning by the autotuner; the CLI prints it as its other warnings,
    # one `xailab: warning:` line (it printed a bare `ignoring autotune cache ...` before), and no info records
    import logging

    from xailab import cli
    from xailab.models import create_model, random_init_options

    model = create_model("mnist_cnn", in_channels=1, num_classes=10, **random_init_options("mnist_cnn"))
    tune(model, (1, 28, 28), torch.device("cpu"), timer=FakeTimer(avx2_like))
    files = list(cache.glob("*.json"))
    assert files
    for f in files:
        f.write_text("{not json")
    monkeypatch.setattr(autotune, "WallClock", lambda device: FakeTimer(avx2_like))  # measured again, fast
    handlers = list(logging.getLogger("xailab").handlers)
    assert cli.main(["speed", "--model", "mnist_cnn", "--channels", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("xailab: warning: ignoring autotune cache ")
    assert all(line.startswith("xailab: warning: ") for line in err)  # info records stay silent
    assert logging.getLogger("xailab").handlers == handlers  # the command's handler is gone


def test_the_wall_clock_gives_up_on_a_clear_loser_after_its_warm_up(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])

    def run_taking(seconds: float, calls: list) -> Callable[[], None]:
        def run() -> None:
            calls.append(1)
            now[0] += seconds

        return run

    clock = autotune.WallClock(torch.device("cpu"), iters=3, candidate_s=100.0, give_up=3.0)
    fast, slow, close = [], [], []
    assert clock("forward", Config(batch=10), run_taking(1.0, fast)) == 1.0
    assert len(fast) == 4  # warm-up + 3 timed calls
    assert clock("forward", Config("bf16", batch=10), run_taking(8.0, slow)) == 8.0
    assert len(slow) == 1  # 8x slower at its warm-up: no timed calls
    assert clock("forward", Config("fp32", True, batch=10), run_taking(2.0, close)) == 2.0
    assert len(close) == 4  # only 2x slower: timed like the first
    assert clock("input_grad", Config("bf16", batch=10), run_taking(8.0, [])) == 8.0  # per pass


def test_a_first_call_paying_one_time_costs_is_not_taken_for_a_loser(monkeypatch):
    """A warm-up is compared with warm-ups: candidate ``b`` pays 10x its steady time on its first call (kernels
    built for a new precision or layout) but is twice as fast after; against the first candidate's steady time
    it would be given up, against its warm-up it is timed and wins."""
    now = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])

    def machine(first: float, steady: float) -> Callable[[], None]:
        calls = []

        def run() -> None:
            now[0] += first if not calls else steady
            calls.append(1)

        return run

    clock = autotune.WallClock(torch.device("cpu"), iters=3, candidate_s=100.0, give_up=3.0)
    assert clock("train_step", Config(batch=10), machine(2.0, 1.0)) == 1.0
    assert clock("train_step", Config("bf16", True, batch=10), machine(5.0, 0.5)) == 0.5


def simulated_cpu(cold: dict[tuple[str, bool], float], steady: dict[tuple[str, bool], float]):
    """A timer running the real ``WallClock`` on a fake clock: a call of ``c.batch`` images costs 1 ms plus
    ``steady`` ms per image, and ``cold`` ms per image more on the first call of each configuration."""
    now = [0.0]
    clock = autotune.WallClock(torch.device("cpu"))
    seen: set[Config] = set()

    def timer(pass_name: str, c: Config, run: Callable[[], object]) -> float:
        def call() -> None:
            key = (c.precision, c.channels_last)
            now[0] += 1e-3 + c.batch * 1e-3 * (steady[key] + (0 if c in seen else cold[key]))
            seen.add(c)

        return clock(pass_name, c, call)

    return now, timer


def test_a_bf16_cpu_whose_kernels_build_on_first_use_trains_in_bf16(cache, monkeypatch):
    """The measured shape of efficient_cnn's training step on a 2-core AVX-512 BF16 CPU (2026-12-01): bf16
    channels_last twice as fast as fp32 once warm, but its first calls several times slower. The tuner
    chose fp32 channels_last there (0.34x of the fastest step) while it compared first calls with steady
    ones; it must choose bf16 channels_last."""
    steady = {("fp32", False): 2.0, ("fp32", True): 1.3, ("bf16", False): 1.4, ("bf16", True): 0.8}
    cold = {("fp32", False): 2.0, ("fp32", True): 4.0, ("bf16", False): 8.0, ("bf16", True): 10.0}
    now, timer = simulated_cpu(cold, steady)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])
    tuning = tune(Tiny(), (1, 8, 8), passes=("train_step",), timer=timer, cache_dir=cache)
    assert tuning.choices["train_step"] == Config("bf16", True, 32)
    # and emulated bf16 (an AVX2 CPU: 8x slower, cold or not) still loses
    emulated = {k: v * (8 if k[0] == "bf16" else 1) for k, v in steady.items()}
    now, timer = simulated_cpu({k: 1.0 for k in steady}, emulated)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])
    tuning = tune(Tiny(), (1, 8, 8), passes=("train_step",), timer=timer, cache_dir=cache, refresh=True)
    assert tuning.choices["train_step"] == Config("fp32", True, 32)


def test_a_compiled_step_is_chosen_only_when_training_compiles():
    eager, compiled = Config("fp32", True, 32), Config("fp32", True, 32, compile=True)
    table = {eager: 1.0, Config("fp32", False, 32): 1.2, compiled: 0.5}
    tuning = autotune.Tuning("k", {}, {"train_step": table})
    assert tuning.choices["train_step"] == compiled
    assert tuning.best("train_step", compile=False) == eager
    assert tuning.best("train_step", channels_last=False, compile=True) == Config(
        "fp32", False, 32
    )  # as eager
    cpu_only = autotune.Tuning("k", {}, {"train_step": {eager: 1.0, Config("bf16", True, 32): 0.4}})
    assert cpu_only.best("train_step", compile=True) == Config("bf16", True, 32)


def test_tuning_from_a_no_grad_caller_still_times_gradient_passes(cache):
    with torch.no_grad():
        tuning = tune(Tiny(), (1, 8, 8), passes=("input_grad", "train_step"), budget_s=0.1, train_batch=4)
    assert set(tuning.choices) == {"input_grad", "train_step"}


def test_the_cost_is_bounded_by_the_budget_and_logged(cache, monkeypatch, caplog):
    """On a fake clock where every timed candidate costs one second and no chunk size is ever slower (so
    the sweeps would not stop by themselves): a call spends at most its budget plus, per pass, its probes
    and one candidate, reports it as ``seconds`` and logs it."""
    now = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])

    def flat(pass_name: str, c: Config) -> float:
        return 1e-3 * (8 if c.precision == "bf16" else 1)  # bf16 a clear loser; every fp32 chunk as fast

    class Clocked(FakeTimer):
        def __call__(self, pass_name: str, config: Config, run: Callable[[], object]) -> float:
            now[0] += 1.0
            return super().__call__(pass_name, config, run)

    free = Clocked(flat)
    tune(Tiny(), (1, 8, 8), timer=free, cache_dir=cache / "free", budget_s=1000.0)
    now[0] = 0.0
    timer = Clocked(flat)
    with caplog.at_level(logging.INFO, logger="xailab.autotune"):
        tuning = tune(Tiny(), (1, 8, 8), timer=timer, cache_dir=cache / "bounded", budget_s=4.0)
    # stage 0: probes at 1/8 of 16 (explaining) and 32 (training), and one-image screens of the others
    probes = sum(c.batch in (1, 2, 4) for _, c in timer.calls)
    # training: 4 screens, of which the 2 fp32 pass on to their probes (bf16 x2 do not); explaining, per pass:
    # 2 screens, 1 probe
    assert probes == 12
    bound = 4.0 + probes + len(autotune.PASSES)  # the budget, the probes, one candidate per pass
    assert tuning.seconds == now[0] == len(timer.calls) <= bound < len(free.calls)
    assert set(tuning.choices) == set(autotune.PASSES)  # every pass still gets a choice
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("autotuned")]
    assert (
        logged
        and f"in {tuning.seconds:.1f} s ({tuning.seconds:.1f} s timing candidates, budget 4.0 s)"
        in (logged[0])
    )
    assert json.loads(tuning.path.read_text())["seconds"] == tuning.seconds  # and kept with the decision


def split_peaks(pass_name: str, c: Config) -> float:
    """bf16 twice as fast and fastest at 32 images; fp32 fastest at 128."""
    peak = 6 if c.precision == "bf16" else 8
    return 1e-3 * (0.5 if c.precision == "bf16" else 1) * (1 + abs(c.batch.bit_length() - peak) * 0.05)


def test_the_exact_fp32_mode_gets_its_own_chunk_when_bf16_wins(cache):
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model, timer = Tiny(), FakeTimer(split_peaks)
    tuning = tune(model, x.shape, passes=autotune.EXPLAIN_PASSES, timer=timer, sample=x)
    assert tuning.bf16_accurate and tuning.choices["forward"] == Config("bf16", False, 32)
    fp32_sweep = [c.batch for p, c in timer.calls if p == "forward" and c.precision == "fp32"]
    # past the peak at 128 by two sizes, then the three fastest re-timed
    assert fp32_sweep == [1, 2, 16, 32, 64, 128, 256, 512] + [128, 64, 256] * autotune.CONFIRM_ROUNDS
    assert autotune.chunk_size(model, x, grad=False, precision="bf16") == 32
    assert autotune.chunk_size(model, x, grad=False, precision="fp32") == 128
    assert autotune.chunk_size(model, x, grad=True, precision="fp32") == 128  # cap 256 with gradients
    assert autotune.chunk_size(model, x, grad=False) == 128  # the precision the model runs at: fp32 here


def test_explanations_chunk_at_the_precision_they_run_at(cache):
    """Integrated gradients' path points come in the chunk measured fastest at the explanation's precision:
    fp32's (128) when exact, bf16's (32) in bf16 (``autocast_forward`` marks the model's forward)."""

    class Recording(Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.sizes.append(x.shape[0])
            return super().forward(x)

    model, x = Recording(), torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.sizes = []
    tune(model, x.shape, passes=autotune.EXPLAIN_PASSES, timer=FakeTimer(split_peaks), sample=x)
    from xailab.explain import explain

    for precision, chunk in (("fp32", 128), ("bf16", 32), ("auto", 32)):
        model.sizes.clear()
        explain(model, x, "integrated_gradients", precision=precision, n_steps=32)  # 256 path points
        assert max(model.sizes) == chunk, precision


def test_a_precision_that_lost_early_takes_the_chosen_chunk_not_its_probe(cache):
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = Tiny()
    tuning = tune(model, x.shape, passes=autotune.EXPLAIN_PASSES, timer=FakeTimer(avx2_like), sample=x)
    assert [c.batch for c in tuning.timings["forward"] if c.precision == "bf16"] == [1]  # its screen only
    assert autotune.chunk_size(model, x, grad=False, precision="bf16") == 64  # an explicit bf16: fp32's
    assert tuning.chunk("forward", "fp32") == tuning.choices["forward"].batch == 64


def test_the_target_class_is_chosen_in_fp32(cache):
    """A model whose bf16 path adds a large constant to class 2 (so bf16 would pick it for every image, while
    no gradient changes): saliency in bf16 explains each image's fp32 class, whose map is |W[class]|."""

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 3)
            with torch.no_grad():
                self.fc.bias.copy_(torch.tensor([0.0, 0.0, -50.0]))  # fp32 never picks class 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x.flatten(1))
            if torch.is_autocast_enabled(x.device.type):
                out = out + torch.tensor([0.0, 0.0, 100.0])
            return out

    model, x = Linear(), torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32_classes = model(x).argmax(1)
    assert (fp32_classes != 2).all()
    from xailab.explain import explain

    for precision in ("bf16", "auto"):
        tune(model, x.shape, passes=autotune.EXPLAIN_PASSES, timer=FakeTimer(bf16_cpu_like), sample=x)
        maps = explain(model, x, "saliency", precision=precision).flatten(1)
        expected = model.fc.weight.detach().abs()[fp32_classes]  # [6, 16]
        torch.testing.assert_close(maps, expected, rtol=1e-2, atol=1e-3)  # bf16-rounded weights
        assert not torch.allclose(maps, model.fc.weight.detach().abs()[2].expand_as(maps), atol=1e-2)


def test_the_inputs_layout_is_part_of_the_decision():
    """Explanation chunks are timed in the layout the copies reach the model in (the inputs'), so a decision
    for NCHW inputs is not reused for channels_last ones (one channel: told apart by the channel stride)."""
    x = torch.randn(4, 1, 8, 8)
    nhwc = x.clone(memory_format=torch.channels_last)
    assert not autotune.inputs_channels_last(x) and autotune.inputs_channels_last(nhwc)
    assert not autotune.inputs_channels_last(torch.randn(4, 3, 1, 1).clone(memory_format=torch.channels_last))
    assert not autotune.inputs_channels_last(None)
    model, cpu = Tiny(), torch.device("cpu")
    plain = autotune._key_fields(model, (1, 8, 8), cpu, 64, x)
    last = autotune._key_fields(model, (1, 8, 8), cpu, 64, nhwc)
    assert plain["channels_last_inputs"] is False and last["channels_last_inputs"] is True
    assert autotune.cache_path(plain)[0] != autotune.cache_path(last)[0]


def test_a_decision_measured_on_a_busy_machine_is_flagged_and_measured_again_once_quiet(
    cache, monkeypatch, caplog
):
    """A load average above the CPUs (other work competing) flags the decision with a warning; while the
    machine stays busy the flagged decision is read from the cache, and the first tuning on a quiet machine
    measures again and clears the flag."""
    monkeypatch.setattr(autotune, "busy_load", real_busy_load)  # the real one, on a fake load average
    load = [autotune.usable_cpus() + 2.0]
    monkeypatch.setattr(autotune.os, "getloadavg", lambda: (load[0], load[0], load[0]))
    busy_timer, again_timer, quiet_timer = FakeTimer(avx2_like), FakeTimer(avx2_like), FakeTimer(avx2_like)
    with caplog.at_level(logging.WARNING, logger="xailab.autotune"):
        first = tune(Tiny(), (1, 8, 8), passes=("forward",), timer=busy_timer, cache_dir=cache)
    assert busy_timer.calls and first.busy_load == load[0]
    assert any("while the machine is busy" in r.getMessage() for r in caplog.records)
    assert json.loads(first.path.read_text())["busy_load"] == load[0]
    still_busy = tune(Tiny(), (1, 8, 8), passes=("forward",), timer=again_timer, cache_dir=cache)
    assert again_timer.calls == [] and still_busy.cached and still_busy.busy_load == load[0]
    load[0] = 0.3
    quiet = tune(Tiny(), (1, 8, 8), passes=("forward",), timer=quiet_timer, cache_dir=cache)
    assert quiet_timer.calls and quiet.busy_load is None and not quiet.cached
    assert json.loads(quiet.path.read_text())["busy_load"] is None
    assert autotune.busy_load(torch.device("meta")) is None  # accelerators: the CPU load says nothing
