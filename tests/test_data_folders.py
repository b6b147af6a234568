"""Image folders and label CSVs under bad input: every format Pillow reads is read, everything else is a
clear ``DatasetError`` naming the file, the row or the folder, never a traceback or a silent skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xailab import load_dataset
from xailab.errors import ConfigError, DatasetError


def save(path: Path, value: int, fmt: str | None = None, size: tuple[int, int] = (10, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), (value, 255 - value, value // 2)).save(path, fmt)


def tree(root: Path, ext: str = ".png") -> None:
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(3):
                save(root / split / name / f"{i}{ext}", 40 * c + 10 * i)


@pytest.mark.parametrize("ext", [".gif", ".bmp", ".webp", ".tiff", ".JPG"])
def test_every_format_pillow_reads_is_read(tmp_path, ext):
    root = tmp_path / "tree"
    tree(root)
    save(root / "train" / "dog" / f"extra{ext}", 200)
    ds = load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")
    assert ds["train"].labels.tolist() == [0, 0, 0, 1, 1, 1, 1]  # the extra image is read, as a dog
    extra = ds["train"].images[6]  # sorted by name: the dogs' 0.png, 1.png, 2.png, then extra
    with Image.open(root / "train" / "dog" / f"extra{ext}") as im:
        expected = np.asarray(im.convert("RGB"))
    if ext in (".bmp", ".tiff", ".gif"):  # lossless (the GIF palette holds these 2 colours exactly)
        np.testing.assert_array_equal(extra.numpy(), expected)
    assert extra.shape == (10, 12, 3)


def test_a_nested_folder_in_a_class_is_refused_by_name(tmp_path):
    root = tmp_path / "tree"
    tree(root)
    save(root / "train" / "cat" / "more" / "x.png", 9)
    with pytest.raises(DatasetError, match=r"train/cat holds the folder\(s\) \['more'\].*directly"):
        load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")


def csv_set(root: Path, rows: str, encoding: str = "utf-8") -> Path:
    for i in range(6):
        save(root / "images" / f"{i}.png", 30 * i, size=(8, 8))
    (root / "labels.csv").write_bytes(rows.encode(encoding))
    return root


def test_a_non_utf8_csv_is_a_clear_error(tmp_path):
    root = csv_set(tmp_path / "set", "file,label\n0.png,chat\n1.png,b\u00e9b\u00e9\n", encoding="latin-1")
    with pytest.raises(DatasetError, match=r"labels.csv is not UTF-8 text.*Save it as UTF-8"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")


def test_a_name_among_integer_labels_is_refused(tmp_path):
    rows = "".join(f"{i}.png,{i % 2}\n" for i in range(5)) + "5.png,cat\n"
    root = csv_set(tmp_path / "set", rows)
    with pytest.raises(
        DatasetError, match=r"row 6 has label 'cat', a name, but the other labels are integers"
    ):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("second", "fragment"), [("1", "with label '1' where row 1 says '0'"), ("0", "again")]
)
def test_a_duplicate_row_is_refused(tmp_path, second, fragment):
    rows = "".join(f"{i}.png,{i % 2}\n" for i in range(6)) + f"0.png,{second}\n"
    root = csv_set(tmp_path / "set", rows)
    with pytest.raises(
        DatasetError, match=rf"row 7 lists 0.png again.*{fragment}|row 7 lists 0.png {fragment}"
    ):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")


def test_csv_options_are_typed_bounded_and_declared(tmp_path):
    root = csv_set(tmp_path / "set", "".join(f"{i}.png,{i % 2}\n" for i in range(6)))
    ds = load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache", test_fraction=0.5, split_seed=3)
    default = load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")
    assert (len(ds["test"]), len(default["test"])) == (4, 2) and ds.class_names == ("0", "1")
    with pytest.raises(ConfigError, match=r"csv_folder.test_fraction: 1.5 is out of range"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache", test_fraction=1.5)
    with pytest.raises(ConfigError, match=r"csv_folder.test_fraction: expected float, got 'half'"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache", test_fraction="half")
    with pytest.raises(ConfigError, match=r"has no option 'test_fracton'. Did you mean 'test_fraction'"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache", test_fracton=0.5)
