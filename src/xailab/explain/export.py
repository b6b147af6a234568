"""Explaining many images to disk: attributions streamed as safetensors parts, an index CSV and figures.

Memory stays flat whatever the number of images: each chunk is explained, written and dropped. A killed
job resumes: chunks whose part file exists are read back instead of recomputed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from xailab.data.transforms import to_model_input
from xailab.explain.base import explain
from xailab.explain.figures import explanation_panel, prediction_grid, save_figure
from xailab.io import atomic_write, write_text

GRID_SIZE = 32


def _tensor_writer(tensors: dict[str, Tensor]) -> Callable[[Path], None]:
    """A writer for ``atomic_write`` saving ``tensors`` as one safetensors file (bound now, not at call)."""

    def write(path: Path) -> None:
        save_file(tensors, str(path))

    return write


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
    device = next(model.parameters()).device
    params = params or {}
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
                kwargs = {"precision": precision, **params.get(method, {})}  # a method's own precision wins
                maps = explain(model, x, method, target=prediction, **kwargs)
                tensors[method] = maps.cpu().contiguous()
            atomic_write(part_file, _tensor_writer(tensors))
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
        save_figure(prediction_grid(images[:n], true, predictions, torch.stack(grid_maps)), out / "grid.png")
    return out
