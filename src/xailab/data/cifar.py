"""CIFAR-10 from the canonical python batches, read with a restricted unpickler that cannot run code."""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xailab.data.base import (
    Augment,
    Dataset,
    ImageSet,
    LoadRequest,
    channel_stats,
    register_dataset,
    register_status,
)
from xailab.data.download import ensure_files, file_status, safe_extract
from xailab.errors import DatasetError, XailabWarning

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
EXTRACTED = "cifar-10-batches-py"
URLS = ("https://www.cs.toronto.edu/~kriz/",)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCH_MD5 = {
    META: "5ff9c542aee3614f3951f8cda6e48888",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    TEST_BATCH: "40351d587109b95175f43aff81a1287e",
}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGES_PER_BATCH = 10_000
# The image-folder copy (train/<class>/*.jpg, test/<class>/*.jpg) used when no batch files or archive exist,
# looked for next to the default folder: <data_dir>/cifar10-jpeg.
JPEG_COPY_FOLDER = "cifar10-jpeg"
LOSSY_NOTE = (
    "CIFAR-10 (JPEG copy) read from {folder}: no canonical batch files or archive were found, so the image-folder "
    "copy is used. It is lossy (JPEG re-encoded, about 30 dB PSNR from the canonical pixels): results are not "
    "directly comparable with published CIFAR-10 figures."
)

# The only globals a pickled numpy array needs. Anything else (os.system, builtins.eval, ...) is refused,
# so a tampered batch file cannot execute code while it is read.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


def _numpy_reconstruct() -> Any:
    """numpy's array-reconstruct function, wherever this numpy version keeps it."""
    reconstruct, _args, _state = np.ndarray.__reduce__(np.zeros(0))  # type: ignore[str-unpack]
    return reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetError(
                f"cifar10: {self.path} asks to load {module}.{name}, which a CIFAR batch never needs; "
                "refusing to read it (it may be malicious). Replace it with the official file."
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def _unpickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only numpy array globals; any other global or a corrupt file raises."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DatasetError(
            f"cifar10: {path} is not a readable CIFAR batch file ({type(exc).__name__}: {exc}). "
            "Replace it with the official file (or delete it and run with --dataset-option download=true)."
        ) from None


def read_batch(path: Path) -> dict[bytes, Any]:
    """One CIFAR batch file as its dict (``b"data"``: ``[N, 3072]`` uint8, ``b"labels"``: N ints)."""
    obj = _unpickle(path)
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise DatasetError(f"cifar10: {path} is not a CIFAR batch (no data/labels entries). Replace it.")
    return obj


