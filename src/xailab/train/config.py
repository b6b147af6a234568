"""The training recipe: one frozen dataclass, loadable from YAML/TOML, stored in every run's ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from xailab.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, bounded, check_bounds, from_dict, to_dict
from xailab.train.recipes import apply_recipe


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Defaults follow the seeds (Adam, ReduceLROnPlateau).

    precision: ``auto`` uses bf16 autocast where the device runs it fast (CUDA with bf16, or a CPU whose
    oneDNN supports bf16) and fp32 elsewhere; ``fp32`` is the exact mode.
    class_balance: ``weights`` scales the loss by inverse class frequency; ``sampler`` draws batches
    class-balanced (for imbalanced sets such as the ~3:1 chest X-ray set).
    """

    model: str = field(metadata={"help": "model name (see `xailab models`)"})
    dataset: str = field(metadata={"help": "dataset name (see `xailab datasets`)"})
    epochs: int = bounded(10, low=1, high=100_000, help="number of epochs")
    batch_size: int = bounded(
        128, low=1, high=1 << 20, help="training batch size (global: split over the processes of a DDP run)"
    )
    optimizer: Literal["adam", "adamw", "sgd"] = bounded(
        "adam", help="optimiser; sgd is SGD with Nesterov momentum"
    )
    lr: float = bounded(1e-3, low=0, low_open=True, help="base (peak, for onecycle) learning rate")
    weight_decay: float = bounded(0.0, low=0, help="weight decay of the optimiser")
    momentum: float = bounded(0.9, low=0, high=1, high_open=True, help="SGD momentum")
    schedule: Literal["plateau", "onecycle", "cosine", "constant"] = bounded(
        "plateau", help="learning-rate schedule"
    )
    warmup_epochs: float = bounded(
        0.0, low=0, help="linear warm-up for cosine; peak position for onecycle (0: 30%% of the run)"
    )
    plateau_factor: float = bounded(
        0.5,
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        help="ReduceLROnPlateau: factor applied to the rate",
    )
    plateau_patience: int = bounded(
        2, low=0, help="ReduceLROnPlateau: epochs without improvement before reducing"
    )
    label_smoothing: float = bounded(
        0.0, low=0, high=1, high_open=True, help="label smoothing of the cross-entropy"
    )
    ema_decay: float = bounded(
        0.0, low=0, high=1, high_open=True, help="EMA of the weights, kept when better on validation (0: off)"
    )
    tta: Literal["none", "flip"] = bounded(
        "none", help="test-time augmentation of evaluation: flip averages each image with its mirror"
    )
    recipe: str = bounded(
        "none",
        help="defaults for the keys not given: auto (what the CLI, config files and studies use: by the "
        "dataset's kind), digits, natural, xray, or none (this class's own defaults)",
    )
    early_stopping: int = bounded(0, low=0, help="stop after this many epochs without improvement (0: off)")
    monitor: Literal["val_loss", "val_accuracy"] = bounded("val_loss", help="what picks the best weights")
    val_fraction: float = bounded(
        0.1, low=0, high=1, high_open=True, help="stratified fraction of train held out for validation"
    )
    class_balance: Literal["none", "weights", "sampler"] = bounded(
        "none", help="for imbalanced sets: loss weights or balanced batches"
    )
    augment: bool = bounded(True, help="the dataset's training augmentation (crop, flip where meaningful)")
    image_size: int | None = bounded(
        None, low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE, help="input size (default: the model's)"
    )
    channels: int | None = bounded(
        None, choices=(1, 3), help="1 or 3 input channels (default: the dataset's)"
    )
    train_limit: int | None = bounded(None, low=1, help="train on a stratified subset of this many images")
    precision: Literal["auto", "fp32", "bf16"] = bounded(
        "auto", help="auto: bf16 autocast where the hardware runs it natively"
    )
    channels_last: bool | None = bounded(
        None, help="channels_last memory format; default: on with CUDA or native bf16"
    )
    compile: bool = bounded(False, help="torch.compile the model")
    deterministic: bool = bounded(False, help="deterministic algorithms (bit-exact reruns)")
    seed: int = bounded(
        0, low=0, high=2**63 - 1, help="seed of initialisation, split, data order and augmentation"
    )
    device: str = bounded("auto", help="auto, cpu, cuda, cuda:1, ...")
    eval_batch_size: int = bounded(512, low=1, high=1 << 20, help="batch size of evaluation")
    data_dir: str | None = bounded(
        None, help="folder of datasets (default: $XAILAB_DATA_DIR or ~/.cache/xailab)"
    )
    dataset_root: str | None = bounded(None, help="read the dataset from this folder instead")
    model_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the model"})
    dataset_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the dataset loader"}
    )

    def __post_init__(self) -> None:
        check_bounds(self, "train")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate and build from a plain dict (e.g. a parsed YAML/TOML file, CLI flags, a study's cell).

        The keys ``data`` lacks are filled from its recipe (``recipe``, default ``auto``: the dataset's kind,
        see ``xailab.train.recipes``) before the dataclass defaults apply; given keys always win.
        """
        return from_dict(cls, apply_recipe(data), where="train")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
