"""The training loop, read top to bottom: ``train`` -> ``Trainer.setup`` -> ``start`` (fresh or resumed
``TrainState``) -> ``epoch`` / ``end_epoch`` per epoch -> ``finish``.

Data stays resident on the device and there is no per-sample Python work: each step slices a uint8 batch
from the in-memory dataset, augments and normalises it with tensor ops, runs forward/backward under
optional bf16 autocast, and accumulates loss/accuracy on the device. The host reads those numbers once per
epoch, so nothing synchronises per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xailab import autotune
from xailab.config import folder_name
from xailab.data import DATASETS, Dataset, ImageSet, load_dataset, stratified_split
from xailab.data.transforms import augment_batch, to_model_input
from xailab.device import autocast, bf16_is_fast, cpu_name, resolve_device
from xailab.errors import CheckpointError, ConfigError, TrainingDiverged
from xailab.io import folder_lock, remove_orphans, write_json, write_text
from xailab.models import count_macs, count_parameters, create_model, model_input_size, size_options
from xailab.train import distributed
from xailab.train.callbacks import ProgressBar, call
from xailab.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from xailab.train.config import TrainConfig
from xailab.train.ema import WeightEMA, flip_tta
from xailab.train.metrics import classification_metrics, predictions_csv
from xailab.train.runs import DatasetInfo, ModelInfo, Run, RunMeta, SplitSizes
from xailab.train.schedules import Plateau, lr_factor

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "images_per_s",
)
# An epoch whose mean loss exceeds this many times the loss at the start (or ln K, a uniform guess's loss,
# if higher) has diverged: a loss that large means the weights are no longer learning anything.
DIVERGENCE_FACTOR = 10.0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``/``bf16``/``fp32``) on ``device``; None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and not bf16_is_fast(device)):
        return None
    return torch.bfloat16


def resolve_precision(
    config: TrainConfig,
    device: torch.device,
    model: nn.Module | None = None,
    input_shape: Sequence[int] | None = None,
    batch: int = 32,
) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype (None: fp32) and whether to use channels_last memory, for ``config`` on ``device``.

    The one place training chooses them. Given the ``model`` and its ``input_shape`` ``[..., C, H, W]``,
    what ``config`` leaves free (``precision=auto``, ``channels_last`` unset) is the fastest training step
    measured by ``xailab.autotune`` (at ``batch`` images, cached per machine); explicit settings win.
    Without a model, or with ``XAILAB_AUTOTUNE=0``, the fixed rule: bf16 where ``bf16_is_fast``, and
    channels_last where convolutions run on tensor cores or bf16 units (on an AVX2 CPU it measured no
    faster, docs/benchmarks.md, and its BatchNorm is slower).
    """
    if model is not None and input_shape is not None:
        precision, channels_last = autotune.train_settings(
            model,
            input_shape,
            device,
            config.precision,
            config.channels_last,
            compile=config.compile,
            tune_options={"train_batch": min(batch, 32)},
        )
        return (torch.bfloat16 if precision == "bf16" else None), channels_last
    dtype = autocast_dtype(config.precision, device)
    if config.channels_last is not None:
        return dtype, config.channels_last
    return dtype, device.type == "cuda" or dtype is not None


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Turn on PyTorch's deterministic algorithms for the duration of the block, then restore the setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_cudnn = torch.backends.cudnn.benchmark
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = previous_cudnn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    tta: str = "none",
) -> Tensor:
    """Logits ``[N, K]`` (float32, on the model's device) for uint8 images ``[N, H, W, C]``, in eval mode.

    ``tta="flip"`` averages each image's logits with its mirror image's (``xailab.train.ema.flip_tta``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mean_t = torch.tensor(mean, device=device)
    std_t = torch.tensor(std, device=device)
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = to_model_input(images[start : start + batch_size].to(device), mean_t, std_t)
            if not channels_last:
                x = x.contiguous()
            with autocast(device, dtype):
                out.append(flip_tta(model, x) if tta == "flip" else model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    loss = nn.functional.cross_entropy(logits, labels.to(logits.device)).item()
    acc = (logits.argmax(1) == labels.to(logits.device)).float().mean().item()
    return loss, acc


def _split_train_val(dataset: Dataset, config: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """Training and validation sets.

    A dataset's own ``val`` split is used when it holds at least 5% as many images as ``train``; a token
    one (the chest X-ray set ships 16 images) is folded into training and a seeded stratified fraction of
    the training images is held out instead.
    """
    train = dataset["train"]
    own_val = dataset.splits.get("val")
    if own_val is not None and len(own_val) >= 0.05 * len(train):
        return train, own_val
    if own_val is not None:
        train = ImageSet(torch.cat([train.images, own_val.images]), torch.cat([train.labels, own_val.labels]))
    if config.val_fraction == 0:
        return train, None
    train_idx, val_idx = stratified_split(train.labels, config.val_fraction, seed=config.seed)
    return train.subset(train_idx), train.subset(val_idx)


def _class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency weights ``[K]`` normalised so that a balanced set gets all ones."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)  # on labels' device
    return (counts.sum() / (num_classes * counts)).float()


def _epoch_order(labels: Tensor, balance: str, generator: torch.Generator, num_classes: int) -> Tensor:
    """The order in which an epoch visits the training images: a permutation, or a class-balanced draw."""
    n = labels.shape[0]
    if balance == "sampler":
        weights = _class_weights(labels, num_classes)[labels].double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator, device=labels.device)


def config_hash(config: TrainConfig) -> str:
    """A short hash of the recipe (ignoring where data lives and the epoch budget), to recognise a run."""
    d = config.to_dict()
    for k in ("data_dir", "dataset_root", "epochs", "early_stopping"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def default_run_name(config: TrainConfig) -> str:
    return f"{config.model}__{config.dataset}"


def _environment(
    device: torch.device, dtype: torch.dtype | None, ctx: distributed.DistributedContext
) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "precision": "bf16-autocast" if dtype is not None else "fp32",
        "world_size": ctx.world_size,
        "backend": ctx.backend,
    }


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in HISTORY_COLUMNS))
    write_text(run_dir / "history.csv", "\n".join(lines) + "\n")
    write_json(run_dir / "history.json", history)


def check_train_config(config: TrainConfig) -> TrainConfig:
    """Checks of a training recipe that need the registries or the machine, done before any run folder is
    made: the device exists here, and the dataset loader reads every ``dataset_options`` key."""
    resolve_device(config.device)
    DATASETS.get(config.dataset).check_options(config.dataset_options, where="train.dataset_options")
    return config


def train(
    config: TrainConfig | dict[str, Any],
    *,
    out_dir: str | Path = "runs",
    name: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    dataset: Dataset | None = None,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
) -> Run:
    """Train ``config.model`` on ``config.dataset`` into ``out_dir/name`` and evaluate it on the test split.

    Every epoch is checkpointed atomically (``checkpoint.safetensors``); ``resume=True`` continues a killed
    run exactly where it stopped (same weights as an uninterrupted run in fp32 deterministic mode). The best
    weights by ``config.monitor`` are kept in ``model.safetensors`` and restored at the end (early stopping
    uses the same record). Pass ``dataset`` to reuse an already loaded dataset, and ``model_options`` to build
    the model with them instead of ``config.model_options``, which the run records: a study resolves its
    ``"cell:<model>"`` references into paths so (on ``resume`` the checkpoint replaces those weights). The
    run folder is locked
    while training: a second process on it gets a ``LockedError``. A loss that becomes NaN or far above
    its start raises ``TrainingDiverged`` and marks the run ``diverged``.

    Under a launcher (``torchrun``) every process calls this and training is data-parallel: ``batch_size`` is
    the global batch, rank 0 writes the files, and a run resumes with any number of processes
    (``xailab.train.distributed``).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if dataset is None:  # a dataset passed in need not be registered
        check_train_config(config)
    run_dir = Path(out_dir) / (
        folder_name(name, "train name") if name is not None else default_run_name(config)
    )
    with (
        deterministic_algorithms(config.deterministic),
        distributed.process_group(resolve_device(config.device)) as ctx,
        folder_lock(run_dir, "run folder") if ctx.is_main else contextlib.nullcontext(),
    ):
        if (run_dir / "config.json").exists() and not resume:
            raise CheckpointError(
                f"{run_dir} already holds a run: pass resume=True (--resume) to continue it, or choose another name"
            )
        if ctx.is_main:
            remove_orphans(run_dir)  # temp files of writes a kill interrupted
        distributed.barrier(ctx)  # every rank has looked before rank 0 writes config.json
        bar = [ProgressBar()] if progress and ctx.is_main else []
        trainer = Trainer.setup(config, run_dir, dataset, ctx, model_options)
        state = trainer.start(resume)
        return trainer.fit(state, [*bar, *callbacks])


