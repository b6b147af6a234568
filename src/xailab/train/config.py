"""The training recipe: one frozen dataclass, loadable from YAML/TOML, stored in every run's ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from xailab.config import from_dict, to_dict
from xailab.errors import ConfigError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


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
    epochs: int = _opt(10, "number of epochs")
    batch_size: int = _opt(128, "training batch size (global: split over the processes of a DDP run)")
    optimizer: Literal["adam", "adamw", "sgd"] = _opt("adam", "optimiser; sgd is SGD with Nesterov momentum")
    lr: float = _opt(1e-3, "base (peak, for onecycle) learning rate")
    weight_decay: float = _opt(0.0, "weight decay of the optimiser")
    momentum: float = _opt(0.9, "SGD momentum")
    schedule: Literal["plateau", "onecycle", "cosine", "constant"] = _opt("plateau", "learning-rate schedule")
    warmup_epochs: float = _opt(
        0.0, "linear warm-up for cosine; peak position for onecycle (0: 30%% of the run)"
    )
    plateau_factor: float = _opt(0.5, "ReduceLROnPlateau: factor applied to the rate")
    plateau_patience: int = _opt(2, "ReduceLROnPlateau: epochs without improvement before reducing")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    early_stopping: int = _opt(0, "stop after this many epochs without improvement (0: off)")
    monitor: Literal["val_loss", "val_accuracy"] = _opt("val_loss", "what picks the best weights")
    val_fraction: float = _opt(0.1, "stratified fraction of train held out for validation")
    class_balance: Literal["none", "weights", "sampler"] = _opt(
        "none", "for imbalanced sets: loss weights or balanced batches"
    )
    augment: bool = _opt(True, "the dataset's training augmentation (crop, flip where meaningful)")
    image_size: int | None = _opt(None, "input size (default: the model's)")
    channels: int | None = _opt(None, "1 or 3 input channels (default: the dataset's)")
    train_limit: int | None = _opt(None, "train on a stratified subset of this many images")
    precision: Literal["auto", "fp32", "bf16"] = _opt(
        "auto", "auto: bf16 autocast where the hardware runs it natively"
    )
    channels_last: bool | None = _opt(
        None, "channels_last memory format; default: on with CUDA or native bf16"
    )
    compile: bool = _opt(False, "torch.compile the model")
    deterministic: bool = _opt(False, "deterministic algorithms (bit-exact reruns)")
    seed: int = _opt(0, "seed of initialisation, split, data order and augmentation")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, ...")
    eval_batch_size: int = _opt(512, "batch size of evaluation")
    data_dir: str | None = _opt(None, "folder of datasets (default: $XAILAB_DATA_DIR or ~/.cache/xailab)")
    dataset_root: str | None = _opt(None, "read the dataset from this folder instead")
    model_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the model"})
    dataset_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the dataset loader"}
    )

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "val_fraction": 0 <= self.val_fraction < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "early_stopping": self.early_stopping >= 0,
            "channels": self.channels in (None, 1, 3),
            "train_limit": self.train_limit is None or self.train_limit >= 1,
            "plateau_factor": 0 < self.plateau_factor < 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"train config: invalid {key} = {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate and build from a plain dict (e.g. a parsed YAML/TOML file)."""
        return from_dict(cls, data, where="train")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
