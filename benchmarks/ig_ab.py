"""Integrated gradients, xailab vs Captum, interleaved: the same trained model, inputs, 50 Gauss-Legendre
steps and zero baseline, alternating calls so that drift of the machine hits both alike; prints each side's
median and fastest explanations/s and their ratio, and the largest difference of the maps.

    python benchmarks/ig_ab.py --data-dir ../shared/datasets --mnist-run runs/long/mnist_cnn__mnist --rounds 10

``benchmarks/xai_throughput.py`` times each side at most three times, one after the other: integrated
gradients on mnist_cnn then spreads 17-20 exp/s run to run, too much to tell 0.9x from 1x.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from captum.attr import IntegratedGradients

from common import clock, trained_mnist_batch
from xailab import explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--mnist-run", required=True, help="a trained mnist_cnn run folder")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peer-batch", type=int, default=256, help="Captum's internal_batch_size")
    args = parser.parse_args()
    model, x, t = trained_mnist_batch(args.mnist_run, args.data_dir, args.n)
    ig = IntegratedGradients(model)

    def ours() -> torch.Tensor:
        return explain(model, x, "integrated_gradients", target=t, n_steps=args.steps, reduce=None)

    def theirs() -> torch.Tensor:
        return ig.attribute(x, target=t, n_steps=args.steps, internal_batch_size=args.peer_batch)

    a, b = ours(), theirs()  # warm-up (and the autotuner's one measurement)
    times: dict[str, list[float]] = {"xailab": [], "captum": []}
    for _ in range(args.rounds):
        for name, fn in (("xailab", ours), ("captum", theirs)):
            times[name].append(clock(fn))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.n} images, {args.steps} steps"
    )
    for name, ts in times.items():
        print(
            f"{name:7s} median {args.n / statistics.median(ts):6.1f} exp/s  fastest {args.n / min(ts):6.1f} exp/s"
        )
    ratio_med = statistics.median(times["captum"]) / statistics.median(times["xailab"])
    ratio_best = min(times["captum"]) / min(times["xailab"])
    print(f"captum time / xailab time: median {ratio_med:.2f}x, fastest {ratio_best:.2f}x")
    print(f"max |xailab - captum| = {(a - b).abs().max().item():.2e} (map max {b.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
