"""A study cell's ``record.json`` as a typed, versioned record: written in one place (the study runner),
read in one place (``read_cell_record``: the runner's skip check and the report). It sits below both layers
and imports no torch, so ``xailab.report`` reads records without the training stack.

The core fields (what the cell is, how it trained, how well it classifies) are typed and bounded; the
assessment's sections (``explain``, ``gallery``, ``misclassified``, ``quality``, ``metric_info``,
``agreement``, ``sanity``, and a study kind's own, e.g. ``shortcut``) are kept in ``sections`` and written
beside the core keys, so the file's layout is the one earlier versions wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xailab.config import MAX_IMAGE_SIZE, bounded, from_dict
from xailab.errors import CheckpointError, ConfigError
from xailab.io import read_json, write_json

CELL_RECORD_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CellRecord:
    """One cell's results. ``test``: the classification metrics of the test split (``accuracy``,
    ``macro_f1``, ``confusion_matrix``, ...); ``history``: one row per epoch; ``sections``: the assessment."""

    version: int = bounded(CELL_RECORD_VERSION, choices=(CELL_RECORD_VERSION,))
    cell: str
    cell_key: str = ""
    study: str = ""
    model: str
    dataset: str
    grid_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    image_size: tuple[int, int] = bounded((1, 1), low=1, high=MAX_IMAGE_SIZE)
    test: dict[str, Any] = field(default_factory=dict)
    best_epoch: int | None = bounded(None, low=0)
    train_seconds: float | None = bounded(None, low=0)
    train_images_per_s: float | None = bounded(None, low=0)
    inference_images_per_s: float | None = bounded(None, low=0)
    parameters: int | None = bounded(None, low=0)
    macs: int | None = bounded(None, low=0)
    history: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        """The test accuracy (None when the dataset had no test split)."""
        value = self.test.get("accuracy")
        return float(value) if isinstance(value, int | float) else None

    def section(self, name: str, default: Any = None) -> Any:
        """One assessment section (``quality``, ``sanity``, ...), or ``default`` when absent."""
        return self.sections.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON-able dict of ``record.json``: the core keys, then the sections."""
        core = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        return json.loads(json.dumps({**core, **self.sections}))

    @classmethod
    def from_dict(cls, data: Any, where: str = "record.json:") -> CellRecord:
        """Validate a parsed ``record.json``: its core keys field by field; the other keys become sections."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where.rstrip(':')}: expected a mapping of keys to values, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        core = {k: v for k, v in data.items() if k in names}
        core.setdefault("version", CELL_RECORD_VERSION)
        sections = {k: v for k, v in data.items() if k not in names and k != "skipped"}
        return from_dict(cls, {**core, "sections": sections}, where=where)

    def write(self, cell_dir: Path) -> Path:
        """Atomically write ``cell_dir/record.json`` (written last: the cell is finished when it exists)."""
        return write_json(cell_dir / "record.json", self.to_dict())


def read_cell_record(path: Path) -> CellRecord:
    """The validated record at ``path``; a corrupt file is a ``CheckpointError`` and a bad field a
    ``ConfigError``, both naming the file."""
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); delete it and re-run the study") from None
    return CellRecord.from_dict(data, where=f"{path}:")
