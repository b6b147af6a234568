"""Fast tests of the data layer on synthetic files made in tmp dirs."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xailab.data import (
    Augment,
    affine_theta,
    affine_warp,
    augment_batch,
    dataset_status,
    folders,
    list_datasets,
    load_dataset,
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
from xailab.errors import ConfigError, DatasetError, UnknownNameError, XailabError

# --- IDX (mnist layout) ---------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = idx_bytes(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_layout_loads(tmp_path, gz):
    write_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds["train"].images.shape == (20, 28, 28, 1) and ds["test"].images.shape == (10, 28, 28, 1)
    assert ds["train"].labels.tolist() == [i % 10 for i in range(20)]
    assert ds.class_names == tuple(str(i) for i in range(10)) and ds.source == str(tmp_path / "mnist")
    assert ds.augment == Augment(crop_padding=2, hflip=False)


def test_idx_truncated_names_file_and_sizes(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1016])
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte is truncated: expected 15680 bytes.*found 1000"
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8), 2051)))
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte.gz is not an IDX label file: magic number 2051"
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is not a valid gzip file"):
        load_dataset("mnist", data_dir=tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is not a valid gzip file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_count_mismatch(tmp_path):
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(7, np.uint8), 2049))
    )
    with pytest.raises(
        DatasetError, match=r"holds 20 images but .*train-labels-idx1-ubyte.gz holds 7 labels"
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_files_message_suggests_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "fashion-mnist") in message and "train-images-idx3-ubyte.gz" in message
    assert "--dataset-option download=true" in message and "XAILAB_DATA_DIR" in message
    assert "fashion-mnist.s3-website" in message


def test_status_of_synthetic_mnist(tmp_path):
    write_mnist(tmp_path / "mnist")
    status = dataset_status("mnist", data_dir=tmp_path)
    assert status["found"] and status["missing"] == [] and status["verified"] is False
    assert dataset_status("fashion_mnist", data_dir=tmp_path)["found"] is False


def test_unknown_dataset_suggests_nearest():
    with pytest.raises(UnknownNameError, match="mnist"):
        load_dataset("minst")
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "image_folder", "csv_folder", "chest_xray"} <= set(
        list_datasets()
    )


# --- CIFAR batches ----------------------------------------------------------------------------------


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}, f)
    return data, labels


def test_cifar_partial_folder_warns_and_notes(tmp_path):
    data, labels = write_cifar_batch(tmp_path / "data_batch_1", 12, 0)
    write_cifar_batch(tmp_path / "test_batch", 5, 1)
    with pytest.warns(UserWarning, match=r"partial CIFAR-10 copy.*missing data_batch_2"):
        ds = load_dataset("cifar10", root=tmp_path)
    assert ds["train"].images.shape == (12, 32, 32, 3) and ds["test"].images.shape == (5, 32, 32, 3)
    assert ds["train"].labels.tolist() == labels
    # rows are 1024 R, 1024 G, 1024 B: pixel (y, x) of channel c is data[c * 1024 + y * 32 + x]
    assert ds["train"].images[3, 5, 7].tolist() == [int(data[3, c * 1024 + 5 * 32 + 7]) for c in range(3)]
    assert any("partial" in note for note in ds.notes) and ds.augment == Augment(crop_padding=4, hflip=True)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": exploit, b"labels": []}))
    write_cifar_batch(tmp_path / "test_batch", 5, 1)
    with pytest.raises(DatasetError, match=r"data_batch_1 asks to load (posix|os|nt)\.system"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar_extracted_subfolder_and_missing_message(tmp_path):
    nested = tmp_path / "cifar10" / "cifar-10-batches-py"
    nested.mkdir(parents=True)
    for i in range(1, 6):
        write_cifar_batch(nested / f"data_batch_{i}", 4, i)
    write_cifar_batch(nested / "test_batch", 3, 9)
    with pytest.warns(UserWarning, match="20 of 50000"):
        ds = load_dataset("cifar10", data_dir=tmp_path)
    assert len(ds["train"]) == 20
    with pytest.raises(DatasetError, match=r"(?s)cifar-10-python.tar.gz.*--dataset-option download=true"):
        load_dataset("cifar10", data_dir=tmp_path / "empty")


# --- image folders ----------------------------------------------------------------------------------


def save_png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, (size[1], size[0]), color).save(path)


def make_tree(root: Path, splits=("train", "test"), classes=("cat", "dog"), n=4, mode="L", size=(10, 12)):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(n):
                save_png(root / split / name / f"{i}.png", size, mode, 40 * c + i)


def test_image_folder_mixed_sizes_and_modes(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    save_png(root / "train" / "dog" / "big.PNG", (20, 24), "RGB", 7)  # odd size, RGB, upper-case extension
    (root / "train" / "cat" / "notes.txt").write_text("not an image; ignored")
    ds = load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("cat", "dog")
    assert ds["train"].images.shape == (9, 10, 12, 3) and ds["test"].images.shape == (8, 10, 12, 3)
    assert ds["train"].labels.tolist() == [0] * 4 + [1] * 5
    assert any("most common size 10x12" in note for note in ds.notes)
    assert ds.augment == Augment(crop_padding=1, hflip=False)
    gray = load_dataset("image_folder", root=root, channels=1, image_size=16, cache_dir=tmp_path / "cache")
    assert gray["train"].images.shape == (9, 16, 16, 1) and gray.source == str(root.resolve())


def test_image_folder_all_gray_is_one_channel(tmp_path):
    make_tree(tmp_path / "tree")
    ds = load_dataset("image_folder", root=tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert ds.channels == 1 and ds["train"].images[0, 0, 0, 0] == 0 and ds["train"].images[4, 0, 0, 0] == 40


def test_image_folder_missing_class_in_split(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    make_tree(root, splits=("val",), classes=("cat",))
    with pytest.raises(
        DatasetError, match=r"val does not have the class folders of train/; missing \['dog'\]"
    ):
        load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")


def test_image_folder_empty_class_and_no_train(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    (root / "test" / "bird").mkdir()
    (root / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"train/bird holds no .png/.jpg/.jpeg images"):
        load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset("image_folder", root=tmp_path / "nowhere", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("content", [b"this is text, not a png", "truncated"])
def test_image_folder_corrupt_image_names_file(tmp_path, content):
    root = tmp_path / "tree"
    make_tree(root)
    bad = root / "train" / "dog" / "2.png"
    if content == "truncated":
        save_png(bad, (64, 64), "RGB", 3)
        content = bad.read_bytes()[:100]
    bad.write_bytes(content)
    with pytest.raises(DatasetError, match=r"image_folder: .*dog/2.png cannot be decoded"):
        load_dataset("image_folder", root=root, cache_dir=tmp_path / "cache")


def test_image_folder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root)
    first = load_dataset("image_folder", root=root, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1

    def no_decoding(path, size):
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(folders, "_decode_image", no_decoding)
    second = load_dataset("image_folder", root=root, cache_dir=cache)
    assert torch.equal(first["train"].images, second["train"].images) and second.mean == first.mean
    monkeypatch.undo()

    changed = root / "train" / "cat" / "0.png"
    save_png(changed, (10, 12), "L", 200)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_dataset("image_folder", root=root, cache_dir=cache)
    assert third["train"].images[0, 0, 0, 0] == 200
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_csv_folder(tmp_path):
    root = tmp_path / "csvset"
    for i in range(10):
        save_png(root / "images" / f"{i}.png", (8, 8), "L", i)
    rows = "\n".join(f"{i},{'yes' if i % 2 else 'no'}" for i in range(10))
    (root / "labels.csv").write_text("id,label\n" + rows + "\n")
    ds = load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("no", "yes")
    assert len(ds["train"]) == 8 and len(ds["test"]) == 2
    assert sorted(ds["test"].labels.tolist()) == [0, 1]
    # file names and integer labels, no header
    (root / "labels.csv").write_text("\n".join(f"{i}.png,{i % 3 * 10}" for i in range(10)))
    ds = load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache", test_fraction=0.3)
    assert ds.class_names == ("0", "10", "20") and len(ds["test"]) == 3


def test_csv_folder_errors(tmp_path):
    root = tmp_path / "csvset"
    save_png(root / "a.png", (8, 8), "L", 1)
    (root / "labels.csv").write_text("file,label\na.png,x\nb.png,y\n")
    with pytest.raises(DatasetError, match=r"labels.csv row 3 names 'b.png', but no such image"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")
    (root / "other.csv").write_text("a.png,x\n")
    with pytest.raises(DatasetError, match="2 CSV files"):
        load_dataset("csv_folder", root=root, cache_dir=tmp_path / "cache")


# --- digits and splits ------------------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert ds["train"].images.shape == (1438, 8, 8, 1) and ds["test"].images.shape == (359, 8, 8, 1)
    assert ds["train"].images.dtype == torch.uint8 and int(ds["train"].images.max()) == 255
    assert ds.augment == Augment(crop_padding=1, hflip=False) and ds.num_classes == 10
    big = load_dataset("digits", image_size=16, channels=3)
    assert big["train"].images.shape == (1438, 16, 16, 3) and len(big.mean) == 3


def test_an_unknown_split_is_a_clear_error_listing_the_valid_ones():
    ds = load_dataset("digits")
    with pytest.raises(XailabError, match=r"no split 'foo'.*test, train"):
        ds["foo"]


def test_each_dataset_with_a_folder_declares_its_status_check():
    from xailab.data import DATASETS

    checked = {name for name in DATASETS.names() if DATASETS.get(name).status is not None}
    assert checked == {"mnist", "fashion_mnist", "cifar10", "chest_xray"}


def test_sample_indices_take_the_classes_in_turn():
    """Known answers: a split stored class by class (0 0 0 0 1 1 2 2 2) gives one image of each class, then
    the next of each, in split order within a class; a class that runs out is skipped; ``first`` is the
    split's order; ``n`` beyond the split gives all of it."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert sample_indices(labels, 4).tolist() == [0, 4, 6, 1]
    assert sample_indices(labels, 100).tolist() == [0, 4, 6, 1, 5, 7, 2, 8, 3]
    assert sample_indices(labels, 3, "first").tolist() == [0, 1, 2]
    assert sample_indices(torch.tensor([2, 0, 2, 1]), 3).tolist() == [1, 3, 0]  # class order, not split order
    with pytest.raises(ValueError, match="'balanced' or 'first'"):
        sample_indices(labels, 2, "random")  # type: ignore[arg-type]


