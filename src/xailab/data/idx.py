"""MNIST and Fashion-MNIST from the canonical IDX files (gzip-compressed or not), validated byte for byte."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

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
from xailab.data.download import ensure_files, file_status
from xailab.errors import DatasetError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# Split -> (images file, labels file); the .gz names are the official ones, their md5s below.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FIX = "Delete it and run with --dataset-option download=true, or copy the official file there."


def parse_idx(data: bytes, path: Path, magic: int, dataset: str) -> np.ndarray:
    """Decode an uncompressed IDX ubyte array (``[N]`` labels or ``[N, H, W]`` images) from ``data``.

    Checks the magic number and that the byte length matches the declared dimensions; ``path`` and
    ``dataset`` only name the file in errors.
    """
    if len(data) < 4:
        raise DatasetError(f"{dataset}: {path} is truncated: only {len(data)} bytes, no IDX header. {_FIX}")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise DatasetError(
            f"{dataset}: {path} is not an IDX {kind} file: magic number {found}, expected {magic}. {_FIX}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{dataset}: {path} is truncated inside its header ({len(data)} bytes). {_FIX}")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    expected = int(np.prod(dims))
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than declared"
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise DatasetError(
            f"{dataset}: {path} is {what}: expected {expected} bytes of {kind} data for dims {dims}, "
            f"found {actual}. {_FIX}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path, magic: int, dataset: str) -> np.ndarray:
    """Read an IDX file, gunzipping it when its name ends in ``.gz``; corrupt gzip raises ``DatasetError``."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{dataset}: {path} is not a valid gzip file ({exc}). {_FIX}") from None
    return parse_idx(data, path, magic, dataset)


def _find(root: Path, gz_name: str) -> Path | None:
    """The file under its official ``.gz`` name, else its uncompressed name, else None."""
    for candidate in (root / gz_name, root / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def present_files(root: Path, md5: dict[str, str]) -> list[str]:
    """The official names (``.gz``) whose file exists in ``root``, compressed or not."""
    return [name for name in md5 if _find(root, name) is not None]


def read_split(root: Path, images_name: str, labels_name: str, dataset: str) -> ImageSet:
    """One split from its image and label files: images ``[N, H, W, 1]`` uint8, labels ``[N]`` int64."""
    images_path, labels_path = _find(root, images_name), _find(root, labels_name)
    assert images_path is not None and labels_path is not None  # ensured by the caller
    images = read_idx(images_path, IMAGES_MAGIC, dataset)
    labels = read_idx(labels_path, LABELS_MAGIC, dataset)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{dataset}: {images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels. One of them is from another dataset or version; replace both."
        )
    return ImageSet(torch.from_numpy(images.copy())[..., None], torch.from_numpy(labels.astype(np.int64)))


def load_idx_dataset(
    name: str,
    request: LoadRequest,
    md5: dict[str, str],
    urls: tuple[str, ...],
    class_names: tuple[str, ...],
    augment: Augment,
) -> Dataset:
    """Load an MNIST-layout dataset from ``request.root``, downloading missing files when asked."""
    root = request.root
    ensure_files(
        name,
        root,
        md5,
        present_files(root, md5),
        download=request.download,
        mirrors=request.mirrors,
        official_urls=urls,
    )
    splits = {split: read_split(root, *files, name) for split, files in SPLIT_FILES.items()}
    top = int(max(s.labels.max() for s in splits.values()))
    if top >= len(class_names):
        raise DatasetError(
            f"{name}: labels in {root} go up to {top}, but {name} has {len(class_names)} classes. "
            "The label files are not the official ones; replace them."
        )
    mean, std = channel_stats(splits["train"].images)
    return Dataset(name, splits, class_names, mean, std, augment, source=str(root))


@register_dataset("mnist", "mnist", "MNIST handwritten digits, 28x28 gray, 60k/10k (IDX files)")
def load_mnist(request: LoadRequest) -> Dataset:
    """MNIST: train ``[60000, 28, 28, 1]``, test ``[10000, 28, 28, 1]``; classes "0".."9"."""
    classes = tuple(str(d) for d in range(10))
    return load_idx_dataset("mnist", request, MNIST_MD5, MNIST_URLS, classes, Augment(crop_padding=2))


@register_dataset("fashion_mnist", "fashion-mnist", "Fashion-MNIST clothing, 28x28 gray, 60k/10k (IDX files)")
def load_fashion_mnist(request: LoadRequest) -> Dataset:
    """Fashion-MNIST: train ``[60000, 28, 28, 1]``, test ``[10000, 28, 28, 1]``; 10 clothing classes."""
    return load_idx_dataset(
        "fashion_mnist",
        request,
        FASHION_MD5,
        FASHION_URLS,
        FASHION_CLASSES,
        Augment(crop_padding=2, hflip=True),
    )


def file_status_names(root: Path, md5: dict[str, str]) -> dict[str, str | None]:
    """Name -> md5 to check in ``root``: the ``.gz`` name and md5, or the uncompressed name (md5 unknown)."""
    files: dict[str, str | None] = {}
    for gz_name, digest in md5.items():
        raw = gz_name.removesuffix(".gz")
        if not (root / gz_name).is_file() and (root / raw).is_file():
            files[raw] = None
        else:
            files[gz_name] = digest
    return files


@register_status("mnist")
def mnist_status(root: Path) -> dict:
    """``file_status`` of an MNIST folder (official md5s)."""
    return file_status(root, file_status_names(root, MNIST_MD5))


@register_status("fashion_mnist")
def fashion_mnist_status(root: Path) -> dict:
    """``file_status`` of a Fashion-MNIST folder (official md5s)."""
    return file_status(root, file_status_names(root, FASHION_MD5))
