"""Device helpers shared by every layer (training, explanations, metrics, the autotuner).

They import nothing of xailab but its errors, so ``explain/`` can use them without importing ``train/``.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch
from torch import nn

from xailab.errors import ConfigError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device ``name`` names (``auto``: CUDA where present, else the CPU), checked to exist on this
    machine: ``banana``, or ``cuda`` on a build without CUDA, raise ``ConfigError`` saying what is available.
    A ``torch.device`` is taken as it is."""
    if isinstance(name, torch.device):
        return name
    available = ["auto", "cpu"] + (
        ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
        if torch.cuda.is_available()
        else []
    )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {name!r} is not a device; valid here: {', '.join(available)}") from None
    if device.type == "cpu":
        return device
    if (
        device.type == "cuda"
        and torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count())
    ):
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ConfigError(
        f"device {name!r} is not available on this machine (this PyTorch build sees "
        f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA devices); "
        f"valid here: {', '.join(available)}"
    )


def cpu_name() -> str:
    """The processor's model name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What runs the work on ``device``: the CUDA device name, or the CPU model name with the number of
    threads torch uses (the fastest chunk size depends on both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return device.type


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast *should* speed this device up (CUDA with bf16, or a CPU with native bf16 in
    oneDNN): the fixed rule used when autotuning is off (``xailab.autotune`` measures instead).

    On CPUs without AVX-512 BF16/AMX, bf16 convolutions are emulated and several times slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# The attribute ``xailab.explain.base.autocast_forward`` sets on the forward it swaps into a model: the dtype
# the model runs at for the block, so a chunk size chosen inside it is the one measured at that precision.
AUTOCAST_DTYPE = "xailab_autocast_dtype"


def forward_dtype(model: nn.Module) -> torch.dtype | None:
    """The autocast dtype ``model``'s forward runs at now (inside ``autocast_forward``), or None (fp32)."""
    return getattr(vars(model).get("forward"), AUTOCAST_DTYPE, None)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so a wall clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
