"""A study cell's ``record.json`` as a typed, versioned record: written in one place (the study runner),
read in one place (``read_cell_record``: the runner's skip check and the report). It sits below both layers
and imports no torch, so ``xailab.report`` reads records without the training stack.

The core fields (what the cell is, how it trained, how well it classifies) are typed and bounded; the
assessment's sections (``explain``, ``gallery``, ``misclassified``, ``quality``, ``metric_info``,
``agreement``, ``sanity``, and a study kind's own, e.g. ``shortcut``) are kept in ``sections`` and written
beside the core keys, so the file's layout is the one earlier versions wrote.

Version 2 adds two typed fields: ``skipped_methods`` (the study's methods that do not apply to the cell's
model, with what they need) and ``quadrants`` (a binary task's true/false positive/negative galleries). A
version-1 record reads with both empty.
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

CELL_RECORD_VERSION = 2
QUADRANTS = ("TP", "FP", "TN", "FN")  # a binary task's outcomes, the positive class being class index 1
ALL_METHODS = (
    "all"  # ``sanity_method: all``: the sanity check of every method that applies to the cell's model
)


@dataclass(frozen=True, kw_only=True)
class SkippedMethod:
    """A study method not run on a cell's model: the capabilities it ``needs`` that the model lacks, and
    those the model ``offers`` (``xailab.explain.model_capabilities``)."""

    needs: tuple[str, ...]
    offers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.needs:
            raise ConfigError("skipped method: needs must name at least one missing capability")

    @property
    def reason(self) -> str:
        """``needs attention, tokens`` — what the report prints after "n/a"."""
        return "needs " + ", ".join(self.needs)


@dataclass(frozen=True, kw_only=True)
class GalleryTile:
    """One explained test image of a gallery: its index in the test split, true and predicted class, the
    confidence of the prediction, and its tiles' paths relative to the cell folder (input, method -> overlay)."""

    index: int = bounded(low=0)
    label: str
    prediction: str
    confidence: float = bounded(low=0, high=1)
    input: str
    maps: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Quadrants:
    """A binary task's outcomes on the test split, ``positive`` being class index 1: the number of test
    images in each of ``QUADRANTS`` (``counts``) and up to ``n_gallery`` of each explained by ``method`` for
    the predicted class (``galleries``, in test order)."""

    method: str
    positive: str
    negative: str
    counts: dict[str, int]
    galleries: dict[str, list[GalleryTile]]

    def __post_init__(self) -> None:
        for name, mapping in (("counts", self.counts), ("galleries", self.galleries)):
            if sorted(mapping) != sorted(QUADRANTS):
                raise ConfigError(
                    f"quadrants.{name}: expected the keys {', '.join(QUADRANTS)}, got {', '.join(mapping)}"
                )
        for q in QUADRANTS:
            if self.counts[q] < 0 or len(self.galleries[q]) > self.counts[q]:
                raise ConfigError(
                    f"quadrants.galleries.{q}: {len(self.galleries[q])} images shown of {self.counts[q]} counted"
                )


@dataclass(frozen=True, kw_only=True)
class CellRecord:
    """One cell's results. ``test``: the classification metrics of the test split (``accuracy``,
    ``macro_f1``, ``confusion_matrix``, ...); ``history``: one row per epoch; ``sections``: the assessment."""

    version: int = bounded(CELL_RECORD_VERSION, choices=(1, CELL_RECORD_VERSION))
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
    skipped_methods: dict[str, SkippedMethod] = field(default_factory=dict)  # version 2
    quadrants: Quadrants | None = None  # version 2; binary tasks only
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 2 and (self.skipped_methods or self.quadrants is not None):
            raise ConfigError(
                f"record of cell {self.cell!r}: version {self.version} has no skipped_methods or quadrants "
                f"(version {CELL_RECORD_VERSION} added them); write version {CELL_RECORD_VERSION}"
            )

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
        core = dataclasses.asdict(self)  # nested records (skipped methods, quadrants) as plain dicts
        del core["sections"]
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
