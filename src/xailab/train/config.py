"""The training recipe: one frozen dataclass, loadable from YAML/TOML, stored in every run's ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from xailab.config import from_dict, to_dict
from xailab.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Defaults follow the seeds (Adam, ReduceLROnPlateau).

    precision: ``auto`` uses bf16 autocast where the device runs it fast (CUDA with bf16, or a CPU whose
    oneDNN supports bf16) and fp32 elsewhere; ``fp32`` is the exact mode.
    class_balance: ``weights`` scales the loss by inverse class frequency; ``sampler`` draws batches
    class-balanced (for imbalanced sets such as the ~3:1 chest X-ray set).
    """

    model: str
    dataset: str
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["plateau", "onecycle", "cosine", "constant"] = "plateau"
    warmup_epochs: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    label_smoothing: float = 0.0
    early_stopping: int = 0
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    val_fraction: float = 0.1
    class_balance: Literal["none", "weights", "sampler"] = "none"
    augment: bool = True
    image_size: int | None = None
    channels: int | None = None
    train_limit: int | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 512
    data_dir: str | None = None
    dataset_root: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)

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
