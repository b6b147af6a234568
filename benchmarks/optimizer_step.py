"""The optimiser step on a CPU: PyTorch's per-tensor for-loop (its CPU default) against its fused kernel.

PyTorch picks the ``foreach`` (multi-tensor) implementation only on accelerators; on a CPU, Adam, AdamW and
SGD run a Python loop over the parameter tensors unless ``fused=True`` is asked for. This times, for each model
of the seed grid at the grid's input ([3, 32, 32], batch 128), one full training step (forward, backward, step:
the work a training epoch repeats) and the optimiser step alone, with the step done by the for-loop and by
the fused kernel, interleaved rounds, medians. The limit of the step is the fused kernel itself (one pass over
the parameters, gradients and moments); the ratio says how much of a training step the choice can move.

    .venv/bin/python benchmarks/optimizer_step.py --rounds 5

Keep the machine quiet while it runs: the figures are wall-clock times. The forward in fp32, or under bf16
autocast with ``--bf16`` (the autotuner's choice for ``efficient_cnn`` and ``resnet18`` on a native-bf16 CPU);
the step is fp32 either way.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import xailab


def make_optimizer(name: str, params: list[nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    """The recipes' optimisers (``xailab.train.loop._optimizer``'s settings) with or without ``fused``."""
    flags = {"fused": True} if fused else {"foreach": False}
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, **flags)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **flags)


def time_model(
    model_name: str, opt_name: str, rounds: int, batch: int, bf16: bool
) -> dict[str, tuple[float, float]]:
    """``{impl: (median full step s, median optimiser step s)}`` for ``impl`` in ``loop``/``fused``."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    results: dict[str, tuple[list[float], list[float]]] = {"loop": ([], []), "fused": ([], [])}
    models = {}
    opts = {}
    for impl in results:
        models[impl] = xailab.create_model(model_name, num_classes=10, in_channels=3).train()
        opts[impl] = make_optimizer(opt_name, list(models[impl].parameters()), impl == "fused")
    for r in range(rounds + 1):  # round 0 warms up (allocations, moment buffers)
        for impl in results:
            model, opt = models[impl], opts[impl]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r:
                results[impl][0].append(t2 - t0)
                results[impl][1].append(t2 - t1)
    return {k: (statistics.median(full), statistics.median(step)) for k, (full, step) in results.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficient_cnn,resnet18,mobilenetv2")
    p.add_argument("--optimizers", default="adamw,sgd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument(
        "--bf16", action="store_true", help="the forward under bf16 autocast (the step stays fp32)"
    )
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        "model          opt    params  full step loop / fused (s)   optimiser step loop / fused (ms)  ratio  share"
    )
    for model_name in args.models.split(","):
        for opt_name in args.optimizers.split(","):
            res = time_model(model_name, opt_name, args.rounds, args.batch, args.bf16)
            n = sum(
                p.numel() for p in xailab.create_model(model_name, num_classes=10, in_channels=3).parameters()
            )
            (full_l, step_l), (full_f, step_f) = res["loop"], res["fused"]
            print(
                f"{model_name:14s} {opt_name:6s} {n:>8,d}  {full_l:.3f} / {full_f:.3f}"
                f"                  {1e3 * step_l:7.1f} / {1e3 * step_f:7.1f}"
                f"                 {step_l / step_f:5.2f}x  {step_l / full_l:5.1%}"
            )


if __name__ == "__main__":
    main()
