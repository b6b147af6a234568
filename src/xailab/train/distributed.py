"""Data-parallel training of one run over several processes (PyTorch DistributedDataParallel).

A launcher (``torchrun --nproc_per_node N -m xailab train ...``, or ``xailab train --devices N`` which starts
torchrun) runs the same training loop once per process ("rank"). The loop stays the single-process one; these
small functions are the only places where ranks differ or talk to each other:

- every rank draws the same global permutation and augments the same global batch (one shared seed), then keeps
  its rank-strided share (``shard``), so the data stream, and the generator's state in a checkpoint, do not
  depend on the world size. ``batch_size`` is the global batch; each rank processes ``batch_size / world``.
- DDP averages gradients over ranks, so a step equals a single-process step on the whole global batch, except
  that BatchNorm's batch statistics, dropout masks and a class-weighted loss's weighted mean are per rank.
- epoch sums (loss, correct) are all-reduced; evaluation shards the images and gathers the logits back.
- rank 0 alone writes files; the others wait at a barrier, and read back what rank 0 wrote.

Backends: NCCL on CUDA, gloo on the CPU. Outside a launcher everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from xailab.errors import ConfigError

# torchrun (and torch.multiprocessing users that follow its convention) describe a process with these.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (a plain single-process run)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


SINGLE_PROCESS = DistributedContext()


def launched_by_torchrun() -> bool:
    """Whether the environment describes one rank of a launched group (torchrun sets these variables)."""
    return all(v in os.environ for v in LAUNCHER_VARIABLES)


def is_main_process() -> bool:
    """Rank 0, or a process outside any launcher: the one that should print results."""
    return int(os.environ.get("RANK", "0")) == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistributedContext]:
    """Join the process group the launcher describes, for the duration of the block.

    An already initialised group (a user's own script) is used and left open; a group created here is
    destroyed on exit. Outside a launcher this yields ``SINGLE_PROCESS`` and does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        yield _context(dist.get_backend())
        return
    if not launched_by_torchrun():
        yield SINGLE_PROCESS
        return
    backend = backend_for(device)
    if device.type == "cuda":
        # One GPU per rank: NCCL needs each rank's current device set before the group forms.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, init_method="env://")
    try:
        yield _context(backend)
    finally:
        dist.destroy_process_group()


def _context(backend: str) -> DistributedContext:
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=backend,
    )


def rank_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """The device of this rank: ``cuda:<local_rank>`` for CUDA runs under a launcher, else ``device``."""
    if ctx.is_distributed and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def local_batch_size(global_batch: int, ctx: DistributedContext) -> int:
    """Images per rank and step when ``global_batch`` images make one optimiser step."""
    if global_batch % ctx.world_size:
        raise ConfigError(
            f"train config: batch_size = {global_batch} is the global batch and must be divisible by the "
            f"number of processes ({ctx.world_size}); use e.g. {global_batch - global_batch % ctx.world_size}"
        )
    return global_batch // ctx.world_size


def shard(x: Tensor, ctx: DistributedContext) -> Tensor:
    """This rank's rank-strided share ``x[rank::world_size]`` of ``x`` ``[N, ...]`` (all of it for one process).

    Strided rather than contiguous so that the shards of any ``N`` differ in size by at most one.
    """
    return x if ctx.world_size == 1 else x[ctx.rank :: ctx.world_size]


def all_reduce_sum(x: Tensor, ctx: DistributedContext) -> Tensor:
    """Sum ``x`` over the ranks, in place; returns ``x``. One collective, so reduce several numbers stacked."""
    if ctx.is_distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_shards(local: Tensor, n: int, ctx: DistributedContext) -> Tensor:
    """Reassemble ``[n, ...]`` from every rank's ``shard`` (``local`` = ``full[rank::world]``), on every rank.

    Shards are padded to one length for ``all_gather``; interleaving them back restores the original order
    and the padding lands beyond ``n``.
    """
    if ctx.world_size == 1:
        return local
    per_rank = -(-n // ctx.world_size)  # ceil
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    # parts[r][j] is image j * world + r: stacking on dim 1 and flattening interleaves them.
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if not ctx.is_distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def broadcast_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each training forward, but the last forward of an epoch updates them with each
    rank's own batch, so they differ when evaluation starts.
    """
    if ctx.is_distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (it averages gradients in backward).

    The wrapper is only for the training forward: parameters, checkpoints and evaluation use ``model`` itself.
    """
    if not ctx.is_distributed:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for the global torch RNG (dropout) of one rank in one epoch: a pure function of its arguments.

    Ranks need different dropout masks, and a resume with another world size must not depend on per-rank RNG
    state, so distributed runs reseed every epoch instead of checkpointing one RNG state per rank.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def launch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command that runs ``xailab <argv>`` as ``nproc`` ranks on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        f"--nproc-per-node={nproc}",
        "-m",
        "xailab",
        *argv,
    ]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``xailab <argv>`` as ``nproc`` ranks under torchrun and return its exit status.

    The ranks see the launcher's variables and so do not launch again. Several machines: run torchrun
    yourself on each (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``).
    """
    if nproc < 1:
        raise ConfigError(f"train: --devices must be at least 1, got {nproc}")
    return subprocess.call(launch_command(argv, nproc))
