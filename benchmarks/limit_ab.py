"""Perturbation methods against their bare forward passes, interleaved: xailab's LIME, Kernel SHAP and
occlusion on a trained model, each round alternating the method calls with bare ``no_grad`` forwards of the
same number of images at every batch size of a sweep in both memory layouts (NCHW, channels_last), so that drift of the machine hits both alike. Prints
per method the median and fastest time divided by the fastest bare configuration of the same round (the
limit of issue #12: within 1.25x).

    python benchmarks/limit_ab.py --data-dir ../shared/datasets --mnist-run runs/long/mnist_cnn__mnist --rounds 7

``benchmarks/xai_throughput.py`` times each side at most three times, one after the other, which cannot
tell 1.25x from 1.4x on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import clock, trained_mnist_batch
from xailab import explain
from xailab.explain.batching import in_layout
from xailab.explain.perturbation import window_cover

GRID, N_SAMPLES, WINDOW, STRIDE = 7, 500, 8, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--mnist-run", required=True, help="a trained mnist_cnn run folder")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=["lime", "kernel_shap", "occlusion"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument(
        "--sweep", action="store_true", help="only print bare forward img/s per batch and layout (best of 3)"
    )
    args = parser.parse_args()
    model, x, t = trained_mnist_batch(args.mnist_run, args.data_dir, args.n)
    h, w = x.shape[2:]
    positions = len(window_cover(h, WINDOW, STRIDE, x.device)) * len(
        window_cover(w, WINDOW, STRIDE, x.device)
    )
    # method -> (params, images through the model: the perturbed copies the method cannot avoid)
    setups = {
        "lime": ({"segments": "grid", "grid": GRID, "n_samples": N_SAMPLES}, N_SAMPLES * args.n),
        "kernel_shap": ({"segments": "grid", "grid": GRID, "n_samples": N_SAMPLES}, N_SAMPLES * args.n),
        "occlusion": ({"window": WINDOW, "stride": STRIDE}, (positions + 1) * args.n),
    }

    def bare(total: int, batch: int, channels_last: bool) -> None:
        copies = in_layout(x.repeat((batch + args.n - 1) // args.n, 1, 1, 1)[:batch], channels_last)
        with torch.no_grad():
            for start in range(0, total, batch):
                model(copies[: min(batch, total - start)])

    if args.sweep:
        total = 4096
        for cl in (False, True):
            for b in args.batches:
                best = min(clock(lambda b=b, cl=cl: bare(total, b, cl)) for _ in range(3))
                print(f"{'channels_last' if cl else 'NCHW':13s} batch {b:5d}: {total / best:7.0f} img/s")
        return
    for method in args.methods:
        params, _ = setups[method]
        explain(model, x[:2], method, target=t[:2], **params)  # warm-up (and the autotuner's measurement)
    ratios: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            params, total = setups[method]
            limit = min(
                clock(lambda n=total, b=b, cl=cl: bare(n, b, cl))
                for b in args.batches
                for cl in (False, True)
            )
            ours = clock(lambda m=method, p=params: explain(model, x, m, target=t, **p))
            ratios[method].append(ours / limit)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.n} images, {args.rounds} rounds"
    )
    for method, rs in ratios.items():
        print(
            f"{method:12s} xailab / fastest bare forwards: median {statistics.median(rs):.2f}, best {min(rs):.2f}"
        )


if __name__ == "__main__":
    main()