def test_stratified_split_proportions_and_determinism():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert torch.bincount(labels[val]).tolist() == [20, 10, 2]
    assert sorted(torch.cat([train, val]).tolist()) == list(range(160))
    again = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, stratified_split(labels, 0.2, seed=4)[1])


# --- transforms -------------------------------------------------------------------------------------


def batch(b=6, h=5, w=7, c=3) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, c), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_random_crop_padding_zero_is_identity():
    x = batch()
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(1)), x)


def test_random_crop_gives_windows_of_the_padded_image():
    x, p = batch(b=32), 2
    out = random_crop(x, p, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (0, 0, p, p, p, p))
    offsets = set()
    for i in range(x.shape[0]):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, dy : dy + 5, dx : dx + 7])
        ]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 3  # per-sample offsets, not one shared shift


def test_random_hflip_is_exact():
    x = batch(b=64)
    out = random_hflip(x, torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[i], x[i].flip(1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 10 < sum(flipped) < 54


def test_augment_batch_deterministic_for_a_seed():
    x = batch(b=16)
    a = augment_batch(x, Augment(2, True), torch.Generator().manual_seed(5))
    b = augment_batch(x, Augment(2, True), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape


def test_affine_warp_known_answers_rotation_and_shift():
    x = batch(b=1, h=8, w=8, c=2)
    # +90 degrees turns the content clockwise on screen: exactly torch.rot90 with k=-1, pixel for pixel
    turned = affine_warp(x, affine_theta(torch.tensor([[1.0, 0, 0, 0]]), 90, 0, 0))
    assert torch.equal(turned, torch.rot90(x, k=-1, dims=(1, 2)))
    # a shift by a quarter of the width moves the content 2 pixels right; the left edge repeats column 0
    right = affine_warp(x, affine_theta(torch.tensor([[0, 0, 1.0, 0]]), 0, 0, 0.25))
    assert torch.equal(right[:, :, 2:], x[:, :, :6])
    assert torch.equal(right[:, :, :2], x[:, :, :1].expand(-1, -1, 2, -1))
    down = affine_warp(x, affine_theta(torch.tensor([[0, 0, 0, -1.0]]), 0, 0, 0.25))  # up by 2 rows
    assert torch.equal(down[:, :6], x[:, 2:]) and torch.equal(down[:, 6:], x[:, 7:].expand(-1, 2, -1, -1))
    # nothing asked: the same pixels
    assert torch.equal(affine_warp(x, affine_theta(torch.zeros(1, 4), 30, 0.2, 0.2)), x)


def test_affine_zoom_scales_area_and_keeps_constant_images():
    square = torch.zeros(2, 32, 32, 1, dtype=torch.uint8)
    square[:, 12:20, 12:20] = 255  # an 8x8 square at the centre
    zoomed = affine_warp(square, affine_theta(torch.tensor([[0, 1.0, 0, 0], [0, -1.0, 0, 0]]), 0, 0.5, 0))
    mass = zoomed.float().sum(dim=(1, 2, 3)) / square[0].float().sum()
    assert mass.tolist() == pytest.approx([1.5**2, 0.5**2], rel=0.05)  # zoom 1.5 and 0.5: area x s^2
    flat = torch.full((16, 9, 11, 3), 77, dtype=torch.uint8)  # edges filled by the nearest pixel: no black
    assert torch.equal(random_affine(flat, 45, 0.3, 0.3, torch.Generator().manual_seed(0)), flat)


def test_random_affine_and_intensity_off_are_identities_that_draw_nothing():
    x, gen = batch(), torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert random_affine(x, 0, 0, 0, gen) is x and random_intensity(x, 0, 0, gen) is x
    assert torch.equal(gen.get_state(), state)  # seeded crop/flip runs reproduce as before
    moved = random_affine(batch(b=64, h=16, w=16), 20, 0.2, 0.2, gen)
    assert moved.dtype == torch.uint8 and moved.shape == (64, 16, 16, 3)
    assert not torch.equal(moved, batch(b=64, h=16, w=16))


def test_random_intensity_stays_within_its_ranges():
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(96, 160, (64, 8, 8, 1), generator=gen, dtype=torch.uint8)  # no clipping below
    shifted = random_intensity(x, 0.1, 0, gen).float() - x.float()
    per_image = shifted.flatten(1)
    assert torch.equal(per_image.max(1).values, per_image.min(1).values)  # one offset per image
    assert per_image[:, 0].abs().max() <= 25.5 + 0.5 and per_image[:, 0].std() > 5
    stretched = random_intensity(x, 0, 0.2, gen).float()
    ratio = stretched.flatten(1).std(1) / x.float().flatten(1).std(1)
    assert ratio.min() > 0.8 - 0.02 and ratio.max() < 1.2 + 0.02 and ratio.std() > 0.03
    assert (stretched.flatten(1).mean(1) - x.float().flatten(1).mean(1)).abs().max() < 0.5


def test_augment_values_are_bounded_and_named():
    with pytest.raises(ConfigError, match=r"augment\.rotate: -5 is out of range; valid: in \[0, 180\]"):
        Augment(rotate=-5)
    with pytest.raises(ConfigError, match=r"augment\.scale: 1.0 is out of range"):
        Augment(scale=1.0)
    with pytest.raises(ConfigError, match=r"augment: unknown key 'rotation'.*Valid keys: crop_padding"):
        load_dataset("digits", augment={"rotation": 10})
    # a mapping changes only the keys it gives: the digits' own 1-pixel crop stays
    ds = load_dataset("digits", augment={"rotate": 10, "translate": 0.1})
    assert ds.augment == Augment(crop_padding=1, rotate=10.0, translate=0.1)
    with pytest.raises(ConfigError, match=r"augment\.contrast: expected float, got 'high'"):
        load_dataset("digits", augment={"contrast": "high"})


def test_transforms_have_no_per_sample_loop(monkeypatch):
    # A Python loop over samples would index the batch once per sample: count tensor indexing calls.
    calls = []
    original = torch.Tensor.__getitem__

    def counting(self, index):
        calls.append(1)
        return original(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", counting)
    random_crop(batch(b=256), 4, torch.Generator().manual_seed(0))
    random_hflip(batch(b=256), torch.Generator().manual_seed(0))
    random_affine(batch(b=256), 10, 0.1, 0.1, torch.Generator().manual_seed(0))
    random_intensity(batch(b=256), 0.1, 0.2, torch.Generator().manual_seed(0))
    assert len(calls) < 20


def test_to_model_input_normalises_and_is_channels_last():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8).expand(2, 4, 4, 3).contiguous()
    out = to_model_input(x, mean=(0.5, 0.5, 0.2), std=(0.25, 0.5, 0.1))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == pytest.approx([-2.0, 1.0, 0.0], abs=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_resize_and_channels():
    x = batch(b=3, h=8, w=8)
    assert resize_uint8(x, (8, 8)) is x
    assert resize_uint8(x, (4, 6)).shape == (3, 4, 6, 3)
    flat = torch.full((2, 8, 8, 1), 77, dtype=torch.uint8)
    assert torch.equal(resize_uint8(flat, (3, 5)), torch.full((2, 3, 5, 1), 77, dtype=torch.uint8))
    rgb = to_channels(flat, 3)
    assert rgb.shape == (2, 8, 8, 3) and torch.equal(to_channels(rgb, 1), flat)
    pixel = torch.tensor([[[[200, 100, 50]]]], dtype=torch.uint8)
    expected = np.asarray(Image.fromarray(pixel[0].numpy()).convert("L"))
    assert to_channels(pixel, 1).item() == int(expected[0, 0])
