"""How far bf16 explanations move from fp32 ones: per-image Spearman rank correlation between
``explain(..., precision="bf16")`` and ``explain(...)`` maps of a trained run on real test images.

Run:  python benchmarks/bf16_agreement.py --data-dir ../shared/datasets --run runs/results/mnist_cnn__mnist
"""

from __future__ import annotations

import argparse

import torch

import xailab
from xailab.data.transforms import to_model_input

METHODS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {},
    "gradcam": {},
    "occlusion": {"window": 4, "stride": 2},
    "lime": {"n_samples": 500},
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (ties broken by position)."""
    ranks = [t.flatten().argsort().argsort().double() for t in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained run folder")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=16, help="test images")
    args = parser.parse_args()
    run = xailab.load_run(args.run)
    images = xailab.api.run_dataset(run, args.data_dir)["test"].images[: args.n]
    x = to_model_input(images, run.mean, run.std)
    print(f"{run.name}: {args.n} test images, torch {torch.__version__}, device cpu")
    for method, params in METHODS.items():
        exact = xailab.explain(run.model, x, method, **params)
        fast = xailab.explain(run.model, x, method, precision="bf16", **params)
        r = torch.tensor([spearman(exact[i], fast[i]) for i in range(len(x))])
        print(f"{method:22s} rank corr bf16 vs fp32: mean {r.nanmean():.4f}  min {r.min():.4f}")


if __name__ == "__main__":
    main()