def is_better(value: float, best: float | None, mode: str) -> bool:
    """The one rule that picks the best epoch: strictly lower (``mode="min"``) or higher (``"max"``)."""
    return best is None or (value < best if mode == "min" else value > best)


@dataclass
class TrainState:
    """Everything that changes during training and is saved with each checkpoint (besides the model's and
    optimiser's tensors and the RNG states): a resumed run continues from exactly this."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None  # the best monitored value so far (signed: see Trainer.monitored)
    bad_epochs: int = 0
    plateau: Plateau = field(default_factory=Plateau)
    start_loss: float | None = None  # the loss of the run's first step, the reference of divergence
    created: str = ""

    def info(self, config_hash: str) -> dict[str, Any]:
        """The JSON part of a checkpoint (the plateau schedule as a dict)."""
        return {**dataclasses.asdict(self), "config_hash": config_hash}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TrainState:
        """Rebuild from a checkpoint's JSON part (older checkpoints lack ``start_loss``)."""
        kept = {f.name: info[f.name] for f in dataclasses.fields(cls) if f.name in info}
        return cls(**{**kept, "plateau": Plateau(**info["plateau"])})


@dataclass
class Trainer:
    """The fixed parts of one training run (data on the device, model, optimiser, step geometry) and the
    three phases around a ``TrainState``: ``start`` (fresh or resumed), ``epoch`` (one pass), ``finish``."""

    config: TrainConfig
    run_dir: Path
    ctx: distributed.DistributedContext
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    generator: torch.Generator
    dataset: Dataset
    train_set: ImageSet
    val_set: ImageSet | None
    test_set: ImageSet | None
    model: nn.Module
    step_fn: nn.Module | Any
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    batch: int
    steps_per_epoch: int
    meta: RunMeta
    ema: WeightEMA | None = None  # the EMA of the weights (config.ema_decay > 0)

    @classmethod
    def setup(
        cls,
        config: TrainConfig,
        run_dir: Path,
        dataset: Dataset | None,
        ctx: distributed.DistributedContext,
        model_options: dict[str, Any] | None = None,
    ) -> Trainer:
        """Load and split the data, build the model (with ``model_options`` when given, else the config's)
        and optimiser, and describe the run (``RunMeta``)."""
        device = distributed.rank_device(resolve_device(config.device), ctx)
        torch.manual_seed(config.seed)  # model initialisation and dropout
        # Data order and augmentation draw on the training device, so no host->device copy waits per step.
        generator = torch.Generator(device=device).manual_seed(config.seed)
        if dataset is None:
            dataset = load_dataset(
                config.dataset,
                data_dir=config.data_dir,
                root=config.dataset_root,
                image_size=config.image_size or model_input_size(config.model)[0],
                channels=config.channels,
                **config.dataset_options,
            )
        train_set, val_set = _split_train_val(dataset, config)
        if config.train_limit is not None and config.train_limit < len(train_set):
            keep = 1 - config.train_limit / len(train_set)
            idx, _ = stratified_split(train_set.labels, keep, seed=config.seed)
            train_set = train_set.subset(idx)
        if len(train_set) == 0:
            raise ConfigError(f"dataset {config.dataset!r} has no training images")
        test_set = dataset.splits.get("test")
        k = dataset.num_classes

        options = {
            **size_options(config.model, dataset.image_size),
            **(config.model_options if model_options is None else model_options),
        }
        model = create_model(config.model, in_channels=dataset.channels, num_classes=k, **options)
        # Several processes would time each other: under DDP the fixed rule decides.
        shape = None if ctx.is_distributed else (dataset.channels, *dataset.image_size)
        dtype, channels_last = resolve_precision(config, device, model, shape, config.batch_size)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]  # stubs lack it
        optimizer = _optimizer(config, [p for p in model.parameters() if p.requires_grad])
        ddp_model = distributed.wrap_model(model, ctx)  # the training forward; `model` for everything else
        loss_weight = (
            _class_weights(train_set.labels, k).to(device) if config.class_balance == "weights" else None
        )
        batch = min(config.batch_size, len(train_set))
        distributed.local_batch_size(batch, ctx)  # checks that the global batch splits evenly over the ranks
        meta = _run_meta(config, dataset, model, device, dtype, ctx, (train_set, val_set, test_set))
        return cls(
            config=config,
            run_dir=run_dir,
            ctx=ctx,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            generator=generator,
            dataset=dataset,
            train_set=ImageSet(train_set.images.to(device), train_set.labels.to(device)),
            val_set=val_set,
            test_set=test_set,
            model=model,
            step_fn=torch.compile(ddp_model) if config.compile else ddp_model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=config.label_smoothing),
            batch=batch,
            steps_per_epoch=len(train_set) // batch,  # drop the ragged last batch: BatchNorm needs > 1 sample
            meta=meta,
            ema=WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None,
        )

    @property
    def mode(self) -> str:
        """Whether lower (``min``) or higher (``max``) monitored values are better."""
        return "min" if self.config.monitor == "val_loss" or self.val_set is None else "max"

    def monitored(self, row: dict[str, Any]) -> float:
        """The value an epoch is judged by: ``config.monitor``, or minus the training accuracy without a
        validation set."""
        return row[self.config.monitor] if self.val_set is not None else -row["train_accuracy"]

    def start(self, resume: bool) -> TrainState:
        """A fresh state, or the checkpointed one (restoring model, optimiser and RNGs); writes config.json."""
        state = TrainState(
            plateau=Plateau(self.config.plateau_factor, self.config.plateau_patience, self.mode),
            created=self.meta.created,
        )
        if resume and (self.run_dir / "checkpoint.safetensors").is_file():
            extra = self.ema.state_tensors() if self.ema is not None else None
            info, rng = load_checkpoint(self.run_dir, self.model, self.optimizer, extra)
            if self.ema is not None and extra is not None:
                self.ema.load_state_tensors(extra)
            if info["config_hash"] != self.meta.config_hash:
                raise CheckpointError(
                    f"{self.run_dir} was trained with another recipe (config hash {info['config_hash']} "
                    f"!= {self.meta.config_hash}); use a new run name"
                )
            state = TrainState.from_info(info)
            state.created = state.created or self.meta.created
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["data"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.meta = dataclasses.replace(self.meta, created=state.created)
        self.write_meta()
        return state

    def write_meta(self, **changes: Any) -> None:
        """Update the run's ``RunMeta`` (e.g. its status) and write ``config.json`` (rank 0)."""
        self.meta = dataclasses.replace(self.meta, **changes)
        if self.ctx.is_main:
            self.meta.write(self.run_dir)

    def fit(self, state: TrainState, callbacks: list[Any]) -> Run:
        """Train from ``state`` to the epoch budget (or early stop), then ``finish``."""
        info = {"epochs": self.config.epochs, "run_dir": self.run_dir, "start_epoch": state.epoch}
        call(callbacks, "on_train_begin", {**info, "model": self.model})
        while state.epoch < self.config.epochs:
            if self.config.early_stopping and state.bad_epochs >= self.config.early_stopping:
                break
            row = self.epoch(state, callbacks)
            self.end_epoch(state, row)
            call(callbacks, "on_epoch_end", row)
        run = self.finish(state)
        call(callbacks, "on_train_end", run)
        return run

    def epoch(self, state: TrainState, callbacks: list[Any]) -> dict[str, Any]:
        """One pass over the training images and the validation; the epoch's history row."""
        config, ctx, device, epoch = self.config, self.ctx, self.device, state.epoch
        self.model.train()
        if ctx.is_distributed:  # each rank its own dropout masks, a function of (seed, epoch, rank) only
            torch.manual_seed(distributed.dropout_seed(config.seed, epoch, ctx.rank))
        call(callbacks, "on_epoch_begin", epoch, self.steps_per_epoch)
        t0 = time.perf_counter()
        images, labels = self.train_set.images, self.train_set.labels
        order = _epoch_order(labels, config.class_balance, self.generator, self.dataset.num_classes)
        mean = torch.tensor(self.dataset.mean, device=device)
        std = torch.tensor(self.dataset.std, device=device)
        regularizer = getattr(self.model, "regularization_loss", None)
        total_steps = self.steps_per_epoch * config.epochs
        warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        # [sum of losses, correct predictions, first step's loss]: read once, at the end of the epoch
        sums = torch.zeros(3, device=device)
        lr = config.lr
        for i in range(self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + i
            lr = config.lr * state.plateau.scale * lr_factor(config.schedule, step, total_steps, warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            idx = order[i * self.batch : (i + 1) * self.batch]
            xb, yb = images[idx], labels[idx]
            if config.augment:
                xb = augment_batch(xb, self.dataset.augment, self.generator)
            # Every rank draws and augments the whole global batch and keeps its share, so the data stream
            # and the generator's state are the same whatever the number of processes.
            xb, yb = distributed.shard(xb, ctx), distributed.shard(yb, ctx)
            x = to_model_input(xb, mean, std)
            if not self.channels_last:
                # Not .contiguous(): with one channel the NHWC view already counts as contiguous, and its
                # ambiguous strides give the first conv's gradient a layout that DDP's buckets warn about.
                x = x.clone(memory_format=torch.contiguous_format)
            with autocast(device, self.dtype):
                logits = self.step_fn(x)
                loss = self.criterion(logits.float(), yb)
                if regularizer is not None:
                    loss = loss + regularizer()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            sums[0] += loss.detach() * yb.shape[0]
            sums[1] += (logits.detach().argmax(1) == yb).sum()
            if i == 0:
                sums[2] += loss.detach() / ctx.world_size
            call(callbacks, "on_step_end", i, self.batch)  # images of the step over all ranks
        seen = self.steps_per_epoch * self.batch  # over all ranks
        totals = distributed.all_reduce_sum(sums, ctx).tolist()  # the one host synchronisation of the epoch
        train_loss = totals[0] / seen
        seconds = time.perf_counter() - t0
        if state.start_loss is None and epoch == 0:
            state.start_loss = totals[2]
        self.check_divergence(state, train_loss)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": int(totals[1]) / seen,
            "val_loss": None,
            "val_accuracy": None,
            "lr": lr,
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / seconds, 1),
        }
        distributed.broadcast_buffers(self.model, ctx)  # rank 0's BatchNorm statistics, evaluated and saved
        if self.val_set is not None:
            # The choice between epochs (and raw / averaged weights) is made on plain logits, without the
            # recipe's test-time augmentation: flipping moves every candidate alike, and with the EMA it made
            # four forward passes of the validation split per epoch (~20% of a CIFAR-10 epoch's wall time).
            logits_val = self.logits(self.val_set.images, tta="none")
            row["val_loss"], row["val_accuracy"] = _loss_and_accuracy(logits_val, self.val_set.labels)
            if self.ema is not None:
                # the averaged weights are judged by the same validation; the better of the two is kept
                with self.ema.swapped_in(self.model):
                    ema_logits = self.logits(self.val_set.images, tta="none")
                    ema_val = _loss_and_accuracy(ema_logits, self.val_set.labels)
                ema_row = {**row, "val_loss": ema_val[0], "val_accuracy": ema_val[1]}
                row["weights"] = "raw"
                if is_better(self.monitored(ema_row), self.monitored(row), self.mode):
                    row.update(val_loss=ema_val[0], val_accuracy=ema_val[1], weights="ema")
        return row

    def check_divergence(self, state: TrainState, train_loss: float) -> None:
        """Raise ``TrainingDiverged`` (and mark the run ``diverged``) when the epoch's mean loss is NaN,
        infinite, or ``DIVERGENCE_FACTOR`` times above the loss of the run's start."""
        start = max(state.start_loss or 0.0, math.log(max(self.dataset.num_classes, 2)))
        if math.isfinite(train_loss) and train_loss <= DIVERGENCE_FACTOR * start:
            return
        self.write_meta(status="diverged")
        epoch = state.epoch + 1
        what = f"became {train_loss}" if not math.isfinite(train_loss) else f"rose to {train_loss:.4g}"
        kept = (
            f"the checkpoint of epoch {state.epoch} is kept in {self.run_dir}"
            if state.epoch
            else "no epoch had finished, so no checkpoint was written"
        )
        advice = f"Lower the learning rate (now {self.config.lr})"
        if self.dtype is not None:
            advice += " or use precision=fp32 (this run used bf16 autocast)"
        raise TrainingDiverged(
            f"the training loss {what} in epoch {epoch} (it started at {start:.4g}): training diverged; "
            f"{kept}. {advice}."
        )

    def end_epoch(self, state: TrainState, row: dict[str, Any]) -> None:
        """Record the epoch: history, the plateau schedule, best weights, the checkpoint (rank 0)."""
        state.history.append(row)
        state.epoch = row["epoch"]
        monitored = self.monitored(row)
        if self.config.schedule == "plateau":
            state.plateau.update(monitored)
        if is_better(monitored, state.best, self.mode):
            state.best, state.bad_epochs = monitored, 0
            if self.ctx.is_main:
                if row.get("weights") == "ema" and self.ema is not None:
                    with self.ema.swapped_in(self.model):
                        save_weights(self.run_dir / "model.safetensors", self.model)
                else:
                    save_weights(self.run_dir / "model.safetensors", self.model)
        else:
            state.bad_epochs += 1
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ctx.is_main:  # the state is global (same weights, optimiser and generator on every rank)
            extra = self.ema.state_tensors() if self.ema is not None else None
            info = state.info(self.meta.config_hash)
            save_checkpoint(self.run_dir, self.model, self.optimizer, info, rng, extra)
            _write_history(self.run_dir, state.history)
        distributed.barrier(self.ctx)  # the others read model.safetensors at the end

    def best_epoch(self, history: list[dict[str, Any]]) -> int:
        """The 1-based epoch the best weights are from (the first of equals); 0 without history."""
        best, best_epoch = None, 0
        for row in history:
            if is_better(self.monitored(row), best, self.mode):
                best, best_epoch = self.monitored(row), row["epoch"]
        return best_epoch

    def logits(self, images: Tensor, tta: str | None = None) -> Tensor:
        """Logits ``[N, K]`` of uint8 ``images`` ``[N, H, W, C]``, each rank predicting its share, on every rank.

        ``tta``: the test-time augmentation, the config's when ``None`` (the test split's).
        """
        local = predict_logits(
            self.model,
            distributed.shard(images, self.ctx),
            self.dataset.mean,
            self.dataset.std,
            self.config.eval_batch_size,
            self.dtype,
            self.channels_last,
            self.config.tta if tta is None else tta,
        )
        return distributed.gather_shards(local, images.shape[0], self.ctx)

    def finish(self, state: TrainState) -> Run:
        """Restore the best weights, evaluate them on the test split, write the metrics; the ``Run``."""
        load_weights(self.run_dir / "model.safetensors", self.model)
        self.model.eval()
        history = state.history
        metrics: dict[str, Any] = {
            "best_epoch": self.best_epoch(history),
            "train_seconds": round(sum(r["seconds"] for r in history), 2),
        }
        if history:
            metrics["train_images_per_s"] = round(sum(r["images_per_s"] for r in history) / len(history), 1)
        if self.val_set is not None and history:
            metrics["val"] = {"accuracy": history[metrics["best_epoch"] - 1]["val_accuracy"]}
        test, names = self.test_set, self.dataset.class_names
        if test is not None and len(test):
            logits = self.logits(test.images)
            metrics["test"] = classification_metrics(logits, test.labels, names)
            if self.ctx.is_main:
                predictions_csv(self.run_dir / "predictions.csv", logits, test.labels, names)
        if self.ctx.is_main:
            write_json(self.run_dir / "metrics.json", metrics)
        self.write_meta(status="finished")
        distributed.barrier(self.ctx)  # the run folder is complete when any rank returns
        ds = self.meta.dataset
        run_data = (ds.class_names, ds.mean, ds.std, ds.image_size, ds.channels, history, metrics)
        return Run(self.run_dir, self.config, self.model, *run_data)


def _optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
    opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _run_meta(
    config: TrainConfig,
    dataset: Dataset,
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    ctx: distributed.DistributedContext,
    splits: tuple[ImageSet, ImageSet | None, ImageSet | None],
) -> RunMeta:
    """The run's ``config.json`` record before training; a model that cannot take the dataset's input size
    is a ``ConfigError`` (counting its MACs runs one forward pass)."""
    try:
        macs = count_macs(model, dataset.image_size, dataset.channels)
    except RuntimeError as e:
        raise ConfigError(
            f"model {config.model!r} cannot take {dataset.channels}x{dataset.image_size[0]}x"
            f"{dataset.image_size[1]} inputs ({str(e).splitlines()[0]}); use a larger image_size"
        ) from None
    train_set, val_set, test_set = splits
    return RunMeta(
        status="running",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config_hash=config_hash(config),
        train=config,
        dataset=DatasetInfo(
            name=dataset.name,
            class_names=tuple(dataset.class_names),
            mean=tuple(dataset.mean),
            std=tuple(dataset.std),
            image_size=dataset.image_size,
            channels=dataset.channels,
            source=dataset.source,
            notes=tuple(dataset.notes),
            sizes=SplitSizes(
                len(train_set), len(val_set) if val_set else 0, len(test_set) if test_set else 0
            ),
        ),
        model=ModelInfo(
            name=config.model,
            parameters=count_parameters(model),
            macs=macs,
            options=dict(config.model_options),
            weights_source=getattr(model, "weights_source", "random init"),
        ),
        environment=_environment(device, dtype, ctx),
    )
