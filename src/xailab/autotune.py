"""The autotuner: the fastest configuration of each kind of pass xailab runs, measured once per machine.

Which configuration is fastest depends on the model and the processor: bf16 autocast wins on CPUs with
AVX-512 BF16 / AMX for regular convolutions but loses for depthwise ones (mobilenetv2), is emulated and ~8x
slower on AVX2-only CPUs, and the best chunk of perturbed copies depends on the caches. No fixed rule is right
everywhere, so ``tune`` times the candidates for one model, input shape and device:

- ``train_step``: forward + cross-entropy + backward + SGD step, fp32 / bf16 autocast x NCHW / channels_last
  (plus ``torch.compile`` on CUDA), at one batch;
- ``forward`` (``no_grad``: metrics' perturbed copies, perturbation methods) and ``input_grad`` (forward +
  gradient w.r.t. the input, the pass of gradient explanations): fp32 / bf16 in the layout the model has
  (explanations never convert a caller's model), then chunk sizes from a small geometric set for the winner,
  and for fp32 too when bf16 won (the exact fp32 mode is the default and gets its own measured chunk).

Each candidate gets a warm-up call and a few timed calls (the fastest counts: the machine may be shared);
a candidate whose warm-up is already far slower than the best is not timed further. The cost is bounded:
the timed calls of a ``tune`` call spend at most ``budget_s`` (``BUDGET_S``) plus, per pass, its probes and
one candidate, and what it spent is logged. The decision is a pure function of the timings (``choose``); for explanations
(and metrics' forward passes) bf16 is allowed only when the per-image Spearman rank correlation of its input
x gradient maps with the fp32 maps, averaged over the tuning sample (the caller's images when it has them,
else seeded noise), is at least ``RANK_GUARD``; the target is chosen in fp32.

Decisions are cached as JSON under ``<cache dir>/autotune/`` (``XAILAB_CACHE_DIR``), keyed by an
architecture fingerprint (module types and shapes, not weights), the input shape, the device name and the
torch version, so a machine measures once — unless it was busy then: a decision measured while the load
average exceeded the CPUs is flagged (``busy_load``, with a warning) and measured again by the first tuning
that finds the machine quiet. ``XAILAB_AUTOTUNE=0`` (or ``autotune=False``) turns it off and
the fixed rules of ``xailab.device`` apply; explicit settings always win over both. What the rest of
xailab asks: ``train_settings`` (training), ``explain_precision`` (explanations), ``metric_precision``
(metrics' fast mode) and ``chunk_size`` (images per call of copies).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from xailab.data.base import default_cache_dir
from xailab.device import autocast, bf16_is_fast, device_name, forward_dtype, synchronize
from xailab.errors import ConfigError
from xailab.io import read_json, write_json

logger = logging.getLogger(__name__)

VERSION = 4  # of the cache format and of the measuring procedure: a change invalidates old files
ENV = "XAILAB_AUTOTUNE"
Pass = Literal["train_step", "forward", "input_grad"]
Precision = Literal["fp32", "bf16"]
PASSES: tuple[Pass, ...] = ("train_step", "forward", "input_grad")
EXPLAIN_PASSES: tuple[Pass, ...] = ("forward", "input_grad")
BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)  # candidate chunk sizes (the first is also stage 1's)
BUSY_MARGIN = 0.5  # a load average this far above the CPUs flags a decision as measured on a busy machine
CONFIRM_TOP, CONFIRM_ROUNDS = 3, 2  # chunk sizes re-timed after a sweep, interleaved (see _confirm)
PROBE_FRACTION = 8  # stage 0 probes each candidate at 1/8 of the stage-1 batch
# A candidate this many times slower per image than the best probe is not timed at the full batch; loose,
# since layouts differ more at a few images than at many, but emulated bf16 is slower by more.
PROBE_GIVE_UP = 4.0
GIVE_UP = 3.0  # WallClock: a warm-up this many times slower per image than the best is not timed further
RANK_GUARD = 0.99  # mean per-image Spearman of bf16 vs fp32 maps needed to explain in bf16
# Seconds of timed calls one ``tune`` call may spend (shared by its passes), plus per pass at most its
# probes and one candidate: a few seconds per model on a 2-core CPU.
BUDGET_S = 6.0
# Largest chunk tried, as (pixel budget, cap): keeps a chunk's memory bounded whatever the image size.
MEMORY_CAPS = {
    ("cpu", False): (512 * 32 * 32, 512),
    ("cpu", True): (256 * 64 * 64, 256),
    ("accelerator", False): (2048 * 32 * 32, 2048),
    ("accelerator", True): (512 * 64 * 64, 512),
}


def enabled(option: bool | None = None) -> bool:
    """Whether to autotune: ``option`` when given, else ``XAILAB_AUTOTUNE`` (``0``/``false``/``off`` turn it
    off; unset means on)."""
    if option is not None:
        return option
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Config:
    """One candidate configuration of a pass: autocast precision, memory layout, images per call, compile."""

    precision: Precision = "fp32"
    channels_last: bool = False
    batch: int = 16
    compile: bool = False

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.precision} {layout}" + (" compiled" if self.compile else "")

    def order(self) -> tuple:
        """Tie-break order: the simpler configuration first (fp32, NCHW, eager, smaller batch)."""
        return (self.precision != "fp32", self.channels_last, self.compile, self.batch)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """A Config from its JSON form; ValueError when a field is missing or has a wrong type."""
        precision, cl, batch, comp = d["precision"], d["channels_last"], d["batch"], d["compile"]
        if precision not in ("fp32", "bf16") or not isinstance(cl, bool) or not isinstance(comp, bool):
            raise ValueError(f"bad configuration {dict(d)}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"bad batch in {dict(d)}")
        return cls(precision, cl, batch, comp)


# timer(pass name, configuration, run) -> seconds per call of run(); inject fakes in tests.
Timer = Callable[[str, Config, Callable[[], object]], float]


class WallClock:
    """The default timer: one warm-up call, then up to ``iters`` timed calls (stopping once they took
    ``candidate_s``); the fastest call counts, since other work on a shared machine only slows calls down.

    A candidate whose warm-up is already ``give_up`` times the fastest warm-up of the same pass at the same
    batch is not timed further (its warm-up counts): bf16 emulated on an AVX2 CPU costs one call, not four.
    Warm-ups are compared with warm-ups only: a first call in a new precision or layout pays one-time costs
    (oneDNN builds its kernels: a two-image bf16 training step of MobileNetV2 took 5x its steady time on an
    AVX-512 BF16 CPU), so against a steady time it would make a candidate that wins at full speed look like
    a clear loser.
    """

    def __init__(
        self, device: torch.device, iters: int = 3, candidate_s: float = 0.5, give_up: float = GIVE_UP
    ):
        self.device, self.iters, self.candidate_s, self.give_up = device, iters, candidate_s, give_up
        self._warm: dict[tuple[str, int], float] = {}  # fastest warm-up per (pass, batch), this tuning only

    def _once(self, run: Callable[[], object]) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        run()
        synchronize(self.device)
        return time.perf_counter() - start

    def __call__(self, pass_name: str, config: Config, run: Callable[[], object]) -> float:
        warm = self._once(run)
        key = (pass_name, config.batch)
        best_warm = self._warm.get(key, math.inf)
        self._warm[key] = min(best_warm, warm)
        if warm > self.give_up * best_warm:
            return warm
        times: list[float] = []
        while len(times) < self.iters and sum(times) < self.candidate_s:
            times.append(self._once(run))
        return min(times)


def choose(timings: Mapping[Config, float], allow_bf16: bool = True) -> Config:
    """The fastest configuration by seconds per image (ties: the simpler one), bf16 only if ``allow_bf16``.

    A pure function of ``timings`` (``{config: seconds per image}``).
    """
    allowed = [(s, c.order(), c) for c, s in timings.items() if allow_bf16 or c.precision == "fp32"]
    if not allowed:
        raise ConfigError("no timed configuration to choose from; tune at least one fp32 configuration")
    return min(allowed, key=lambda t: t[:2])[2]


def fingerprint(model: nn.Module) -> str:
    """A hash of ``model``'s architecture: every module's type and settings (``extra_repr``: kernel,
    stride, groups, ...) and every parameter's and buffer's name, shape and dtype — not the weights, so a
    trained model and its random initialisation share their tuning."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        t = type(module)
        h.update(f"{name}|{t.__module__}.{t.__qualname__}|{module.extra_repr()}\n".encode())
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            h.update(f"  {pname}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
    return h.hexdigest()[:32]


def max_batch(input_shape: Sequence[int], device: torch.device, grad: bool) -> int:
    """The largest chunk tried for images of ``input_shape`` (``[..., H, W]``) on ``device``."""
    kind = "cpu" if device.type == "cpu" else "accelerator"
    pixels, cap = MEMORY_CAPS[(kind, grad)]
    return max(1, min(cap, pixels // (input_shape[-2] * input_shape[-1])))


@dataclass(frozen=True)
class Tuning:
    """The measured table and the choices for one model, input shape and device.

    ``timings``: ``{pass: {config: seconds per image}}``; ``choices``: ``{pass: config}``;
    ``rank_correlation``: the mean per-image Spearman correlation of bf16 vs fp32 maps on the tuning
    sample (``rank_correlation()``) (None when bf16 never won, so it was not needed); ``seconds``: what measuring cost;
    ``cached``: read from ``path`` rather than measured now.
    """

    key: str
    fields: dict[str, Any]
    timings: dict[str, dict[Config, float]]
    rank_correlation: float | None = None
    seconds: float = 0.0
    path: Path | None = None
    cached: bool = False
    busy_load: float | None = None  # the load average when measured, where it exceeded the CPUs (else None)
    choices: dict[str, Config] = field(init=False)

    def __post_init__(self) -> None:
        allow = self.rank_correlation is None or self.rank_correlation >= RANK_GUARD
        choices = {
            p: choose(t, allow_bf16=allow or p not in EXPLAIN_PASSES) for p, t in self.timings.items() if t
        }
        object.__setattr__(self, "choices", choices)

    @property
    def bf16_accurate(self) -> bool:
        """Whether explanations may run in bf16 (the rank-correlation guard passed or was not needed)."""
        return self.rank_correlation is None or self.rank_correlation >= RANK_GUARD

    def best(
        self,
        pass_name: Pass,
        precision: Precision | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
    ) -> Config:
        """The fastest measured configuration of ``pass_name`` that honours the explicit settings given
        (None: free; ``compile=False``: eager configurations only); ConfigError if the pass was not tuned."""
        if pass_name not in self.timings:
            raise ConfigError(f"pass {pass_name!r} was not tuned; tuned: {', '.join(self.timings)}")
        if precision is None and channels_last is None and compile is None:
            return self.choices[pass_name]
        timings = self.timings[pass_name]
        allow = self.bf16_accurate or pass_name not in EXPLAIN_PASSES or precision == "bf16"
        matching = {
            c: s
            for c, s in timings.items()
            if (precision is None or c.precision == precision)
            and (channels_last is None or c.channels_last == channels_last)
            and (compile is None or c.compile == compile)
        }
        if not matching and compile is not None:  # compile not measured (only on CUDA): as eager
            return self.best(pass_name, precision, channels_last)
        if not matching:  # a setting no candidate had: keep it, with the chosen chunk
            return Config(precision or "fp32", bool(channels_last), self.choices[pass_name].batch)
        return choose(matching, allow_bf16=allow or not any(c.precision == "fp32" for c in matching))

    def chunk(self, pass_name: Pass, precision: Precision) -> int:
        """Images per call of ``pass_name`` at ``precision``: the fastest measured chunk where that
        precision's chunk sizes were swept, else the chosen configuration's (a precision that lost at stage
        0 or 1 was timed at one small batch only, which says nothing of its best chunk)."""
        chosen = self.best(pass_name)
        at = {c: s for c, s in self.timings[pass_name].items() if c.precision == precision}
        return choose(at).batch if len(at) >= 2 else chosen.batch

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the cache."""
        return {
            "version": VERSION,
            "key": self.key,
            "fields": self.fields,
            "rank_correlation": self.rank_correlation,
            "seconds": round(self.seconds, 3),
            "busy_load": self.busy_load,
            "passes": {
                p: {
                    "choice": asdict(self.choices[p]),
                    "timings": [{**asdict(c), "seconds_per_image": s} for c, s in t.items()],
                }
                for p, t in self.timings.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str, fields: Mapping[str, Any], path: Path) -> Tuning:
        """A Tuning from its cached JSON form; ValueError naming what does not match ``key``/``fields``."""
        if not isinstance(d, Mapping):
            raise ValueError("not a JSON object")
        if d.get("version") != VERSION:
            raise ValueError(f"format version {d.get('version')!r}, expected {VERSION}")
        if d.get("key") != key or d.get("fields") != dict(fields):
            raise ValueError(f"written for {d.get('fields')!r}, not {dict(fields)!r}")
        rank = d.get("rank_correlation")
        if rank is not None and not isinstance(rank, int | float):
            raise ValueError(f"rank_correlation {rank!r} is not a number")
        timings: dict[str, dict[Config, float]] = {}
        for p, entry in d["passes"].items():
            if p not in PASSES:
                raise ValueError(f"unknown pass {p!r}")
            table = {}
            for row in entry["timings"]:
                s = row["seconds_per_image"]
                if not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
                    raise ValueError(f"bad timing {s!r}")
                table[Config.from_dict(row)] = float(s)
            if not table:
                raise ValueError(f"no timings for {p}")
            timings[p] = table
        busy = d.get("busy_load")
        if busy is not None and not isinstance(busy, int | float):
            raise ValueError(f"busy_load {busy!r} is not a number")
        return cls(
            key, dict(fields), timings, rank, float(d.get("seconds", 0.0)), path, cached=True, busy_load=busy
        )

    def table(self) -> str:
        """The measured table as text: one line per pass and configuration, the choice marked."""
        lines = [
            f"{self.fields['model']} {tuple(self.fields['input_shape'])} on {self.fields['device']}, "
            f"torch {self.fields['torch']}"
            + (f" (cached: {self.path})" if self.cached else f" (measured in {self.seconds:.1f} s)"),
            f"{'pass':<11} {'configuration':<26} {'batch':>5} {'images/s':>10}",
        ]
        for p, t in self.timings.items():
            for c, s in sorted(t.items(), key=lambda cs: cs[0].order()):
                mark = "  <- chosen" if c == self.choices[p] else ""
                lines.append(f"{p:<11} {c.label:<26} {c.batch:>5} {1 / s:>10.1f}{mark}")
        if self.rank_correlation is not None:
            verdict = "bf16 allowed" if self.bf16_accurate else "explanations stay fp32"
            lines.append(
                f"bf16 vs fp32 input x gradient maps: mean per-image Spearman {self.rank_correlation:.4f} "
                f"(guard {RANK_GUARD}): {verdict}"
            )
        lines.append(
            "choice: " + "; ".join(f"{p}: {c.label}, batch {c.batch}" for p, c in self.choices.items())
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


def spearman_per_image(a: Tensor, b: Tensor) -> Tensor:
    """The Spearman rank correlation of ``a`` and ``b`` ``[B, ...]`` per image: ``[B]`` (ties by position)."""
    ra = a.flatten(1).argsort(1).argsort(1).double()
    rb = b.flatten(1).argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def rank_correlation(model: nn.Module, x: Tensor, channels_last: bool = False) -> float:
    """How well bf16 autocast keeps the explanations of ``model`` (a copy in eval mode) on ``x``
    ``[B, C, H, W]``: the mean over images of the per-image Spearman rank correlation of the bf16 and fp32
    input x gradient maps (summed over channels), the map gradient methods build on. The target class is
    chosen in fp32; a non-finite bf16 map counts as -1."""
    device = x.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        target = model(x).float().argmax(1)

    def attribution(dtype: torch.dtype | None) -> Tensor:
        inp = x.detach().requires_grad_(True)
        with autocast(device, dtype):
            score = model(inp).float().gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, inp)
        return (grad.float() * x).sum(1)

    fp32, bf16 = attribution(None), attribution(torch.bfloat16)
    if not torch.isfinite(bf16).all():
        return -1.0
    return float(spearman_per_image(fp32.cpu(), bf16.cpu()).mean())


def _candidates(batch: int, layouts: Sequence[bool] = (False, True)) -> list[Config]:
    """Stage-1 candidates: precision x layout (``channels_last`` values), eager, at one batch."""
    return [Config(p, cl, batch) for p in ("fp32", "bf16") for cl in layouts]


def model_is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s 4-D weights are stored channels_last (convolutions then run in that layout)."""
    # A weight with one input channel or a 1x1 kernel is both at once: only the others tell.
    telling = [
        w
        for w in model.parameters()
        if w.ndim == 4 and w.is_contiguous() != w.is_contiguous(memory_format=torch.channels_last)
    ]
    return bool(telling) and all(w.is_contiguous(memory_format=torch.channels_last) for w in telling)


def _bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without hooks and without an instance-level ``forward`` override: tuning
    may start inside an explanation, whose hooks (Grad-CAM's activations) and autocast wrapper (which
    calls the original model) must not run on, or for, the copy."""
    m = copy.deepcopy(model)
    for module in m.modules():
        if "forward" in vars(module):
            del module.forward
        for name, value in vars(module).items():
            if name.startswith(("_forward", "_backward")) and "hooks" in name and isinstance(value, dict):
                value.clear()
    return m


class _Bench:
    """The runnable passes of one tuning: copies of the model per mode and layout, a seeded sample."""

    def __init__(
        self, model: nn.Module, input_shape: Sequence[int], device: torch.device, sample: Tensor | None
    ):
        self.model, self.device = model, device
        self.shape = tuple(int(s) for s in input_shape[-3:])
        g = torch.Generator().manual_seed(0)
        if sample is not None and tuple(sample.shape[1:]) == self.shape and len(sample):
            self.sample = sample[:16].detach().to(device=device, dtype=torch.float32)
        else:
            self.sample = torch.randn(16, *self.shape, generator=g).to(device)
        self._copies: dict[tuple, nn.Module] = {}
        with torch.no_grad():  # on a copy: the caller's model and its hooks are never run
            classes = int(self.copy(False, False, False)(self.sample[:2]).shape[1])
        self.labels = torch.randint(0, classes, (len(self.sample),), generator=g).to(device)

    def copy(self, train: bool, channels_last: bool, compiled: bool) -> nn.Module:
        """A private copy of the model (the caller's weights, modes and statistics stay untouched)."""
        k = (train, channels_last, compiled)
        if k not in self._copies:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            # Module.to accepts memory_format at runtime (torch's _parse_to), but its stub overloads omit it
            m = _bare_copy(self.model).to(device=self.device, memory_format=fmt).train(train)  # type: ignore[call-overload]
            if not train:
                m.requires_grad_(False)  # explanations need the input's gradient only
            # torch.compile of a module returns an OptimizedModule (an nn.Module); its stub says Callable
            self._copies[k] = cast(nn.Module, torch.compile(m)) if compiled else m
        return self._copies[k]

    def inputs(self, batch: int, channels_last: bool) -> tuple[Tensor, Tensor]:
        reps = -(-batch // self.sample.shape[0])
        x = self.sample.repeat(reps, 1, 1, 1)[:batch]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # clone, not .contiguous(): a one-channel tensor is contiguous in both layouts and would keep NCHW strides
        return x.clone(memory_format=fmt), self.labels.repeat(reps)[:batch]

    def runner(self, pass_name: str, c: Config) -> Callable[[], object]:
        """``run()`` doing one call of ``pass_name`` in configuration ``c``."""
        # Training converts its batches with the model; explanations' copies keep the layout of the caller's
        # inputs (``xailab.explain.batching.in_layout``), so their chunks are timed in it.
        explain_layout = inputs_channels_last(self.sample)
        x, y = self.inputs(c.batch, c.channels_last if pass_name == "train_step" else explain_layout)
        dtype = torch.bfloat16 if c.precision == "bf16" else None
        dev = self.device
        model = self.copy(pass_name == "train_step", c.channels_last, c.compile)
        if pass_name == "train_step":
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)

            def run() -> None:
                with autocast(dev, dtype):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return run
        if pass_name == "forward":

            def forward() -> None:
                with torch.no_grad(), autocast(dev, dtype):
                    model(x)

            return forward

        def input_grad() -> None:
            inp = x.detach().requires_grad_(True)
            with autocast(dev, dtype):
                score = model(inp).float().gather(1, y[:, None]).sum()
            torch.autograd.grad(score, inp)

        return input_grad


class _Metered:
    """A timer counting the seconds spent inside its calls (warm-ups and timed calls: the measuring itself),
    what the budget of ``tune`` bounds. A fake timer spends none, so injected timings never hit the budget."""

    def __init__(self, timer: Timer):
        self.timer, self.seconds = timer, 0.0

    def __call__(self, pass_name: str, config: Config, run: Callable[[], object]) -> float:
        start = time.perf_counter()
        try:
            return self.timer(pass_name, config, run)
        finally:
            self.seconds += time.perf_counter() - start


def _measure_pass(
    bench: _Bench,
    pass_name: str,
    timer: _Metered,
    train_batch: int,
    deadline: float,
    allow_bf16: Callable[[Config], bool],
) -> dict[Config, float]:
    """Seconds per image of the candidates of one pass: stage 0 probes every precision x layout at a few
    images, stage 1 times the promising ones at one batch; then, for explanation passes, chunk sizes for the
    winner (and for fp32, the exact mode, when bf16 won) until they stop improving or the time runs out.

    The cost is bounded: the probes and the first stage-1 candidate always run (every pass gets a choice);
    any other candidate starts only while ``timer.seconds`` is below ``deadline``, so a pass ends at most
    one candidate after it. A candidate left untimed keeps its probe's timing.
    """
    grad = pass_name != "forward"
    cap = max_batch(bench.shape, bench.device, grad)
    # A training step runs the model in train mode, where BatchNorm needs more than one value per channel
    # (a BatchNorm1d over [1, C] features raises): its probes and screens use two images, never one.
    least = 2 if pass_name == "train_step" else 1
    first = max(least, min(train_batch if pass_name == "train_step" else BATCHES[0], cap))
    timings: dict[Config, float] = {}
    # Stage 0, a probe of every candidate at a few images: a clear loser (bf16 emulated on an AVX2 CPU runs
    # ~8x slower) costs one small call instead of calls at the full batch.
    probes: dict[Config, float] = {}
    screens: list[float] = []
    # Training chooses the layout; explanations run the model in the layout it has (they never convert a
    # caller's model), so their candidates keep it.
    layouts = (False, True) if pass_name == "train_step" else (model_is_channels_last(bench.model),)
    for c in _candidates(max(least, first // PROBE_FRACTION), layouts):
        if c.batch > least:
            # Screened at one image first (two for training): emulated bf16 costs seconds per image on a large
            # model (densenet169 at 224x224: ~4 s on the 2-core AVX2 EPYC), so a clear loser costs one image,
            # not a probe's batch. Screens are compared with screens (same batch, same per-call overhead),
            # never with a probe: at one or two images the fixed cost of a call dominates.
            screen = Config(c.precision, c.channels_last, least, c.compile)
            seconds = timer(pass_name, screen, bench.runner(pass_name, screen)) / least
            screens.append(seconds)
            if seconds > PROBE_GIVE_UP * min(screens):
                probes[screen] = timings[screen] = seconds
                continue
        probes[c] = timings[c] = timer(pass_name, c, bench.runner(pass_name, c)) / c.batch
    fastest = min(probes.values())
    full = 0  # stage-1 candidates timed
    # The most promising first, so that a budget spent early leaves only the likely losers at their probe.
    for probe, s in sorted(probes.items(), key=lambda cs: (cs[1], cs[0].order())):
        if s > PROBE_GIVE_UP * fastest or probe.batch == first:
            continue
        if full and timer.seconds > deadline:
            logger.info("autotune %s: time spent; %s keeps its probe's timing", pass_name, probe.label)
            continue
        c = Config(probe.precision, probe.channels_last, first, probe.compile)
        timings[c] = timer(pass_name, c, bench.runner(pass_name, c)) / c.batch
        del timings[probe]  # a screening only: small batches carry more per-call overhead
        full += 1
    if pass_name == "train_step":
        # torch.compile of the eager winner only (compiling costs seconds), and only with time left
        if bench.device.type == "cuda" and timer.seconds <= deadline:
            eager = choose(timings)
            c = Config(eager.precision, eager.channels_last, eager.batch, compile=True)
            try:
                timings[c] = timer(pass_name, c, bench.runner(pass_name, c)) / c.batch
            except Exception as error:  # a model torch.compile cannot handle: report it, keep eager
                logger.warning("autotune: torch.compile failed (%s: %s)", type(error).__name__, error)
        return timings
    winner = choose(timings, allow_bf16=allow_bf16(choose(timings)))
    # The exact fp32 mode is every face's default: when bf16 wins, fp32 gets its own chunk sweep, the two
    # sharing the time left.
    sweeps = [winner] if winner.precision == "fp32" else [winner, choose(timings, allow_bf16=False)]
    now = timer.seconds
    for i, base in enumerate(sweeps):
        until = now + (deadline - now) * (i + 1) / len(sweeps)
        _sweep_chunks(bench, pass_name, timer, base, cap, until, timings)
    return timings


def _sweep_chunks(
    bench: _Bench,
    pass_name: str,
    timer: _Metered,
    base: Config,
    cap: int,
    until: float,
    timings: dict[Config, float],
) -> None:
    """Time ``base`` at the chunk sizes of ``BATCHES`` above its own, up to ``cap``, into ``timings``: stop
    two sizes past the fastest (larger chunks only outgrow the caches further) or at ``until``; then
    ``_confirm`` the closest sizes."""
    worse = 0
    for batch in (b for b in BATCHES if base.batch < b <= cap):
        if timer.seconds > until:
            logger.info("autotune %s: time spent before %s batch %d", pass_name, base.label, batch)
            break
        c = Config(base.precision, base.channels_last, batch, base.compile)
        timings[c] = timer(pass_name, c, bench.runner(pass_name, c)) / batch
        best = min(s for k, s in timings.items() if k.precision == c.precision and k.compile == c.compile)
        worse = 0 if timings[c] <= best else worse + 1
        if worse == 2:
            break
    _confirm(bench, pass_name, timer, base, until, timings)


def _confirm(
    bench: _Bench,
    pass_name: str,
    timer: _Metered,
    base: Config,
    until: float,
    timings: dict[Config, float],
) -> None:
    """Re-time the ``CONFIRM_TOP`` fastest chunk sizes of ``base``'s precision and layout in
    ``CONFIRM_ROUNDS`` interleaved rounds (while time is left before ``until``) and keep each one's median.

    The sweep times sizes one after the other, so a drift of the machine between them decides the chunk:
    on a 2-core VM six sweeps of mnist_cnn's forward pass chose 16, 32, 64 or 128 (sizes within 15% of each
    other, any of them up to 19% slower than the best, docs/benchmarks.md). Interleaving gives every
    size the same moments of the machine; the median drops one lucky or unlucky call.
    """
    same = sorted(
        (s, c.batch, c)
        for c, s in timings.items()
        if (c.precision, c.channels_last, c.compile) == (base.precision, base.channels_last, base.compile)
    )
    top = [c for _, _, c in same[:CONFIRM_TOP]]
    if len(top) < 2:
        return
    seen: dict[Config, list[float]] = {c: [timings[c]] for c in top}
    for _ in range(CONFIRM_ROUNDS):
        for c in top:
            if timer.seconds > until:
                logger.info("autotune %s: time spent while confirming %s", pass_name, base.label)
                break
            seen[c].append(timer(pass_name, c, bench.runner(pass_name, c)) / c.batch)
    for c, values in seen.items():
        timings[c] = sorted(values)[
            (len(values) - 1) // 2
        ]  # the lower median: an even count keeps the faster


def inputs_channels_last(x: Tensor | None) -> bool:
    """Whether images ``x`` ``[B, C, H, W]`` are stored channels_last (channel stride 1, which also tells a
    one-channel NHWC tensor from an NCHW one), as ``xailab.data`` makes model inputs."""
    return (
        x is not None
        and x.ndim == 4
        and x.shape[-2] * x.shape[-1] > 1
        and x.stride(1) == 1
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _key_fields(
    model: nn.Module,
    input_shape: Sequence[int],
    device: torch.device,
    train_batch: int,
    sample: Tensor | None = None,
) -> dict[str, Any]:
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "fingerprint": fingerprint(model),
        "input_shape": [int(s) for s in input_shape[-3:]],
        "device": device_name(device),
        "torch": torch.__version__,
        "train_batch": train_batch,
        "channels_last_model": model_is_channels_last(model),
        "channels_last_inputs": inputs_channels_last(sample),
    }


def cache_path(fields: Mapping[str, Any], cache_dir: str | Path | None = None) -> tuple[str, Path]:
    """The cache key of ``fields`` and the file holding its decision."""
    key = hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "autotune"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(fields["model"]))
    return key, folder / f"{safe}-{key}.json"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_load(device: torch.device) -> float | None:
    """The 1-minute load average when it exceeds this process's CPUs by ``BUSY_MARGIN`` (other work is
    competing for them), else None; None on accelerators and where the OS has no load average.

    Other processes slow the candidates unevenly (a 2-core VM running a training beside the tuning timed
    mnist_cnn's channels_last step 18x slower than NCHW, when quiet it is 1.4x faster), so a decision
    measured then is flagged, and measured again by the first tuning that finds the machine quiet.
    """
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    return load if load > usable_cpus() + BUSY_MARGIN else None


def _read_cache(path: Path, key: str, fields: Mapping[str, Any]) -> Tuning | None:
    """The cached Tuning at ``path``, or None (with a warning when the file exists but is unusable)."""
    if not path.is_file():
        return None
    try:
        return Tuning.from_dict(read_json(path), key, fields, path)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        logger.warning(
            "ignoring autotune cache %s (%s: %s); measuring again", path, type(error).__name__, error
        )
        return None


def tune(
    model: nn.Module,
    input_shape: Sequence[int],
    device: torch.device | None = None,
    passes: Iterable[Pass] = PASSES,
    *,
    timer: Timer | None = None,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    train_batch: int = 32,
    budget_s: float = BUDGET_S,
    sample: Tensor | None = None,
) -> Tuning:
    """The fastest configuration of each of ``passes`` for ``model`` on images ``[..., C, H, W]`` of
    ``input_shape`` on ``device`` (default: the model's): read from the cache, or measured and cached.

    ``train_batch`` images per timed training step. ``budget_s`` bounds what measuring costs, counted as the
    seconds spent in the timer's calls: the passes to measure share it (a pass may use what an earlier one
    left), and past its share a pass starts no candidate beyond its probes and one timed configuration, so
    the timing costs at most ``budget_s`` plus, per pass, its probes and one candidate. The whole cost is
    logged and kept as ``Tuning.seconds``. ``refresh`` measures again.
    ``timer(pass, config, run) -> seconds per call`` replaces the wall clock (tests inject fake timings).
    ``sample`` ``[N, C, H, W]``: real images for the timed passes and the bf16 accuracy check (default:
    seeded Gaussian noise). The model is never modified: passes run on private copies.
    """
    passes = tuple(dict.fromkeys(passes))
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; valid: {', '.join(PASSES)}")
    if len(input_shape) < 3:
        raise ConfigError(f"input_shape must end with (C, H, W), got {tuple(input_shape)}")
    if device is None:
        device = next(model.parameters()).device
    fields = _key_fields(model, input_shape, device, train_batch, sample)
    key, path = cache_path(fields, cache_dir)
    cached = None if refresh else _read_cache(path, key, fields)
    busy = busy_load(device)
    if cached is not None and cached.busy_load is not None and busy is None:
        logger.info(
            "autotune: %s was measured while the machine was busy (load %.1f); measuring again now that it is quiet",
            path,
            cached.busy_load,
        )
        cached = None
    if cached is not None and all(p in cached.timings for p in passes):
        logger.debug("autotune cache hit %s", path)
        return cached
    timings = dict(cached.timings) if cached is not None else {}
    rank = cached.rank_correlation if cached is not None else None
    if busy is not None:
        logger.warning(
            "autotune: measuring %s while the machine is busy (load average %.1f on %d CPUs): other work slows "
            "the candidates unevenly, so this choice may be off; it is measured again once the machine is "
            "quiet (or now: `xailab speed --model %s --refresh`)",
            fields["model"],
            busy,
            usable_cpus(),
            fields["model"],
        )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = _Bench(model, input_shape, device, sample)
    metered = _Metered(timer if timer is not None else WallClock(device))

    def allow_bf16(winner: Config) -> bool:
        """Whether an explanation pass may use bf16: checked (once) only when bf16 won stage 1."""
        nonlocal rank
        if winner.precision != "bf16":
            return True
        if rank is None:
            copy_ = bench.copy(False, winner.channels_last, False)
            rank = rank_correlation(copy_, bench.sample)  # the caller's NCHW inputs
            logger.info("autotune: bf16 vs fp32 maps, mean per-image Spearman %.4f", rank)
        return rank >= RANK_GUARD

    # Measuring must not move the global random state (dropout in timed training steps would otherwise
    # change a run depending on whether the cache already held its decision).
    # Gradients on even when called from a no_grad caller (a metric choosing its chunk size).
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        todo = [p for p in passes if p not in timings]
        for i, p in enumerate(todo):
            share = budget_s * (i + 1) / len(todo)  # what an earlier pass left carries over
            timings[p] = _measure_pass(bench, p, metered, train_batch, share, allow_bf16)
            if p in EXPLAIN_PASSES:
                allow_bf16(choose(timings[p]))  # the guard whenever bf16 is the fastest
    spent = time.perf_counter() - start
    seconds = spent + (cached.seconds if cached is not None else 0.0)
    was_busy = busy if busy is not None else (cached.busy_load if cached is not None else None)
    tuning = Tuning(key, fields, timings, rank, seconds, path, busy_load=was_busy)
    write_json(path, tuning.to_dict())
    logger.info(
        "autotuned %s %s on %s in %.1f s (%.1f s timing candidates, budget %.1f s): %s",
        fields["model"],
        tuple(fields["input_shape"]),
        fields["device"],
        spent,
        metered.seconds,
        budget_s,
        "; ".join(f"{p}: {c.label} batch {c.batch}" for p, c in tuning.choices.items()),
    )
    return tuning


# ---------------------------------------------------------------------------------------------------------
# What the rest of xailab asks (explicit settings win; with autotuning off, the fixed rules of old)
# ---------------------------------------------------------------------------------------------------------


def _check_precision(precision: str) -> None:
    """ConfigError unless ``precision`` is ``auto``, ``fp32`` or ``bf16``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision={precision!r} is not one of: auto, fp32, bf16")


def train_settings(
    model: nn.Module,
    input_shape: Sequence[int],
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | None = None,
    *,
    compile: bool = False,
    autotune: bool | None = None,
    tune_options: Mapping[str, Any] | None = None,
) -> tuple[Precision, bool]:
    """``(precision, channels_last)`` of training ``model`` on ``[..., C, H, W]`` inputs on ``device``.

    ``precision`` (``auto``/``fp32``/``bf16``) and ``channels_last`` (None: free) given explicitly are kept.
    The free ones come from the measured fastest training step (compiled or eager as ``compile`` says), or
    with autotuning off from the fixed rule: bf16 where ``bf16_is_fast``, channels_last on CUDA or with bf16.
    """
    _check_precision(precision)
    if precision != "auto" and channels_last is not None:
        return precision, channels_last  # type: ignore[return-value]
    if not enabled(autotune):
        p = precision if precision != "auto" else ("bf16" if bf16_is_fast(device) else "fp32")
        return p, (channels_last if channels_last is not None else device.type == "cuda" or p == "bf16")  # type: ignore[return-value]
    tuning = tune(model, input_shape, device, ("train_step",), **(tune_options or {}))
    c = tuning.best("train_step", None if precision == "auto" else precision, channels_last, compile)  # type: ignore[arg-type]
    return c.precision, c.channels_last


def _explain_tuning(model: nn.Module, inputs: Tensor) -> Tuning:
    """The tuning of the explanation passes (no-grad forward, forward + input gradient) of ``model`` on
    ``inputs`` ``[B, C, H, W]`` on their device, the inputs serving as the tuning sample: explanations and
    metrics share it, so one measurement (cached) serves both."""
    return tune(model, inputs.shape, inputs.device, EXPLAIN_PASSES, sample=inputs)


def explain_precision(
    model: nn.Module, inputs: Tensor, precision: str = "auto", *, autotune: bool | None = None
) -> Precision:
    """The precision of explaining ``model`` on ``inputs`` ``[B, C, H, W]``: an explicit ``fp32``/``bf16``
    as given; ``auto`` is bf16 only where it measured faster for both explanation passes and kept the
    rank-correlation guard (autotuning off: where ``bf16_is_fast``)."""
    _check_precision(precision)
    if precision != "auto":
        return cast(Precision, precision)
    if not enabled(autotune):
        return "bf16" if bf16_is_fast(inputs.device) else "fp32"
    tuning = _explain_tuning(model, inputs)
    fast = all(tuning.choices[p].precision == "bf16" for p in EXPLAIN_PASSES)
    return "bf16" if fast and tuning.bf16_accurate else "fp32"


def metric_precision(
    model: nn.Module, inputs: Tensor, precision: str = "fp32", *, autotune: bool | None = None
) -> Precision:
    """The precision of a metric's forward passes of perturbed copies of ``inputs`` ``[B, C, H, W]``
    through ``model``: an explicit ``fp32``/``bf16`` as given; ``auto`` (the fast mode) is bf16 only where
    the no-grad forward measured faster in bf16 for this model, shape and device and the rank-correlation
    guard held (autotuning off: where ``bf16_is_fast``)."""
    _check_precision(precision)
    if precision != "auto":
        return cast(Precision, precision)
    if not enabled(autotune):
        return "bf16" if bf16_is_fast(inputs.device) else "fp32"
    return _explain_tuning(model, inputs).choices["forward"].precision  # guarded: fp32 if bf16 failed it


def chunk_size(
    model: nn.Module,
    inputs: Tensor,
    grad: bool,
    *,
    precision: Precision | None = None,
    autotune: bool | None = None,
) -> int | None:
    """The measured fastest number of images per call for copies of ``inputs`` ``[B, C, H, W]`` through
    ``model``, forward only (``grad=False``) or with the input's gradient, at ``precision`` (None: the one
    ``model`` runs at now, bf16 inside ``xailab.explain.base.autocast_forward``, else fp32; see
    ``Tuning.chunk``); None with autotuning off (the caller keeps its fixed rule)."""
    if not enabled(autotune):
        return None
    if precision is None:
        precision = "bf16" if forward_dtype(model) == torch.bfloat16 else "fp32"
    return _explain_tuning(model, inputs).chunk("input_grad" if grad else "forward", precision)
