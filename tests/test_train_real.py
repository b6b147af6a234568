"""Short training runs on the real shared datasets (slow; CI runs them)."""

from __future__ import annotations

import pytest

from xailab import TrainConfig, load_dataset, train

pytestmark = pytest.mark.slow


def test_mnist_subset_beats_90_percent(tmp_path, shared_data_dir):
    cfg = TrainConfig(
        model="mnist_cnn",
        dataset="mnist",
        epochs=2,
        train_limit=6000,
        schedule="onecycle",
        lr=3e-3,
        data_dir=str(shared_data_dir),
    )
    run = train(cfg, out_dir=tmp_path, progress=False)
    test = run.metrics["test"]
    assert test["n"] == 10_000
    assert test["accuracy"] > 0.90, test["accuracy"]


def test_chest_xray_binary_metrics_with_class_balancing(tmp_path, shared_data_dir):
    ds = load_dataset("chest_xray", data_dir=shared_data_dir, image_size=28, cache_dir=tmp_path / "cache")
    cfg = TrainConfig(
        model="mnist_cnn",
        dataset="chest_xray",
        epochs=2,
        train_limit=2000,
        class_balance="sampler",
        schedule="onecycle",
        lr=3e-3,
    )
    run = train(cfg, out_dir=tmp_path, dataset=ds, progress=False)
    test = run.metrics["test"]
    assert test["n"] == 624
    # The 16-image val split is folded into training and a stratified 10% held out instead.
    assert run.history[0]["val_loss"] is not None
    assert {"roc_auc", "sensitivity", "specificity"} <= set(test)
    assert test["roc_auc"] > 0.85, test
