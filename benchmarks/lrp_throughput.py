"""LRP throughput: xailab's LRP vs Captum's ``LRP`` on mnist_cnn, and vs input x gradient on every zoo model,
in one run.

LRP should cost about one forward and one backward pass (plus one probe pass of one image and a copy of the
model per call), i.e. about what input x gradient costs; Captum's LRP runs two forward passes and a backward
pass with Python hooks on every layer. For each model the table gives explanations per second of
``explain(..., "lrp")`` with the epsilon composite (Captum's default rule) and with ``epsilon_plus_flat``,
of ``explain(..., "input_x_gradient")``, and the ratios; on mnist_cnn also Captum's rate, the speed-up and
the max |difference| of the two epsilon maps (Captum gets the same network with its global mean as
``AdaptiveAvgPool2d`` + ``Flatten``, which its rules understand, and batch norms under its epsilon rule, so
xailab runs with ``canonize=False`` for that comparison).

Models are random-init in eval mode (timings do not depend on the weights), ``--n`` images per call, best of
``--repeats`` calls after one warm-up. ImageNet backbones run at ``--imagenet-size`` (224 by default).

Run:  python benchmarks/lrp_throughput.py [--n 64] [--repeats 3] [--models mnist_cnn resnet18] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from xailab.explain import explain
from xailab.explain.lrp import Epsilon
from xailab.models import MODELS, create_model, list_models, model_input_size

NUM_CLASSES = 10


def build(name: str) -> nn.Module:
    options = (
        {"pretrained": False}
        if "pretrained" in inspect.signature(MODELS.get(name).factory).parameters
        else {}
    )
    torch.manual_seed(0)
    return create_model(name, 1 if name == "mnist_cnn" else 3, NUM_CLASSES, **options).eval()


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def captum_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Captum's LRP with its default epsilon rules on the VGG-style CNN as modules Captum understands."""
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule

    twin = copy.deepcopy(model)
    net = nn.Sequential(twin.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), twin.classifier).eval()
    flatten = net[2]
    lrp = LRP(net)

    def run() -> torch.Tensor:
        flatten.rule = EpsilonRule()  # Captum removes every rule after a call; Flatten has no default one
        return lrp.attribute(x.clone().requires_grad_(True), target=target).detach()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=None, help="default: every convolutional zoo model")
    parser.add_argument("--imagenet-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or [n for n in list_models() if "conv" in _capabilities(n)]
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, n={args.n}"
    )
    print(
        f"{'model':22s} {'lrp eps/s':>10s} {'lrp e+flat/s':>12s} {'ixg/s':>9s} {'ixg/lrp':>8s} {'captum/s':>9s} {'x faster':>9s} {'max|diff|':>10s}"
    )
    for name in names:
        model = build(name)
        size = model_input_size(name)
        if size[0] > 64:
            size = (args.imagenet_size, args.imagenet_size)
        channels = 1 if name == "mnist_cnn" else 3
        x = torch.randn(args.n, channels, *size, generator=torch.Generator().manual_seed(0))
        target = torch.arange(args.n) % NUM_CLASSES
        call = functools.partial(explain, model, x, target=target)
        eps = best_time(functools.partial(call, "lrp", composite="epsilon"), args.repeats)
        flat = best_time(functools.partial(call, "lrp", composite="epsilon_plus_flat"), args.repeats)
        ixg = best_time(functools.partial(call, "input_x_gradient"), args.repeats)
        row = f"{name:22s} {args.n / eps:10.1f} {args.n / flat:12.1f} {args.n / ixg:9.1f} {ixg / eps:8.2f}"
        if name == "mnist_cnn":
            theirs_fn = captum_lrp(model, x, target)
            theirs_t = best_time(theirs_fn, args.repeats)
            mapping = {"conv": Epsilon(1e-9), "linear": Epsilon(1e-9), "norm": Epsilon(1e-9)}
            ours = explain(model, x, "lrp", target, reduce=None, composite=mapping, canonize=False)
            diff = (ours - theirs_fn()).abs().max().item()
            row += f" {args.n / theirs_t:9.1f} {theirs_t / eps:9.2f} {diff:10.2e}"
        print(row, flush=True)


def _capabilities(name: str) -> frozenset[str]:
    from xailab.explain import model_capabilities

    return model_capabilities(build(name))


if __name__ == "__main__":
    main()
