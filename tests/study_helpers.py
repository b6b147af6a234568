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


def ensemble_study(**changes) -> dict:
    """The offline chest X-ray layout in small: two members, then the ensemble over their trained weights."""
    spec = {
        "name": "members",
        "datasets": ["digits"],
        "models": ["mobilenetv2_imagenet", "densenet169", "transfer_ensemble"],
        "model_options": {
            "mobilenetv2_imagenet": {"pretrained": False},
            "densenet169": {"pretrained": False},
            "transfer_ensemble": {
                "pretrained": False,
                "mobilenet_weights": "cell:mobilenetv2_imagenet",
                "densenet_weights": "cell:densenet169",
            },
        },
        "train": {"epochs": 1, "batch_size": 32, "image_size": 32, "channels": 1, "train_limit": 96},
        "methods": ["saliency"],
        "n_explain": 2,
        "n_gallery": 1,
        "n_misclassified": 0,
    }
    spec.update(changes)
    return spec
