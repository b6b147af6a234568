"""Image folders (``ROOT/<split>/<class>/*.png``), a folder plus a label CSV, and the chest X-ray tree.

Decoding is parallel and the decoded uint8 tensors are cached (safetensors, keyed by the file list with
sizes and mtimes, the target size and channels), so a second load of the same folder is near-instant and
any change to the folder invalidates the cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from xailab.config import bounded, from_dict
from xailab.data.base import (
    Augment,
    Dataset,
    ImageSet,
    LoadRequest,
    channel_stats,
    default_cache_dir,
    register_dataset,
    register_status,
)
from xailab.data.transforms import stratified_split, to_channels
from xailab.errors import DatasetError
from xailab.io import atomic_write

# Every format an image folder may hold, by extension, and the Pillow decoders allowed to read them (a
# file is decoded by its content among these, never by a rarer Pillow parser).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
_INT = re.compile(r"[+-]?[0-9]+")
SPLITS = ("train", "val", "test")
CHEST_CLASSES = ("NORMAL", "PNEUMONIA")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_CACHE_VERSION = 1  # bump when the cache layout or decoding changes
_DECODE_CHUNK = 1024
_PARALLEL_MIN = 4096  # fewer images than this are decoded in-process
_RESAMPLE = Image.Resampling.BILINEAR  # Pillow's resize filters antialias when shrinking


@dataclass(frozen=True)
class ImageFile:
    """One image to decode: its path (a str: tens of thousands of Path objects are slow), class index,
    and size/mtime (part of the cache key)."""

    path: str
    label: int
    size: int
    mtime_ns: int


def _image_file(path: Path, label: int) -> ImageFile:
    st = path.stat()
    return ImageFile(str(path), label, st.st_size, st.st_mtime_ns)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_class_folder(folder: Path, label: int, name: str) -> list[ImageFile]:
    """The images in one class folder (every format of ``IMAGE_EXTENSIONS``), sorted by name. A subfolder or
    an empty folder raises ``DatasetError`` naming it; files of other types (notes, hidden files) are not
    images and are left out."""
    with os.scandir(folder) as it:
        visible = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    nested = [e.name for e in visible if e.is_dir()]
    if nested:
        raise DatasetError(
            f"{name}: {folder} holds the folder(s) {nested[:5]}, but a class folder must hold its images "
            "directly. Move their images up into the class folder, or make each a class of its own."
        )
    entries = [e for e in visible if e.is_file() and _is_image_name(e.name)]
    if not entries:
        raise DatasetError(
            f"{name}: {folder} holds no .png/.jpg/.jpeg images (nor {', '.join(IMAGE_EXTENSIONS[3:])}). "
            "Add images or remove the folder (from every split)."
        )
    return [ImageFile(e.path, label, (st := e.stat()).st_size, st.st_mtime_ns) for e in entries]


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_tree(name: str, root: Path) -> tuple[tuple[str, ...], dict[str, list[ImageFile]]]:
    """Class names (sorted folders of ``train``) and the files of each split present in ``root``."""
    if not (root / "train").is_dir():
        raise DatasetError(
            f"{name}: no train/ folder in {root}. Expected ROOT/train/<class>/*.png (plus val/ and/or "
            "test/ with the same class folders); pass that ROOT as --dataset-root (root=...)."
        )
    classes = tuple(_subfolders(root / "train"))
    if not classes:
        raise DatasetError(
            f"{name}: {root / 'train'} has no class folders. Put each class's images in train/<class>/."
        )
    groups = {}
    for split in (s for s in SPLITS if (root / s).is_dir()):
        found = _subfolders(root / split)
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        if missing or extra:
            raise DatasetError(
                f"{name}: {root / split} does not have the class folders of train/"
                + (f"; missing {missing}" if missing else "")
                + (f"; extra {extra}" if extra else "")
                + ". Every split needs the same class folders."
            )
        groups[split] = [
            f for i, c in enumerate(classes) for f in list_class_folder(root / split / c, i, name)
        ]
    return classes, groups


def _decode_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image to uint8 ``[H, W, 1]`` (grayscale) or ``[H, W, 3]``, resized to ``size`` if given."""
    try:
        with open(path, "rb") as f:
            data = f.read()  # one read instead of Pillow's many small ones: about 30% faster for tiny files
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            opened.load()  # the first frame of an animated GIF or WebP
            img: Image.Image = opened
            if img.mode not in ("L", "RGB"):
                img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), _RESAMPLE)
            arr = np.array(img)  # writable, so torch.from_numpy can share it
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path} cannot be decoded as an image ({exc}). Replace or delete the file."
        ) from None
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_chunk(paths: Sequence[str], size: tuple[int, int] | None) -> list[np.ndarray]:
    return [_decode_image(p, size) for p in paths]


