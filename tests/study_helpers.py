"""A tiny study spec shared by the study tests (local and Ray)."""

from __future__ import annotations


def tiny(**changes) -> dict:
    """A study small enough for a unit test: two keras_cnn cells (kernel 3 and 4) on 16x16 digits."""
    spec = {
        "name": "tiny",
        "datasets": ["digits"],
        "models": ["keras_cnn"],
        "model_options": {"keras_cnn": {"image_size": 16}},
        "option_grid": {"keras_cnn": {"kernel_size": [3, 4]}},
        "train": {
            "epochs": 3,
            "batch_size": 64,
            "image_size": 16,
            "train_limit": 256,
            "lr": 0.003,
            "precision": "fp32",
            "deterministic": True,
        },
        "methods": ["saliency", "gradcam"],
        "metrics": ["sparseness", "deletion_auc"],
        "n_explain": 4,
        "n_gallery": 2,
        "n_misclassified": 2,
        "sanity_method": "gradcam",
        "sanity_images": 2,
    }
    spec.update(changes)
    return spec
