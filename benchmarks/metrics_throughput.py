"""Explanation-quality metric throughput: xailab vs Quantus 0.6 (and Captum's ``infidelity`` /
``sensitivity_max``) on the same model, inputs, attributions and settings, in one run.

For each metric: seconds per explained image of ``xailab.evaluate_explanations`` and of each peer, the
speed-up (peer time / xailab time), the max |difference| of the per-image values from the peer's, and
xailab's time divided by the time of the bare passes the metric cannot avoid, in three modes:

- ``fixed``: exact fp32 with the fixed chunk rule (``XAILAB_AUTOTUNE=0``);
- ``exact``: exact fp32 (the default) with the chunk measured fastest for the model in fp32 by
  ``xailab.autotune`` (cached);
- ``fast``: ``precision="auto"``, bf16 autocast of the metric's forward passes only where the autotuner
  measured it faster for this model and shape (and its accuracy guard held), in the chunk measured fastest
  at that precision; metrics that re-explain run saliency at ``explain_precision("auto")``. The precision
  it took is printed, and the max |fast - exact| of xailab's own values.

The limit: the perturbed copies' ``no_grad`` forward passes, or the forward+backward passes of re-explaining
with saliency, at the fastest of a few batch sizes, measured on the same model in the same run: in fp32 for
the fixed and exact modes, at the fastest precision (fp32 or bf16 autocast) for the fast mode. Peers run fp32
NCHW, as they do by default.

Settings (identical for both; where a peer draws random numbers, its draw is replayed and handed to
xailab, as in ``tests/test_quality_parity_quantus.py``):

- ``pixel_flipping``: steps of one image row (W pixels = Quantus ``features_in_step = C * W``), "black"
  baseline, softmax. Quantus needs ``features_in_step`` to divide H * W, impossible for 3 channels on 32x32,
  so on resnet18 Quantus runs ``features_in_step = 32`` channel values (timed, values not comparable);
- ``faithfulness_correlation``: 100 runs of 224-pixel subsets, "black" baseline, logits (one channel: same
  values; three channels: Quantus samples channel values, timed only);
- ``road``: 50 percentages 1, 3, ..., 99, MoRF, no noise (so values compare; Quantus's imputation indexes
  pixels with channel-value indices and only works for one channel: mnist_cnn only);
- ``infidelity``: Quantus's cumulative 4x4 patches with the "black" baseline (``n_perturb_samples=1``, its
  repeats are identical); Captum: 32 Gaussian perturbations of std 0.1 (the same noise);
- ``max_sensitivity`` / ``avg_sensitivity``: 10 uniform perturbations of radius 0.2, saliency re-explained
  (Captum: ``sensitivity_max`` with the same noise);
- ``model_randomisation``: Quantus MPRT, cascading top-down, seed 42, saliency, per-layer Spearman;
- ``random_logit``: saliency of a random other class (Quantus's draw), SSIM on the 2-D maps scaled to max 1;
- ``sparseness``, ``complexity``: no passes.

Models are random-init in eval mode (timings do not depend on the weights) unless ``--mnist-run`` points at
a trained ``mnist_cnn`` run.

Run:  OMP_NUM_THREADS=2 python benchmarks/metrics_throughput.py --data-dir ../shared/datasets \\
          [--mnist-run runs/results/mnist_cnn__mnist] [--n 32] [--models mnist_cnn resnet18] [--metrics ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import xailab
from xailab import autotune, create_model, evaluate_explanations, explain, load_dataset
from xailab.data.transforms import to_model_input
from xailab.device import autocast
from xailab.metrics import METRICS
from xailab.metrics.base import forward_mode, method_explainer
from xailab.metrics.randomisation import max_normalised, randomisable_layers

N_RUNS, SUBSET = 100, 224
PERCENTAGES = list(range(1, 100, 2))
N_SENS, RADIUS = 10, 0.2
N_INFID, NOISE_STD = 32, 0.1


@contextlib.contextmanager
def autotuning(value: str):
    """``XAILAB_AUTOTUNE=value`` for the block (``1``: chunk sizes measured per model; ``0``: the fixed rule)."""
    previous = os.environ.get("XAILAB_AUTOTUNE")
    os.environ["XAILAB_AUTOTUNE"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("XAILAB_AUTOTUNE")
        else:
            os.environ["XAILAB_AUTOTUNE"] = previous


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (after nothing: each metric is long enough) and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bare_rates(
    model: nn.Module, x: Tensor, target: Tensor, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Images/s of bare ``no_grad`` forward passes and of forward+backward of the target logits on copies of
    ``x``, under ``dtype`` autocast (None: fp32): the fastest of batches 16 to 512 (a CPU is not always
    fastest at the largest), the best of 3 rounds after a warm-up each. bf16 tries fewer batches: emulated
    on CPUs without native bf16, it is several times slower and only shows that fp32 is the limit."""

    def rate(batch: int, grad: bool) -> float:
        reps = -(-batch // len(x))
        xs = x.repeat(reps, 1, 1, 1)[:batch].contiguous().requires_grad_(grad)
        ts = target.repeat(reps)[:batch]

        def once():
            if grad:
                with autocast(x.device, dtype):
                    score = model(xs).float().gather(1, ts[:, None]).sum()
                score.backward()
            else:
                with torch.no_grad(), autocast(x.device, dtype):
                    model(xs)

        once()
        return batch / min(timed(once)[0] for _ in range(3))

    fwd_batches, fb_batches = (
        ((16, 32, 64, 256, 512), (16, 64, 256)) if dtype is None else ((16, 64), (16, 64))
    )
    forward = max(rate(batch, False) for batch in fwd_batches)
    backward = max(rate(batch, True) for batch in fb_batches)
    model.zero_grad(set_to_none=True)
    return forward, backward


def load(model_name: str, args) -> tuple[nn.Module, Tensor, str]:
    """The model (eval mode), N normalised test images ``[N, C, H, W]`` and a description."""
    if model_name == "mnist_cnn":
        ds = load_dataset("mnist", data_dir=args.data_dir, image_size=28)
    else:
        ds = load_dataset("cifar10", root=Path(args.data_dir) / "cifar10-subset", image_size=32)
    mean, std = tuple(ds.mean), tuple(ds.std)
    torch.manual_seed(0)
    if model_name == "mnist_cnn" and args.mnist_run:
        run = xailab.load_run(args.mnist_run)
        model, mean, std, how = run.model, tuple(run.mean), tuple(run.std), f"trained run {args.mnist_run}"
    else:
        model, how = (
            create_model(model_name, in_channels=ds.channels, num_classes=ds.num_classes),
            "random init",
        )
    x = to_model_input(ds["test"].images[: args.n], torch.tensor(mean), torch.tensor(std)).contiguous()
    return model.float().eval(), x, how


def quantus_explain(method: str, normalise: bool = False):
    """A Quantus ``explain_func`` running ``xailab.explain``."""

    def explain_func(model, inputs, targets, **kwargs):
        maps = explain(model, torch.as_tensor(inputs), method, torch.as_tensor(targets).long())
        return (max_normalised(maps) if normalise else maps).numpy()

    return explain_func


def replayed_subsets(b: int, features: int, seed: int) -> np.ndarray:
    """Quantus FaithfulnessCorrelation's draw of subsets (and of the discarded "uniform" baseline)."""
    np.random.seed(seed)
    draws = []
    for _ in range(N_RUNS):
        draws.append(np.stack([np.random.choice(features, SUBSET, replace=False) for _ in range(b)]))
        np.random.uniform(size=b)
    return np.stack(draws, 1)


def replayed_uniform(x: Tensor, seed: int) -> Tensor:
    """Quantus Max/AvgSensitivity's draw of uniform noise, rounded as it is added: ``[B, S, C, H, W]``."""
    np.random.seed(seed)
    b = len(x)
    draws = np.stack([np.random.uniform(-RADIUS, RADIUS, size=(b, x[0].numel())) for _ in range(N_SENS)], 1)
    noise = torch.as_tensor(draws).view(b, N_SENS, *x.shape[1:])
    return (x.double()[:, None] + noise).float() - x[:, None]


def bench_model(model_name: str, args) -> None:
    import quantus
    from captum.metrics import infidelity as captum_infidelity
    from captum.metrics import sensitivity_max as captum_sensitivity_max
    from quantus.functions.similarity_func import ssim as quantus_ssim

    model, x, how = load(model_name, args)
    b, c, h, w = x.shape
    with torch.no_grad():
        y = model(x).argmax(1)
    a = explain(model, x, "saliency", y)
    xn, yn, an = x.numpy(), y.numpy(), a.numpy()
    n_layers = len(randomisable_layers(model))
    print(f"\n### {model_name} ({how}), {b} test images {c}x{h}x{w}, saliency maps, {n_layers} layers")
    rates = {"fp32": bare_rates(model, x, y), "bf16": bare_rates(model, x, y, torch.bfloat16)}
    for name, (fwd, fb) in rates.items():
        print(f"bare passes {name} (fastest batch): forward {fwd:.1f} img/s (no_grad), forward+backward "
              f"{fb:.1f} img/s")  # fmt: skip
    fwd_rate, fb_rate = rates["fp32"]
    fastest_fwd, fastest_fb = (max(r[i] for r in rates.values()) for i in (0, 1))
    with autotuning("1"):  # measured once here (cached), so no metric's time below includes the tuning
        fast = forward_mode(model, x, "auto")
        exact = forward_mode(model, x, "fp32")
        explain_fast = autotune.explain_precision(model, x, "auto")
        print(autotune.tune(model, x.shape, x.device, autotune.EXPLAIN_PASSES, sample=x).table())
    print(f"exact mode: fp32, chunk {exact.chunk}; fast mode: metrics' forward passes {fast.precision}, chunk "
          f"{fast.chunk}; re-explanations {explain_fast}")  # fmt: skip

    def explain_precision(precision: str) -> str:
        return explain_fast if precision == "auto" else precision

    def ours(metric: str, **params) -> Callable[[str], np.ndarray]:
        def run(precision: str) -> np.ndarray:
            scores = evaluate_explanations(model, x, y, a, metrics=[metric], precision=precision, **params)
            return scores[metric].numpy()

        return run

    def direct(metric: str, **params) -> Callable[[str], np.ndarray]:
        """The registered metric on the given saliency maps, re-explaining with saliency (as the peers,
        which get the maps precomputed too) at the mode's precision."""
        fn = METRICS.get(metric).fn

        def run(precision: str) -> np.ndarray:
            explain_fn = method_explainer("saliency", precision=explain_precision(precision))
            return fn(model, x, y, a, explain_fn=explain_fn, **params).numpy()

        return run

    def randomisation(precision: str) -> np.ndarray:
        return xailab.metrics.model_randomisation(
            model, x, y, method="saliency", attributions=a, seed=42,
            method_params={"precision": explain_precision(precision)},
        ).spearman.numpy()  # fmt: skip

    def road(precision: str) -> np.ndarray:
        mode = forward_mode(model, x, precision)  # as evaluate_explanations runs the metric
        with mode.applied(model):
            curve = xailab.metrics.road_curve(
                model, x, y, a, percentages=tuple(PERCENTAGES), noise=0.0, batch_size=mode.chunk
            )
        return curve.numpy().mean(0)

    def q(metric, seed: int = 0, a_batch: np.ndarray | None = None, **call) -> Callable[[], object]:
        def run():
            np.random.seed(seed)  # the state its draws were replayed from
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                maps = an if a_batch is None else a_batch
                return metric(model=model, x_batch=xn, y_batch=yn, a_batch=maps, device="cpu", **call)

        return run

    def ssim_2d(p, r, batched=True, **kwargs):
        return [quantus_ssim(u.reshape(h, w), v.reshape(h, w)) for u, v in zip(p, r, strict=True)]

    np.random.seed(42)
    draw = torch.as_tensor(np.random.randint(0, 9, b))
    off = draw + (draw >= y).long()
    subsets = torch.as_tensor(replayed_subsets(b, h * w if c == 1 else c * h * w, 7))
    sens_noise = replayed_uniform(x, 11)
    gauss = torch.randn(b, N_INFID, c, h, w, generator=torch.Generator().manual_seed(5)) * NOISE_STD
    rows_pf = 32 if c == 3 else w
    n_patches = (h // 4) * (w // 4)

    def captum_perturb(inputs):
        return gauss.flatten(0, 1), inputs - gauss.flatten(0, 1)

    def captum_sens_perturb(inputs, perturb_radius=0.0):
        return (inputs[0] if isinstance(inputs, tuple) else inputs) + sens_noise.flatten(0, 1)

    def captum_explanation(inputs, target):
        return (explain(model, inputs[0] if isinstance(inputs, tuple) else inputs, "saliency", target),)

    def captum_max_sens():
        return captum_sensitivity_max(
            captum_explanation, x, perturb_func=captum_sens_perturb, n_perturb_samples=N_SENS, target=y
        ).numpy()

    def captum_infid():
        return captum_infidelity(
            model, captum_perturb, x, a.expand_as(x), target=y, n_perturb_samples=N_INFID
        )

    mprt = quantus.MPRT(seed=42, disable_warnings=True)
    # metric -> (ours, [(peer name, peer, how to compare)], forward images, forward+backward images)
    cases = {
        "pixel_flipping": (
            ours("pixel_flipping", pixels_per_step=w),
            [("Quantus", q(quantus.PixelFlipping(features_in_step=c * w if c == 1 else rows_pf,
                                                  disable_warnings=True)),
              (lambda v: np.trapezoid(np.asarray(v), dx=1, axis=1)) if c == 1 else None)],
            b * h, 0,
        ),
        "faithfulness_correlation": (
            ours("faithfulness_correlation", subsets=subsets if c == 1 else None, subset_size=SUBSET),
            [("Quantus", q(quantus.FaithfulnessCorrelation(nr_runs=N_RUNS, subset_size=SUBSET,
                                                           return_aggregate=False, disable_warnings=True), seed=7),
              np.asarray if c == 1 else None)],
            b * (N_RUNS + 1), 0,
        ),
        "infidelity (patches)": (
            ours("infidelity", perturbation="patches", patch_size=4, baseline="black"),
            [("Quantus", q(quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1,
                                              disable_warnings=True)), np.asarray)],
            b * (n_patches + 1), 0,
        ),
        "infidelity (gaussian)": (
            ours("infidelity", perturbations=gauss),
            [("Captum", captum_infid, lambda v: v.numpy())],
            b * (N_INFID + 1), 0,
        ),
        "max_sensitivity": (
            direct("max_sensitivity", noise=sens_noise),
            [("Quantus", q(quantus.MaxSensitivity(nr_samples=N_SENS, lower_bound=RADIUS, disable_warnings=True),
                           explain_func=quantus_explain("saliency"), seed=11), np.asarray),
             ("Captum", captum_max_sens, np.asarray)],
            0, b * N_SENS,
        ),
        "avg_sensitivity": (
            direct("avg_sensitivity", noise=sens_noise),
            [("Quantus", q(quantus.AvgSensitivity(nr_samples=N_SENS, lower_bound=RADIUS, disable_warnings=True),
                           explain_func=quantus_explain("saliency"), seed=11), np.asarray)],
            0, b * N_SENS,
        ),
        "model_randomisation": (
            randomisation,
            [("Quantus MPRT", q(mprt, explain_func=quantus_explain("saliency")),
              lambda v: np.asarray([v[k] for k in v if k != "original"]))],
            0, b * n_layers,
        ),
        "random_logit": (
            direct("random_logit", off_targets=off),
            [("Quantus", lambda: q(quantus.RandomLogit(num_classes=10, seed=42, similarity_func=ssim_2d,
                                                       normalise=False, disable_warnings=True),
                                   explain_func=quantus_explain("saliency", normalise=True),
                                   a_batch=max_normalised(a).numpy())(), np.asarray)],
            0, b,
        ),
        "sparseness": (ours("sparseness"), [("Quantus", q(quantus.Sparseness(normalise=False,
                                                                             disable_warnings=True)), np.asarray)],
                       0, 0),
        "complexity": (ours("complexity"), [("Quantus", q(quantus.Complexity(normalise=False,
                                                                             disable_warnings=True)), np.asarray)],
                       0, 0),
    }  # fmt: skip
    if c == 1:
        cases["road (no noise)"] = (
            road,
            [("Quantus", q(quantus.ROAD(percentages=PERCENTAGES, noise=0.0, disable_warnings=True)),
              lambda v: np.asarray([v[p] for p in PERCENTAGES]))],
            b * len(PERCENTAGES), 0,
        )  # fmt: skip
    print("| metric | xailab s/img (fixed / exact / fast) | peer s/img | peer time / xailab time (fixed / exact / "
          "fast) | max abs diff vs peer (exact) | max abs fast - exact | xailab / limit (fixed / exact / fast) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for metric, (fn_ours, peers, fwd_images, fb_images) in cases.items():
        if args.metrics and metric.split(" ")[0] not in args.metrics:
            continue
        with autotuning("0"):  # the fixed chunk rule, fp32
            fixed_s, _ = timed(partial(fn_ours, "fp32"))
        with autotuning("1"):  # the chunks and precision measured fastest for this model (cached above)
            exact_s, value = timed(partial(fn_ours, "fp32"))
            fast_s, fast_value = timed(partial(fn_ours, "auto"))
        own = np.asarray(fast_value, dtype=float) - np.asarray(value, dtype=float)
        fast_diff = f"{np.nanmax(np.abs(own)):.2g}" if own.size and not np.isnan(own).all() else "n/a"
        times = (fixed_s, exact_s, fast_s)
        limits = (fwd_images / fwd_rate + fb_images / fb_rate,) * 2 + (
            fwd_images / fastest_fwd + fb_images / fastest_fb,
        )
        ratio = (
            " / ".join(f"{t / lim:.2f}x" for t, lim in zip(times, limits, strict=True))
            if limits[0] > 0
            else "n/a"
        )
        per_image = " / ".join(f"{t / b:.4f}" for t in times)
        for peer_name, peer, to_values in peers:
            try:
                peer_seconds, peer_value = timed(peer)
                diff = "n/a (other definition)"
                if to_values is not None:
                    diff = f"{np.nanmax(np.abs(np.asarray(to_values(peer_value), dtype=float) - value)):.2g}"
                speed = " / ".join(f"{peer_seconds / t:.1f}x" for t in times)
                print(f"| {metric} vs {peer_name} | {per_image} | {peer_seconds / b:.4f} | {speed} | {diff} | "
                      f"{fast_diff} | {ratio} |")  # fmt: skip
            except Exception as e:  # a failing peer is reported, not fatal
                traceback.print_exc(limit=1)
                print(f"| {metric} vs {peer_name} | {per_image} | failed: {type(e).__name__} | | | {fast_diff} | "
                      f"{ratio} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding mnist/ and cifar10-subset/")
    parser.add_argument("--mnist-run", default=None, help="a trained mnist_cnn run folder (else random init)")
    parser.add_argument(
        "--models", nargs="+", default=["mnist_cnn", "resnet18"], choices=["resnet18", "mnist_cnn"]
    )
    parser.add_argument("--n", type=int, default=32, help="test images per model")
    parser.add_argument("--metrics", nargs="*", help="only these metrics (default: all)")
    args = parser.parse_args()
    versions = [f"{p} {metadata.version(p)}" for p in ("quantus", "captum")]
    print(", ".join(versions))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    for model_name in args.models:
        start = time.perf_counter()
        bench_model(model_name, args)
        print(f"({model_name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