def _decode_all(paths: Sequence[str], size: tuple[int, int] | None) -> list[np.ndarray]:
    """Decode in worker processes (decoding small images is GIL-bound Python, so threads would not help);
    small jobs stay in this process, where starting workers would cost more than it saves."""
    if len(paths) < _PARALLEL_MIN:
        return _decode_chunk(paths, size)
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return [a for chunk in pool.map(_decode_chunk, chunks, [size] * len(chunks)) for a in chunk]


def _resize_array(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    out = np.array(img.resize((size[1], size[0]), _RESAMPLE))
    return out[..., None] if out.ndim == 2 else out


def decode_images(
    name: str, paths: Sequence[str], size: tuple[int, int] | None, channels: int | None
) -> tuple[torch.Tensor, list[str]]:
    """Decode ``paths`` in parallel into one uint8 ``[N, H, W, C]`` tensor, plus notes on what was changed.

    ``size`` None: images of different sizes are resized to the most common one. ``channels`` None:
    1 if every image is grayscale, else 3.
    """
    try:
        arrays = _decode_all(paths, size)
    except DatasetError as exc:
        raise DatasetError(f"{name}: {exc}") from None
    notes = []
    sizes = Counter(a.shape[:2] for a in arrays)
    target = size or sizes.most_common(1)[0][0]
    if len(sizes) > 1 and size is None:
        notes.append(
            f"images have {len(sizes)} different sizes; {len(arrays) - sizes[target]} of {len(arrays)} were "
            f"resized to the most common size {target[0]}x{target[1]}"
        )
    c = channels or (1 if all(a.shape[2] == 1 for a in arrays) else 3)
    if all(a.shape == (*target, c) for a in arrays):
        return torch.from_numpy(np.stack(arrays)), notes
    out = np.empty((len(arrays), *target, c), dtype=np.uint8)
    for i, arr in enumerate(arrays):
        if arr.shape[:2] != tuple(target):
            arr = _resize_array(arr, target)
        out[i] = to_channels(torch.from_numpy(arr)[None], c)[0].numpy()
    return torch.from_numpy(out), notes


def cache_key(
    root: Path, size: tuple[int, int] | None, channels: int | None, groups: dict[str, list[ImageFile]]
) -> str:
    """A hash of everything the decoded tensors depend on: root, size, channels, files (size, mtime, label)."""
    listing = {
        group: [[os.path.relpath(f.path, root), f.label, f.size, f.mtime_ns] for f in files]
        for group, files in sorted(groups.items())
    }
    blob = json.dumps([_CACHE_VERSION, str(root), size, channels, listing], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Decoded:
    """Decoded groups of files (splits, or ``all``), notes on what decoding changed, and the ``train``
    group's ``channel_stats`` (cached too: on a large set they cost more than reading the cache)."""

    splits: dict[str, ImageSet]
    notes: list[str]
    train_stats: tuple[tuple[float, ...], tuple[float, ...]] | None


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached tensors and metadata, or None when the file is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception:  # a damaged cache is just a cache miss
        return None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], root: Path, notes: list[str], stats) -> None:
    metadata = {"root": str(root), "notes": json.dumps(notes), "train_stats": json.dumps(stats)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata))


