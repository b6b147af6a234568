"""The real datasets in the shared (read-only) folder: counts, class balance and statistics.

Caches go to tmp dirs; nothing is written to the shared folder.
"""

from __future__ import annotations

import pytest
import torch

from xailab.data import dataset_status, load_dataset

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_SUBSET_TRAIN = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_SUBSET_TEST = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


def counts(ds, split: str) -> list[int]:
    return torch.bincount(ds[split].labels, minlength=ds.num_classes).tolist()


@pytest.mark.slow
def test_mnist(shared_data_dir):
    ds = load_dataset("mnist", data_dir=shared_data_dir)
    assert ds["train"].images.shape == (60000, 28, 28, 1) and ds["test"].images.shape == (10000, 28, 28, 1)
    assert counts(ds, "train") == MNIST_TRAIN and counts(ds, "test") == MNIST_TEST
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-3) and ds.std[0] == pytest.approx(0.3081, abs=1e-3)
    assert ds.source == str(shared_data_dir.absolute() / "mnist")


@pytest.mark.slow
def test_mnist_status_verified(shared_data_dir):
    status = dataset_status("mnist", data_dir=shared_data_dir)
    assert status["found"] and status["missing"] == [] and status["verified"] is True


@pytest.mark.slow
def test_fashion_mnist(shared_data_dir):
    ds = load_dataset("fashion_mnist", data_dir=shared_data_dir)
    assert counts(ds, "train") == [6000] * 10 and counts(ds, "test") == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3) and ds.augment.hflip


@pytest.mark.slow
def test_cifar10_subset_partial(shared_data_dir):
    with pytest.warns(UserWarning, match="partial CIFAR-10 copy"):
        ds = load_dataset("cifar10", root=shared_data_dir / "cifar10-subset")
    assert ds["train"].images.shape == (4000, 32, 32, 3) and ds["test"].images.shape == (1000, 32, 32, 3)
    assert counts(ds, "train") == CIFAR_SUBSET_TRAIN and counts(ds, "test") == CIFAR_SUBSET_TEST
    assert ds.class_names[:3] == ("airplane", "automobile", "bird") and ds.notes
    assert ds.mean == pytest.approx((0.4916, 0.4818, 0.4447), abs=1e-3)


@pytest.mark.slow
def test_chest_xray(shared_data_dir, tmp_path):
    ds = load_dataset("chest_xray", data_dir=shared_data_dir, cache_dir=tmp_path)
    assert ds.class_names == ("NORMAL", "PNEUMONIA") and ds.channels == 1 and ds.image_size == (112, 112)
    assert (
        counts(ds, "train") == [1341, 3875]
        and counts(ds, "val") == [8, 8]
        and counts(ds, "test") == [234, 390]
    )
    assert not ds.augment.hflip and ds.augment.crop_padding == 7


@pytest.mark.slow
def test_cifar10_jpeg_image_folder(shared_data_dir, tmp_path):
    root = shared_data_dir / "cifar10-jpeg"
    ds = load_dataset("image_folder", root=root, cache_dir=tmp_path)
    assert ds["train"].images.shape == (50000, 32, 32, 3) and ds["test"].images.shape == (10000, 32, 32, 3)
    assert counts(ds, "train") == [5000] * 10 and counts(ds, "test") == [1000] * 10
    assert any("JPEG re-encoded copy" in note for note in ds.notes)
    assert ds.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=1e-3)
    again = load_dataset("image_folder", root=root, cache_dir=tmp_path)  # from the cache
    assert torch.equal(again["test"].images, ds["test"].images) and again.mean == ds.mean
