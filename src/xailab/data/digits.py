"""scikit-learn's bundled 8x8 digits: the dataset that needs no files, so the offline default always works."""

from __future__ import annotations

import torch

from xailab.data.base import Augment, Dataset, ImageSet, LoadRequest, channel_stats, register_dataset
from xailab.data.transforms import stratified_split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@register_dataset("digits", None, "scikit-learn's 8x8 digits, 1,797 images, bundled (no download)")
def load_digits_dataset(request: LoadRequest) -> Dataset:
    """Digits: ``[N, 8, 8, 1]`` uint8 (0..16 scaled to 0..255), a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits  # scikit-learn costs ~3 s to import: only when digits is loaded

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)[..., None]
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    full = ImageSet(images, labels)
    splits = {"train": full.subset(train_idx), "test": full.subset(test_idx)}
    mean, std = channel_stats(splits["train"].images)
    return Dataset(
        "digits",
        splits,
        tuple(str(d) for d in range(10)),
        mean,
        std,
        Augment(crop_padding=1),
        source="sklearn.datasets.load_digits",
        notes=(
            f"no official test split: a fixed stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split",
        ),
    )