def decode_cached(name: str, root: Path, groups: dict[str, list[ImageFile]], request: LoadRequest) -> Decoded:
    """Decode every group of files (a split, or all files) into ImageSets, through the on-disk cache."""
    channels = request.options.get("channels")
    key = cache_key(root, request.image_size, channels, groups)
    cache_file = Path(request.cache_dir or default_cache_dir()) / f"{name}-{key[:24]}.safetensors"
    cached = _read_cache(cache_file)
    if cached is not None:
        tensors, metadata = cached
        splits = {g: ImageSet(tensors[f"{g}.images"], tensors[f"{g}.labels"]) for g in groups}
        stats = json.loads(metadata.get("train_stats", "null"))
        train_stats = (tuple(stats[0]), tuple(stats[1])) if stats else None
        return Decoded(splits, json.loads(metadata.get("notes", "[]")), train_stats)
    images, notes = decode_images(
        name, [f.path for fs in groups.values() for f in fs], request.image_size, channels
    )
    splits, start = {}, 0
    for group, files in groups.items():
        labels = torch.tensor([f.label for f in files], dtype=torch.int64)
        splits[group] = ImageSet(images[start : start + len(files)].contiguous(), labels)
        start += len(files)
    train_stats = channel_stats(splits["train"].images) if "train" in splits else None
    tensors = {f"{g}.{part}": getattr(s, part) for g, s in splits.items() for part in ("images", "labels")}
    _write_cache(cache_file, tensors, root, notes, train_stats)
    return Decoded(splits, notes, train_stats)


def _jpeg_note(groups: dict[str, list[ImageFile]]) -> list[str]:
    files = [f for fs in groups.values() for f in fs]
    n_jpeg = sum(f.path.lower().endswith(JPEG_EXTENSIONS) for f in files)
    if not n_jpeg:
        return []
    return [
        f"{n_jpeg} of {len(files)} images are JPEG files: if this is a JPEG re-encoded copy of a lossless "
        "dataset, its pixels differ from the canonical ones and results are not directly comparable"
    ]


