"""Explaining many images to disk: attributions streamed as safetensors parts, an index CSV and figures.

Memory stays flat whatever the number of images: each chunk is explained, written and dropped. A killed
job resumes: a chunk whose part file exists is read back instead of recomputed, when the part's key (the
model's weights, the chunk's images, methods, parameters, precision, normalisation) says it is this job's; a
folder holding another job's parts is refused rather than mixed. The folder is locked while it is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from xailab.data.transforms import to_model_input
from xailab.errors import ConfigError
from xailab.explain.base import explain
from xailab.explain.figures import explanation_panel, prediction_grid, save_figure
from xailab.io import atomic_write, folder_lock, tensor_digest, write_text

GRID_SIZE = 32
PART_KEY = "xailab_part"  # the safetensors metadata entry holding a part's key


def _tensor_writer(tensors: dict[str, Tensor], key: str) -> Callable[[Path], None]:
    """A writer for ``atomic_write`` saving ``tensors`` as one safetensors file with its part ``key`` in the
    metadata (bound now, not at call)."""

    def write(path: Path) -> None:
        save_file(tensors, str(path), metadata={PART_KEY: key})

    return write


def part_keys(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    request: Mapping[str, Any],
) -> list[str]:
    """One key per chunk of ``batch_size`` images ``[N, H, W, C]``: the digest of the model's weights, the
    chunk's images and its position, and ``request`` (methods, parameters, precision, normalisation)."""
    with torch.no_grad():
        weights = tensor_digest(*model.state_dict().values())
    job = json.dumps(
        {"weights": weights, **request},
        sort_keys=True,
        default=lambda o: tensor_digest(o) if isinstance(o, Tensor) else repr(o),  # e.g. a baseline tensor
    )
    return [
        hashlib.sha256(
            f"{job}|{start}|{tensor_digest(images[start : start + batch_size])}".encode()
        ).hexdigest()[:16]
        for start in range(0, images.shape[0], batch_size)
    ]


def _read_key(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(PART_KEY)
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable: not this job's part


def check_parts(out: Path, keys: Sequence[str]) -> None:
    """Refuse (``ConfigError``) a folder whose ``attributions/`` holds parts of another job: another model,
    other images, methods or parameters, or more parts than this job writes."""
    for path in sorted((out / "attributions").glob("part-*.safetensors")):
        index = int(path.stem.split("-")[1]) if path.stem.split("-")[1].isdigit() else -1
        if not 0 <= index < len(keys) or _read_key(path) != keys[index]:
            raise ConfigError(
                f"the output folder {out} (out_dir, --out) already holds explanations of other images, "
                f"methods, parameters or model ({path.relative_to(out)}); choose another output folder, or "
                "delete that one to replace it"
            )


def explain_to_disk(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    methods: Sequence[str],
    out_dir: str | Path,
    labels: Tensor | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 16,
    panels: int = 8,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    precision: Literal["fp32", "bf16", "auto"] = "fp32",
) -> Path:
    """Explain uint8 ``images`` ``[N, H, W, C]`` (at the model's input size) with every method in ``methods``.

    Writes to ``out_dir``: ``attributions/part-XXXXX.safetensors`` (per chunk: ``index`` ``[b]``,
    ``prediction`` ``[b]``, ``confidence`` ``[b]``, ``top_index``/``top_prob`` ``[b, 3]`` and one
    ``[b, 1, H, W]`` map per method), ``index.csv``
    (image, label, prediction, confidence), ``panels/<i>.png`` for the first ``panels`` images and
    ``grid.png`` (the first 32 images with the first method's map, correct/incorrect marked). Targets are the
    predicted classes. ``params`` maps a method to its keyword arguments; ``precision``: see ``explain``.
    """
    out = Path(out_dir)
    params = params or {}
    with folder_lock(out, "explanation folder"):  # one writer per folder: parts are reused by key
        device = next(model.parameters()).device
        request = {
            "methods": list(methods),
            "params": {m: dict(params.get(m, {})) for m in methods},
            "precision": precision,
            "mean": list(mean),
            "std": list(std),
        }
        keys = part_keys(model, images, batch_size, request)
        check_parts(out, keys)
        names = list(names) if names is not None else [str(i) for i in range(images.shape[0])]
        rows: list[list[str]] = []
        grid_maps: list[Tensor] = []
        predictions: list[str] = []
        for part, start in enumerate(range(0, images.shape[0], batch_size)):
            chunk = images[start : start + batch_size]
            part_file = out / "attributions" / f"part-{part:05d}.safetensors"
            if part_file.is_file():
                tensors = load_file(str(part_file))
            else:
                x = to_model_input(chunk.to(device), mean, std).contiguous()
                with torch.no_grad():
                    probs = model.eval()(x).float().softmax(1)
                top_prob, top_index = probs.topk(min(3, probs.shape[1]), dim=1)
                prediction = top_index[:, 0]
                tensors = {
                    "index": torch.arange(start, start + chunk.shape[0]),
                    "prediction": prediction.cpu().clone(),  # a view of top_index: safetensors wants own storage
                    "confidence": top_prob[:, 0].cpu().clone(),
                    "top_index": top_index.cpu(),
                    "top_prob": top_prob.cpu(),
                }
                for method in methods:
                    kwargs = {
                        "precision": precision,
                        **params.get(method, {}),
                    }  # a method's own precision wins
                    maps = explain(model, x, method, target=prediction, **kwargs)
                    tensors[method] = maps.cpu().contiguous()
                atomic_write(part_file, _tensor_writer(tensors, keys[part]))
            for j in range(chunk.shape[0]):
                i = start + j
                pred = class_names[int(tensors["prediction"][j])]
                label = class_names[int(labels[i])] if labels is not None else ""
                rows.append([names[i], label, pred, f"{float(tensors['confidence'][j]):.6f}"])
                if i < panels:
                    panel_maps = {m: tensors[m][j] for m in methods}
                    top = [
                        (class_names[int(c)], float(q))
                        for c, q in zip(tensors["top_index"][j], tensors["top_prob"][j], strict=True)
                    ]
                    fig = explanation_panel(
                        chunk[j],
                        panel_maps,
                        top,
                        title=f"{names[i]}: true {label or '?'}, predicted {pred}",
                    )
                    save_figure(fig, out / "panels" / f"{i}.png")
                if i < GRID_SIZE:
                    grid_maps.append(tensors[methods[0]][j])
                    predictions.append(pred)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["image", "label", "prediction", "confidence"])
        writer.writerows(rows)
        write_text(out / "index.csv", buf.getvalue())
        if grid_maps:
            n = len(grid_maps)
            true = [r[1] or r[2] for r in rows[:n]]
            save_figure(
                prediction_grid(images[:n], true, predictions, torch.stack(grid_maps)), out / "grid.png"
            )
        return out
