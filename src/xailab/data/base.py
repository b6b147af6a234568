"""The dataset contract shared by every loader: uint8 images in memory, integer labels, class names, stats."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xailab.config import bounded, check_bounds
from xailab.errors import ConfigError, DatasetError, did_you_mean
from xailab.registry import Registry


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation of a dataset, applied as batched tensor ops (see ``xailab.data.transforms``).

    ``crop_padding``: random crop after zero-padding each side by this many pixels (0 = off).
    ``hflip``: random horizontal flip (never for digits or anatomy, where left/right carries meaning).
    ``rotate`` / ``scale`` / ``translate``: a random affine warp per image — a rotation uniform in
    ``[-rotate, rotate]`` degrees, a zoom uniform in ``[1 - scale, 1 + scale]``, a shift uniform in
    ``[-translate, translate]`` of the width and of the height (Keras' ``rotation_range``, ``zoom_range``,
    ``width_shift_range``/``height_shift_range``, edges filled by the nearest pixel as Keras does).
    ``brightness`` / ``contrast``: per-image intensity jitter — an offset uniform in ``[-brightness,
    brightness]`` of the full range and a contrast factor uniform in ``[1 - contrast, 1 + contrast]`` about the
    image's mean (exposure differences between scanners).
    All off by default; every value is bounded (``xailab.config``), so a bad one is named where it is given.
    """

    crop_padding: int = bounded(0, low=0, high=512, help="random crop after zero-padding by this many pixels")
    hflip: bool = bounded(False, help="random horizontal flip")
    rotate: float = bounded(0.0, low=0, high=180, help="largest random rotation, degrees")
    scale: float = bounded(0.0, low=0, high=1, high_open=True, help="largest random zoom, fraction")
    translate: float = bounded(0.0, low=0, high=0.5, help="largest random shift, fraction of the size")
    brightness: float = bounded(0.0, low=0, high=1, help="largest random brightness offset, fraction of 255")
    contrast: float = bounded(0.0, low=0, high=1, high_open=True, help="largest random contrast change")

    def __post_init__(self) -> None:
        check_bounds(self, "augment")


@dataclass(frozen=True)
class ImageSet:
    """One split. ``images``: uint8 ``[N, H, W, C]``; ``labels``: int64 ``[N]``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N={self.images.shape[0]}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageSet:
        """The images at ``index`` (a ``[M]`` long tensor)."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: named splits (``train``, ``test``, maybe ``val``) plus what a model needs to know.

    ``mean``/``std`` are per-channel statistics of the training images scaled to [0, 1].
    ``notes`` carry caveats a result must repeat (a partial or a lossy copy).
    """

    name: str
    splits: Mapping[str, ImageSet]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = Augment()
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(next(iter(self.splits.values())).images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        images = next(iter(self.splits.values())).images
        return int(images.shape[1]), int(images.shape[2])

    def __getitem__(self, split: str) -> ImageSet:
        try:
            return self.splits[split]
        except KeyError:
            raise DatasetError(
                f"dataset {self.name!r} has no split {split!r}; valid splits: {', '.join(sorted(self.splits))}"
            ) from None


@dataclass(frozen=True)
class LoadRequest:
    """What a registered loader receives.

    ``root``: the dataset's own folder (``<data_dir>/<folder>`` or ``--dataset-root``).
    ``image_size``: resize to ``(H, W)`` once at load time (None keeps the native size).
    ``download``: fetch missing files from the official source (verifying checksums).
    ``mirrors``: base URLs tried before the official ones (e.g. a local server in tests).
    ``cache_dir``: where decoded/resized image folders are cached.
    """

    root: Path
    image_size: tuple[int, int] | None = None
    download: bool = False
    mirrors: tuple[str, ...] = ()
    cache_dir: Path | None = None
    options: dict = field(default_factory=dict)


# Options ``load_dataset`` itself takes for every dataset (the loader never reads them).
COMMON_OPTIONS = frozenset({"augment", "download", "mirrors", "cache_dir"})

Loader = Callable[[LoadRequest], Dataset]
StatusCheck = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its default folder name under the data dir, the loader function, and how
    ``xailab datasets`` checks its folder (``status(folder) -> {"folder", "found", "missing", "verified"}``;
    None: only whether the folder exists)."""

    name: str
    folder: str | None  # None: needs no files (digits) or needs --dataset-root (image_folder, csv_folder)
    load: Loader
    description: str = ""
    status: StatusCheck | None = None
    # The ``request.options`` keys the loader reads; None: the loader checks its options itself.
    options: frozenset[str] | None = frozenset()

    def check_options(self, options: Mapping[str, object], where: str = "dataset_options") -> None:
        """Raise ``ConfigError`` naming the first option the loader does not read (``--dataset-option``, a
        study's ``dataset_options``) with the nearest name and the valid ones: never ignored silently."""
        if self.options is None:
            return
        valid = sorted(self.options | COMMON_OPTIONS)
        for key in options:
            if key not in valid:
                hint = did_you_mean(str(key), valid, n=1)
                raise ConfigError(
                    f"{where}: dataset {self.name!r} has no option {key!r}.{hint} Valid: {', '.join(valid)}."
                )


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    name: str, folder: str | None, description: str = "", options: frozenset[str] | None = frozenset()
) -> Callable[[Loader], Loader]:
    """Decorator registering ``load(request: LoadRequest) -> Dataset`` under ``name``; ``options``: the
    ``request.options`` keys the loader reads (None: it checks them itself)."""

    def add(load: Loader) -> Loader:
        DATASETS.register(name)(DatasetSpec(name, folder, load, description, options=options))
        return load

    return add


def register_status(name: str) -> Callable[[StatusCheck], StatusCheck]:
    """Decorator making ``check(folder) -> dict`` the folder check of the registered dataset ``name``."""

    def add(check: StatusCheck) -> StatusCheck:
        DATASETS.replace(name, dataclasses.replace(DATASETS.get(name), status=check))
        return check

    return add


def default_data_dir() -> Path:
    """``XAILAB_DATA_DIR`` if set, else ``~/.cache/xailab``."""
    env = os.environ.get("XAILAB_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xailab"


def default_cache_dir() -> Path:
    """Where decoded image folders are cached: ``XAILAB_CACHE_DIR`` or ``~/.cache/xailab/cache``.

    Kept apart from the data dir, which may be read-only (a shared dataset folder).
    """
    env = os.environ.get("XAILAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xailab" / "cache"


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images scaled to [0, 1] (float64 accumulation)."""
    c = images.shape[-1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].reshape(-1, c).to(torch.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-3).tolist())
