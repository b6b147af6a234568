"""Datasets as uint8 tensors in memory: ``load_dataset(name, ...)`` and the helpers around it.

Importing this package registers every loader (digits, mnist, fashion_mnist, cifar10, image_folder,
csv_folder, chest_xray). A dataset's folder is ``root`` (``--dataset-root``) if given, else
``<data_dir>/<folder>`` with ``data_dir`` from the argument, ``XAILAB_DATA_DIR`` or ``~/.cache/xailab``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from xailab.config import from_dict
from xailab.data import cifar, folders, idx, transforms  # noqa: F401  (importing registers the loaders)
from xailab.data import digits as _digits  # noqa: F401  (imported to register its loader)
from xailab.data import shortcut as _shortcut  # noqa: F401  (registers the planted-shortcut wrapper)
from xailab.data.base import (
    DATASETS,
    Augment,
    Dataset,
    DatasetSpec,
    ImageSet,
    LoadRequest,
    channel_stats,
    default_cache_dir,
    default_data_dir,
    register_dataset,
    register_status,
)
from xailab.data.download import fetch
from xailab.data.transforms import (
    Sample,
    affine_theta,
    affine_warp,
    augment_batch,
    random_affine,
    random_crop,
    random_hflip,
    random_intensity,
    resize_uint8,
    sample_indices,
    stratified_split,
    to_channels,
    to_model_input,
)
from xailab.errors import DatasetError

__all__ = [
    "DATASETS",
    "Augment",
    "Dataset",
    "DatasetSpec",
    "ImageSet",
    "LoadRequest",
    "Sample",
    "affine_theta",
    "affine_warp",
    "augment_batch",
    "channel_stats",
    "dataset_folder",
    "dataset_status",
    "default_cache_dir",
    "default_data_dir",
    "fetch",
    "list_datasets",
    "load_dataset",
    "random_affine",
    "random_crop",
    "random_hflip",
    "random_intensity",
    "register_dataset",
    "register_status",
    "resize_uint8",
    "sample_indices",
    "stratified_split",
    "to_channels",
    "to_model_input",
    "transforms",
]


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def dataset_folder(name: str, data_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Where ``name`` is read from: ``root`` if given, else ``<data_dir>/<folder>``.

    ``data_dir`` defaults to ``XAILAB_DATA_DIR`` or ``~/.cache/xailab``. Datasets without a default folder
    (digits, image_folder, csv_folder) get the data dir itself; the folder loaders then ask for a root.
    """
    spec = DATASETS.get(name)
    if root is not None:
        return Path(root).expanduser().absolute()
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return (base / spec.folder if spec.folder else base).absolute()


def _as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (
        (int(image_size), int(image_size))
        if isinstance(image_size, int)
        else tuple(int(s) for s in image_size)
    )
    if len(size) != 2 or min(size) < 1:
        raise DatasetError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size[0], size[1]


def _as_augment(value: Augment | Mapping, default: Augment) -> Augment:
    """The ``augment`` option over the dataset's own augmentation: an ``Augment`` replaces it, a mapping
    changes only the keys it gives (``{"rotate": 10}`` adds a rotation to the dataset's crop and flip)."""
    if isinstance(value, Augment):
        return value
    if not isinstance(value, Mapping):
        return from_dict(Augment, value, "augment")  # names the type error
    return from_dict(Augment, {**dataclasses.asdict(default), **value}, "augment")


def conform(dataset: Dataset, image_size: tuple[int, int] | None, channels: int | None) -> Dataset:
    """Resize every split to ``image_size`` and convert to ``channels``; recompute train stats if anything changed."""
    splits = {}
    for split, images in dataset.splits.items():
        x = resize_uint8(images.images, image_size) if image_size else images.images
        x = to_channels(x, channels) if channels else x
        splits[split] = images if x is images.images else ImageSet(x, images.labels)
    if all(splits[s] is dataset.splits[s] for s in splits):
        return dataset
    mean, std = channel_stats(splits["train"].images)
    return replace(dataset, splits=splits, mean=mean, std=std)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    root: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    download: bool = False,
    mirrors: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    **options,
) -> Dataset:
    """Load dataset ``name`` with uint8 ``[N, H, W, C]`` splits, resized/converted once here.

    ``image_size`` (int or ``(H, W)``) and ``channels`` (1 or 3) are applied at load time; mean/std are
    computed on the resulting train split. ``download`` fetches missing official files (``mirrors`` first).
    ``options`` go to the loader (``csv``, ``test_fraction``, ...); ``augment`` (an ``Augment`` or a dict)
    changes the dataset's default augmentation (a dict: only the keys it gives; see ``Augment``). Unknown names raise ``UnknownNameError``.
    """
    spec = DATASETS.get(name)
    spec.check_options(options)
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
    size = _as_size(image_size)
    augment = options.pop("augment", None)
    request = LoadRequest(
        root=dataset_folder(name, data_dir, root),
        image_size=size,
        download=download,
        mirrors=tuple(mirrors),
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
        options={**options, "channels": channels},
    )
    dataset = conform(spec.load(request), size, channels)
    return replace(dataset, augment=_as_augment(augment, dataset.augment)) if augment is not None else dataset


def dataset_status(name: str, data_dir: str | Path | None = None) -> dict:
    """What ``xailab datasets`` shows for ``name``: the folder looked at, whether it was found, missing files,
    and ``verified`` (True/False: md5 of the official files matches or not; None: nothing to compare).
    """
    spec = DATASETS.get(name)
    if spec.folder is None:
        needs = "bundled with scikit-learn" if name == "digits" else "needs --dataset-root"
        return {"name": name, "folder": None, "found": None, "missing": [], "verified": None, "note": needs}
    folder = dataset_folder(name, data_dir)
    check = spec.status
    if check is None:
        return {
            "name": name,
            "folder": str(folder),
            "found": folder.is_dir(),
            "missing": [],
            "verified": None,
        }
    return {"name": name, **check(folder)}
