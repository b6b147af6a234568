"""Files a seed project writes, written by the study that reproduces it, so its users find them where they look.

The Keras CIFAR-10 seed (the ``kernel-stride`` study) writes ``out.csv``: its predictions on the test set in
the format of its label file ``cifar10Labels.csv`` (the Kaggle CIFAR-10 layout): a header ``id,label`` and one
row per test image, ``id`` the image's index (its file is ``<id>.png``) and ``label`` the predicted class
name. Each cell of the study writes one into its folder, derived from the run's ``predictions.csv``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from xailab.errors import CheckpointError
from xailab.io import write_text
from xailab.study.runner import CellTask, run_cell

OUT_CSV = "out.csv"
OUT_CSV_COLUMNS = ("id", "label")


def write_out_csv(cell_dir: Path) -> Path:
    """``cell_dir/out.csv`` (``id,label``: test index, predicted class name) from ``cell_dir/predictions.csv``."""
    source = cell_dir / "predictions.csv"
    if not source.is_file():
        raise CheckpointError(
            f"{source} does not exist: the cell has no test predictions to write out.csv from"
        )
    with open(source, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(OUT_CSV_COLUMNS)
    for row in rows:
        w.writerow([row["index"], row["predicted"]])
    return write_text(cell_dir / OUT_CSV, buf.getvalue())


def run_keras_seed_cell(task: CellTask) -> dict[str, Any]:
    """A grid cell (``runner.run_cell``) that also writes the Keras seed's ``out.csv`` into the cell folder."""
    record = run_cell(task)
    cell_dir = Path(task.study_dir) / task.cell.name
    if not record.get("skipped") or not (cell_dir / OUT_CSV).is_file():
        write_out_csv(cell_dir)
    return record
