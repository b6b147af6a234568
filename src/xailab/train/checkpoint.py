"""Checkpoints as safetensors (tensors) + JSON (everything else). Never pickle: loading one runs no code."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from xailab.errors import CheckpointError
from xailab.io import atomic_write


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors wants dense, contiguous CPU tensors (channels_last params are not contiguous).
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Atomically write ``tensors`` to a safetensors file."""
    return atomic_write(path, lambda p: save_file(_plain(tensors), str(p), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file, with an error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); delete it or re-run training"
        ) from None


def save_weights(path: str | Path, model: nn.Module) -> Path:
    """Write a model's ``state_dict`` (parameters and buffers) as safetensors."""
    return save_tensors(path, model.state_dict())


def load_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load safetensors weights into ``model`` (in place, strict), keeping its device and memory format."""
    state = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model: {str(e).splitlines()[0]}") from None
    return model


def _split_state(prefix: str, obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor inside ``obj`` by a reference ``{"__tensor__": key}`` and collect it in ``tensors``."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_state(f"{prefix}.{k}", v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    rng: dict[str, Tensor],
    extra: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint.safetensors``: everything needed to resume exactly, in one atomic file.

    Tensors (weights, optimiser moments, RNG states) are the file's tensors; the rest (epoch, history,
    schedule, optimiser hyper-parameters) is JSON in its metadata, so the two can never disagree.
    """
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim = _split_state("optimizer", optimizer.state_dict(), tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})  # e.g. the EMA of the weights
    meta = {**info, "optimizer": optim, "rng": sorted(rng), "extra": sorted(extra or {})}
    return save_tensors(run_dir / "checkpoint.safetensors", tensors, metadata={"xailab": json.dumps(meta)})


def checkpoint_info(run_dir: Path) -> dict[str, Any]:
    """The JSON part of ``run_dir/checkpoint.safetensors`` (epoch, history, schedule...) without reading its
    tensors; CheckpointError when the file is absent or not an xailab training checkpoint."""
    path = run_dir / "checkpoint.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoint.safetensors: nothing to resume (start a new run instead)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("xailab")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); delete it or re-run training"
        ) from None
    if meta is None:
        raise CheckpointError(f"{path} is not an xailab training checkpoint (no 'xailab' metadata)")
    return dict(json.loads(meta))


def load_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Restore model and optimizer from ``run_dir/checkpoint.safetensors``; returns (info, RNG states).

    ``extra``: tensors saved with ``save_checkpoint(..., extra=...)`` are copied into these, in place; a
    checkpoint without one of them raises (it was written by another recipe).
    """
    path = run_dir / "checkpoint.safetensors"
    info = checkpoint_info(run_dir)
    tensors = load_tensors(path)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model: {str(e).splitlines()[0]}") from None
    optim = _join_state(info.pop("optimizer"), tensors)
    optim["state"] = {int(k): v for k, v in optim["state"].items()}
    optimizer.load_state_dict(optim)
    rng = {k: tensors[f"rng.{k}"] for k in info.pop("rng")}
    saved_extra = info.pop("extra", [])
    for k, v in (extra or {}).items():
        if k not in saved_extra:
            raise CheckpointError(f"{path} lacks the saved state {k!r}; it was written by another recipe")
        v.copy_(tensors[f"extra.{k}"])
    return info, rng