def folder_dataset(
    name: str,
    root: Path,
    class_names: tuple[str, ...],
    splits: dict[str, ImageSet],
    notes: list[str],
    train_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> Dataset:
    """Wrap decoded splits: train statistics, and crop augmentation scaled to the image size, no flip."""
    h, w = splits["train"].images.shape[1:3]
    mean, std = train_stats or channel_stats(splits["train"].images)
    augment = Augment(crop_padding=max(1, min(h, w) // 16), hflip=False)
    return Dataset(name, splits, class_names, mean, std, augment, source=str(root), notes=tuple(notes))


def load_tree(name: str, request: LoadRequest, expected_classes: tuple[str, ...] | None = None) -> Dataset:
    """Load a ``ROOT/<split>/<class>/*`` tree; with ``expected_classes``, the class folders must be exactly those."""
    root = request.root.expanduser().resolve()
    class_names, groups = scan_tree(name, root)
    if expected_classes is not None and class_names != expected_classes:
        raise DatasetError(
            f"{name}: {root / 'train'} has class folders {list(class_names)}, expected {list(expected_classes)}."
            " Point the dataset root at the folder holding train/, val/ and test/."
        )
    decoded = decode_cached(name, root, groups, request)
    notes = decoded.notes + _jpeg_note(groups)
    return folder_dataset(name, root, class_names, decoded.splits, notes, decoded.train_stats)


@register_dataset(
    "image_folder", None, "any ROOT/{train,val,test}/<class>/*.png|jpg tree (needs --dataset-root)"
)
def load_image_folder(request: LoadRequest) -> Dataset:
    """Images of any size from ``ROOT/<split>/<class>/``: ``[N, H, W, 1 or 3]`` per split, classes sorted."""
    return load_tree("image_folder", request)


@register_dataset(
    "chest_xray", "chest-xray-pneumonia", "pediatric chest X-rays NORMAL/PNEUMONIA (Kaggle split)"
)
def load_chest_xray(request: LoadRequest) -> Dataset:
    """Chest X-ray pneumonia: train/val/test, classes NORMAL and PNEUMONIA, grayscale."""
    root = request.root
    if not root.is_dir():
        raise DatasetError(
            f"chest_xray: {root} does not exist. Put the Kaggle chest_xray tree there "
            "(train/, val/, test/, each with NORMAL/ and PNEUMONIA/), or set XAILAB_DATA_DIR or pass "
            "--dataset-root. It cannot be downloaded automatically."
        )
    dataset = load_tree("chest_xray", request, expected_classes=CHEST_CLASSES)
    missing = [s for s in SPLITS if s not in dataset.splits]
    if missing:
        raise DatasetError(
            f"chest_xray: {root} lacks the split folder(s) {missing}; the Kaggle split has all three."
        )
    return dataset


def find_csv(name: str, root: Path, csv_name: str | None) -> Path:
    """The label CSV: ``root / csv_name`` if given, else the single ``*.csv`` in ``root``."""
    if csv_name is not None:
        path = root / csv_name
        if not path.is_file():
            raise DatasetError(f"{name}: label file {path} does not exist. Check the csv= option.")
        return path
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        what = (
            "no *.csv file" if not found else f"{len(found)} CSV files ({', '.join(p.name for p in found)})"
        )
        raise DatasetError(
            f"{name}: {root} holds {what}; pass csv=<file name> to say which one maps images to labels."
        )
    return found[0]


def _parse_int(text: str) -> int | None:
    """``text`` as an int when it is one in ASCII digits (``int()`` also takes ``"٣"`` and ``"1_0"``)."""
    return int(text) if _INT.fullmatch(text) else None


def _resolve_image(root: Path, cell: str) -> Path | None:
    """The image a CSV cell names: a file name, or an index/stem to which an image extension is added."""
    stem = str(i) if (i := _parse_int(cell)) is not None else cell
    if cell.lower().endswith(IMAGE_EXTENSIONS):
        names = [cell]
    else:
        names = [stem + ext for ext in (*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))]
    for folder in (root, root / "images"):
        for n in names:
            if (folder / n).is_file():
                return folder / n
    return None


def read_label_csv(name: str, root: Path, csv_path: Path) -> tuple[tuple[str, ...], list[ImageFile]]:
    """Class names and labelled files from a CSV of ``file name or index, label`` rows (header optional)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [
                (n, [c.strip() for c in row])
                for n, row in enumerate(csv.reader(f), 1)
                if any(c.strip() for c in row)
            ]
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{name}: {csv_path} is not UTF-8 text (byte {e.start}: {e.reason}). Save it as UTF-8 "
            "(e.g. 'CSV UTF-8' in a spreadsheet program)."
        ) from None
    except csv.Error as e:
        raise DatasetError(f"{name}: {csv_path} is not a readable CSV file ({e}).") from None
    first = rows[0][1] if rows else []
    if first and _parse_int(first[0]) is None and not first[0].lower().endswith(IMAGE_EXTENSIONS):
        rows = rows[1:]  # a header row: its first cell is neither an index nor an image file name
    if not rows:
        raise DatasetError(f"{name}: {csv_path} has no data rows. Add rows of 'file name or index, label'.")
    entries: list[tuple[Path, str]] = []
    first_row: dict[Path, tuple[int, str]] = {}  # image -> (row, label) where it was first listed
    for n, row in rows:
        if len(row) < 2 or not row[1]:
            raise DatasetError(
                f"{name}: {csv_path} row {n} has no label: {row}. Each row needs 'file, label'."
            )
        path = _resolve_image(root, row[0])
        if path is None:
            raise DatasetError(
                f"{name}: {csv_path} row {n} names {row[0]!r}, but no such image is in {root} or "
                f"{root / 'images'}. Add the file or fix the row."
            )
        if path in first_row:  # twice in the set: it would leak between train and test
            seen, label = first_row[path]
            conflict = f" with label {row[1]!r} where row {seen} says {label!r}" if label != row[1] else ""
            raise DatasetError(
                f"{name}: {csv_path} row {n} lists {path.name} again{conflict} (first at row {seen}). "
                "List each image once."
            )
        first_row[path] = (n, row[1])
        entries.append((path, row[1]))
    raw = [label for _, label in entries]
    ints = [_parse_int(label) for label in raw]
    if any(i is not None for i in ints) and any(i is None for i in ints):
        # Mixed: a stray name among class indices (or the reverse) would silently become a class of its own.
        numeric = sum(i is not None for i in ints) * 2 >= len(ints)
        k = next(k for k, i in enumerate(ints) if (i is None) == numeric)
        kinds = ("integers", "a name") if numeric else ("class names", "an integer")
        raise DatasetError(
            f"{name}: {csv_path} row {rows[k][0]} has label {raw[k]!r}, {kinds[1]}, but the other labels are "
            f"{kinds[0]}. Fix the row: labels are all class indices or all class names."
        )
    numbers = [i for i in ints if i is not None]
    if len(numbers) == len(ints):  # class indices: classes in numeric order, named by their number
        values = sorted(set(numbers))
        class_names = tuple(str(v) for v in values)
        by_number = {v: k for k, v in enumerate(values)}
        labels = [by_number[i] for i in numbers]
    else:
        class_names = tuple(sorted(set(raw)))
        by_name = {v: k for k, v in enumerate(class_names)}
        labels = [by_name[label] for label in raw]
    return class_names, [_image_file(p, y) for (p, _), y in zip(entries, labels, strict=True)]


@dataclass(frozen=True)
class CsvOptions:
    """The options of the ``csv_folder`` loader (``--dataset-option KEY=VALUE``)."""

    csv: str | None = bounded(None, help="the label file in the root (default: its single *.csv)")
    test_fraction: float = bounded(
        0.2, low=0, high=1, low_open=True, high_open=True, help="stratified share of the test split"
    )
    split_seed: int = bounded(0, low=0, high=2**63 - 1, help="seed of the train/test split")


CSV_OPTIONS = frozenset(f.name for f in fields(CsvOptions))


@register_dataset(
    "csv_folder",
    None,
    "a folder of images plus a CSV of file,label (needs --dataset-root)",
    options=CSV_OPTIONS,
)
def load_csv_folder(request: LoadRequest) -> Dataset:
    """Images listed in a label CSV, split by a seeded stratified ``test_fraction`` (default 0.2) into train/test."""
    root = request.root.expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"csv_folder: {root} is not a folder. Pass the folder of images and CSV as --dataset-root."
        )
    opts = from_dict(
        CsvOptions, {k: v for k, v in request.options.items() if k in CSV_OPTIONS}, where="csv_folder"
    )
    csv_path = find_csv("csv_folder", root, opts.csv)
    class_names, files = read_label_csv("csv_folder", root, csv_path)
    decoded = decode_cached("csv_folder", root, {"all": files}, request)
    full, notes = decoded.splits["all"], list(decoded.notes)
    fraction = opts.test_fraction
    train_idx, test_idx = stratified_split(full.labels, fraction, opts.split_seed)
    notes.append(f"no official test split: a seeded stratified {fraction:.0%} test split of {csv_path.name}")
    splits = {"train": full.subset(train_idx), "test": full.subset(test_idx)}
    return folder_dataset("csv_folder", root, class_names, splits, notes + _jpeg_note({"all": files}))


@register_status("chest_xray")
def chest_xray_status(root: Path) -> dict:
    """Which ``<split>/<class>`` folders of the chest X-ray tree exist (no official checksums to verify)."""
    needed = [f"{s}/{c}" for s in SPLITS for c in CHEST_CLASSES]
    missing = [n for n in needed if not (root / n).is_dir()]
    return {"folder": str(root), "found": len(missing) < len(needed), "missing": missing, "verified": None}