def batch_to_imageset(batch: dict[bytes, Any], path: Path) -> ImageSet:
    """Batch rows (1024 R, 1024 G, 1024 B values each) -> images ``[N, 32, 32, 3]``, labels ``[N]``."""
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"cifar10: {path} holds data of shape {data.shape} ({data.dtype}), expected [N, 3072] uint8. "
            "Replace it with the official file."
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(
            f"cifar10: {path} has {labels.size} labels for {data.shape[0]} images (or labels outside 0..9). "
            "Replace it with the official file."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def _batch_folder(root: Path) -> Path:
    """The folder holding the batch files: ``root`` itself or its ``cifar-10-batches-py`` subfolder."""
    nested = root / EXTRACTED
    return nested if nested.is_dir() else root


def _has_batches(folder: Path) -> bool:
    return (folder / TEST_BATCH).is_file() or any((folder / b).is_file() for b in TRAIN_BATCHES)


def _concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _class_names(folder: Path) -> tuple[str, ...]:
    if not (folder / META).is_file():
        return CLASSES
    names = read_batch_meta(folder / META)
    return names or CLASSES


def read_batch_meta(path: Path) -> tuple[str, ...]:
    """The class names in ``batches.meta``."""
    meta = _unpickle(path)
    names = meta.get(b"label_names", []) if isinstance(meta, dict) else []
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def locate_batches(request: LoadRequest) -> Path:
    """The batch folder for ``request.root``, extracting (or downloading then extracting) the archive if needed."""
    root = request.root
    folder = _batch_folder(root)
    if _has_batches(folder):
        return folder
    archive = root / ARCHIVE
    ensure_files(
        "cifar10",
        root,
        {ARCHIVE: ARCHIVE_MD5},
        [ARCHIVE] if archive.is_file() else [],
        download=request.download,
        mirrors=request.mirrors,
        official_urls=URLS,
    )
    safe_extract(archive, root)
    folder = _batch_folder(root)
    if not _has_batches(folder):
        raise DatasetError(
            f"cifar10: {archive} holds no CIFAR batch files. Delete it and run with "
            "--dataset-option download=true."
        )
    return folder


def find_image_copy(root: Path) -> Path | None:
    """The CIFAR-10 image-folder copy to read instead of the batches: ``root`` itself when it is a
    ``train/``+``test/`` tree, else ``<root's parent>/cifar10-jpeg`` when that is one; None otherwise."""
    for candidate in (root, root.parent / JPEG_COPY_FOLDER):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def load_image_copy(folder: Path, request: LoadRequest) -> Dataset:
    """CIFAR-10 from an image-folder copy: ``[N, 32, 32, 3]`` per split (classes must be CIFAR-10's, which sort
    into the canonical label order), the canonical augmentation, and a lossy-copy warning in ``notes``."""
    from xailab.data.folders import load_tree  # the folder decoder and its cache

    note = LOSSY_NOTE.format(folder=folder)
    warnings.warn(note, XailabWarning, stacklevel=3)
    dataset = load_tree("cifar10", replace(request, root=folder), expected_classes=CLASSES)
    return replace(
        dataset,
        augment=Augment(crop_padding=4, hflip=True),
        notes=(note, *(n for n in dataset.notes if "JPEG" not in n)),
    )


@register_dataset("cifar10", "cifar10", "CIFAR-10 objects, 32x32 RGB, 50k/10k (canonical python batches)")
def load_cifar10(request: LoadRequest) -> Dataset:
    """CIFAR-10: train ``[<=50000, 32, 32, 3]``, test ``[10000, 32, 32, 3]``; partial copies load with a warning.

    Without batch files or the archive (and without ``download``), the image-folder copy
    ``<data_dir>/cifar10-jpeg`` (or a ``train/``+``test/`` tree at the root itself) is read, with a warning
    that it is lossy; the warning is also in the dataset's ``notes`` and so in every run's metadata.
    """
    root = request.root
    if not _has_batches(_batch_folder(root)) and not (root / ARCHIVE).is_file() and not request.download:
        copy = find_image_copy(root)
        if copy is not None:
            return load_image_copy(copy, request)
    folder = locate_batches(request)
    train_names = [b for b in TRAIN_BATCHES if (folder / b).is_file()]
    if not train_names or not (folder / TEST_BATCH).is_file():
        missing = [b for b in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / b).is_file()]
        raise DatasetError(
            f"cifar10: {folder} lacks {', '.join(missing)}; at least one data_batch_* and test_batch are "
            f"needed. Copy them from {ARCHIVE} ({URLS[0]}) or run with --dataset-option download=true in "
            "an empty folder."
        )
    train = _concat([batch_to_imageset(read_batch(folder / b), folder / b) for b in train_names])
    test = batch_to_imageset(read_batch(folder / TEST_BATCH), folder / TEST_BATCH)
    notes = []
    missing = [b for b in TRAIN_BATCHES if b not in train_names]
    if missing or len(train) != IMAGES_PER_BATCH * len(TRAIN_BATCHES) or len(test) != IMAGES_PER_BATCH:
        note = (
            f"partial CIFAR-10 copy in {folder}: {len(train)} of 50000 train and {len(test)} of 10000 test "
            f"images"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + ". Results are not comparable "
            "with full CIFAR-10 results."
        )
        warnings.warn(note, XailabWarning, stacklevel=3)
        notes.append(note)
    mean, std = channel_stats(train.images)
    return Dataset(
        "cifar10",
        {"train": train, "test": test},
        _class_names(folder),
        mean,
        std,
        Augment(crop_padding=4, hflip=True),
        source=str(folder),
        notes=tuple(notes),
    )


@register_status("cifar10")
def cifar10_status(root: Path) -> dict:
    """``file_status`` of a CIFAR-10 folder: the batch files (official md5s), else the archive."""
    folder = _batch_folder(root)
    if not _has_batches(folder) and (root / ARCHIVE).is_file():
        return file_status(root, {ARCHIVE: ARCHIVE_MD5})
    return file_status(folder, BATCH_MD5)
