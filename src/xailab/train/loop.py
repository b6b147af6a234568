"""The training loop: one readable function, data resident on the device, no per-sample Python work.

Each step slices a uint8 batch from the in-memory dataset, augments and normalises it with tensor ops,
runs forward/backward under optional bf16 autocast, and accumulates loss/accuracy on the device. The host
reads those numbers once per epoch, so nothing synchronises per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xailab.data import Dataset, ImageSet, load_dataset, stratified_split
from xailab.data.transforms import augment_batch, to_model_input
from xailab.errors import CheckpointError, ConfigError, TrainingDiverged
from xailab.io import write_json, write_text
from xailab.models import count_macs, count_parameters, create_model, model_input_size, size_options
from xailab.train import distributed
from xailab.train.callbacks import ProgressBar, call
from xailab.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from xailab.train.config import TrainConfig
from xailab.train.metrics import classification_metrics, predictions_csv
from xailab.train.runs import Run
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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; any other string is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds this device up (CUDA with bf16, or a CPU with native bf16 in oneDNN).

    On CPUs without AVX-512 BF16/AMX, bf16 convolutions are emulated and several times slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``/``bf16``/``fp32``) on ``device``; None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and not bf16_is_fast(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
) -> Tensor:
    """Logits ``[N, K]`` (float32, on the model's device) for uint8 images ``[N, H, W, C]``, in eval mode."""
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
                out.append(model(x).float())
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


def _cpu_name() -> str:
    """The processor's model name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(
    device: torch.device, dtype: torch.dtype | None, ctx: distributed.DistributedContext
) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
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


def train(
    config: TrainConfig | dict[str, Any],
    *,
    out_dir: str | Path = "runs",
    name: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    dataset: Dataset | None = None,
    progress: bool = True,
) -> Run:
    """Train ``config.model`` on ``config.dataset`` into ``out_dir/name`` and evaluate it on the test split.

    Every epoch is checkpointed atomically (``checkpoint.safetensors``); ``resume=True`` continues a killed
    run exactly where it stopped (same weights as an uninterrupted run in fp32 deterministic mode). The best
    weights by ``config.monitor`` are kept in ``model.safetensors`` and restored at the end (early stopping
    uses the same record). Pass ``dataset`` to reuse an already loaded dataset.

    Under a launcher (``torchrun``) every process calls this and training is data-parallel: ``batch_size`` is
    the global batch, rank 0 writes the files, and a run resumes with any number of processes
    (``xailab.train.distributed``).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    run_dir = Path(out_dir) / (name or default_run_name(config))
    with (
        deterministic_algorithms(config.deterministic),
        distributed.process_group(resolve_device(config.device)) as ctx,
    ):
        if run_dir.exists() and (run_dir / "config.json").exists() and not resume:
            raise CheckpointError(
                f"{run_dir} already holds a run: pass resume=True (--resume) to continue it, or choose another name"
            )
        distributed.barrier(ctx)  # every rank has looked before rank 0 writes config.json
        bar = [ProgressBar()] if progress and ctx.is_main else []
        return _train(config, run_dir, resume, [*bar, *callbacks], dataset, ctx)


def _sharded_logits(
    model: nn.Module,
    images: Tensor,
    dataset: Dataset,
    config: TrainConfig,
    dtype: torch.dtype | None,
    channels_last: bool,
    ctx: distributed.DistributedContext,
) -> Tensor:
    """Logits ``[N, K]`` of uint8 ``images`` ``[N, H, W, C]``, each rank predicting its share, on every rank."""
    local = predict_logits(
        model,
        distributed.shard(images, ctx),
        dataset.mean,
        dataset.std,
        config.eval_batch_size,
        dtype,
        channels_last,
    )
    return distributed.gather_shards(local, images.shape[0], ctx)


def _train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    callbacks: list[Any],
    dataset: Dataset | None,
    ctx: distributed.DistributedContext,
) -> Run:
    device = distributed.rank_device(resolve_device(config.device), ctx)
    dtype = autocast_dtype(config.precision, device)
    # channels_last pays off where convolutions run on tensor cores or bf16 units; on an AVX2 CPU it measured
    # no faster (docs/benchmarks.md), and its BatchNorm is slower.
    channels_last = (
        config.channels_last
        if config.channels_last is not None
        else (device.type == "cuda" or dtype is not None)
    )
    torch.manual_seed(config.seed)  # model initialisation and dropout
    # Data order and augmentation draw on the training device, so no host->device copy waits per step.
    generator = torch.Generator(device=device).manual_seed(config.seed)

    image_size = config.image_size or model_input_size(config.model)[0]
    if dataset is None:
        dataset = load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            root=config.dataset_root,
            image_size=image_size,
            channels=config.channels,
            **config.dataset_options,
        )
    train_set, val_set = _split_train_val(dataset, config)
    if config.train_limit is not None and config.train_limit < len(train_set):
        idx, _ = stratified_split(train_set.labels, 1 - config.train_limit / len(train_set), seed=config.seed)
        train_set = train_set.subset(idx)
    if len(train_set) == 0:
        raise ConfigError(f"dataset {config.dataset!r} has no training images")
    test_set = dataset.splits.get("test")
    k = dataset.num_classes

    options = {**size_options(config.model, dataset.image_size), **config.model_options}
    model = create_model(config.model, in_channels=dataset.channels, num_classes=k, **options)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
    ddp_model = distributed.wrap_model(model, ctx)  # the training forward; `model` for everything else
    step_fn = torch.compile(ddp_model) if config.compile else ddp_model

    images = train_set.images.to(device)
    labels = train_set.labels.to(device)
    mean = torch.tensor(dataset.mean, device=device)
    std = torch.tensor(dataset.std, device=device)
    loss_weight = (
        _class_weights(train_set.labels, k).to(device) if config.class_balance == "weights" else None
    )
    criterion = nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=config.label_smoothing)
    regularizer = getattr(model, "regularization_loss", None)

    batch = min(config.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch  # drop the ragged last batch: BatchNorm needs > 1 sample
    distributed.local_batch_size(batch, ctx)  # checks that the global batch splits evenly over the ranks
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    plateau = Plateau(
        config.plateau_factor, config.plateau_patience, "min" if config.monitor == "val_loss" else "max"
    )
    history: list[dict[str, Any]] = []
    best: float | None = None
    bad_epochs = 0
    start_epoch = 0

    meta = {
        "status": "running",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_hash": config_hash(config),
        "train": config.to_dict(),
        "dataset": {
            "name": dataset.name,
            "class_names": list(dataset.class_names),
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "image_size": list(dataset.image_size),
            "channels": dataset.channels,
            "source": dataset.source,
            "notes": list(dataset.notes),
            "sizes": {
                "train": len(train_set),
                "val": len(val_set) if val_set else 0,
                "test": len(test_set) if test_set else 0,
            },
        },
        "model": {
            "name": config.model,
            "parameters": count_parameters(model),
            "macs": count_macs(model, dataset.image_size, dataset.channels),
            "options": dict(config.model_options),
            "weights_source": getattr(model, "weights_source", "random init"),
        },
        "environment": _environment(device, dtype, ctx),
    }
    if resume and (run_dir / "checkpoint.safetensors").is_file():
        info, rng = load_checkpoint(run_dir, model, optimizer)
        if info["config_hash"] != config_hash(config):
            raise CheckpointError(
                f"{run_dir} was trained with another recipe (config hash {info['config_hash']} "
                f"!= {config_hash(config)}); use a new run name"
            )
        start_epoch, history, best, bad_epochs = (
            info["epoch"],
            info["history"],
            info["best"],
            info["bad_epochs"],
        )
        plateau = Plateau(**info["plateau"])
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["data"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        meta["created"] = info.get("created", meta["created"])
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", meta)

    call(
        callbacks,
        "on_train_begin",
        {"epochs": config.epochs, "run_dir": run_dir, "start_epoch": start_epoch, "model": model},
    )
    for epoch in range(start_epoch, config.epochs):
        if config.early_stopping and bad_epochs >= config.early_stopping:
            break
        model.train()
        if ctx.is_distributed:  # each rank its own dropout masks, a function of (seed, epoch, rank) only
            torch.manual_seed(distributed.dropout_seed(config.seed, epoch, ctx.rank))
        call(callbacks, "on_epoch_begin", epoch, steps_per_epoch)
        t0 = time.perf_counter()
        order = _epoch_order(labels, config.class_balance, generator, k)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lr = config.lr * plateau.scale * lr_factor(config.schedule, step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[i * batch : (i + 1) * batch]
            xb, yb = images[idx], labels[idx]
            if config.augment:
                xb = augment_batch(xb, dataset.augment, generator)
            # Every rank draws and augments the whole global batch and keeps its share, so the data stream
            # and the generator's state are the same whatever the number of processes.
            xb, yb = distributed.shard(xb, ctx), distributed.shard(yb, ctx)
            x = to_model_input(xb, mean, std)
            if not channels_last:
                # Not .contiguous(): with one channel the NHWC view already counts as contiguous, and its
                # ambiguous strides give the first conv's gradient a layout that DDP's buckets warn about.
                x = x.clone(memory_format=torch.contiguous_format)
            with autocast(device, dtype):
                logits = step_fn(x)
                loss = criterion(logits.float(), yb)
                if regularizer is not None:
                    loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * yb.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
            call(callbacks, "on_step_end", i, batch)  # images of the step over all ranks
        seen = steps_per_epoch * batch  # over all ranks
        sums = distributed.all_reduce_sum(torch.stack([loss_sum, correct.to(loss_sum.dtype)]), ctx)
        train_loss = float(sums[0]) / seen  # the one host synchronisation of the epoch
        seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            meta["status"] = "diverged"
            if ctx.is_main:
                write_json(run_dir / "config.json", meta)
            raise TrainingDiverged(
                f"the training loss became {train_loss} in epoch {epoch + 1}; the checkpoint of epoch "
                f"{epoch} is kept in {run_dir}. Lower the learning rate (now {config.lr}) or use precision=fp32."
            )
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": int(sums[1]) / seen,
            "val_loss": None,
            "val_accuracy": None,
            "lr": lr,
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / seconds, 1),
        }
        distributed.broadcast_buffers(model, ctx)  # rank 0's BatchNorm statistics, evaluated and saved
        if val_set is not None:
            logits_val = _sharded_logits(model, val_set.images, dataset, config, dtype, channels_last, ctx)
            row["val_loss"], row["val_accuracy"] = _loss_and_accuracy(logits_val, val_set.labels)
        history.append(row)
        monitored = row[config.monitor] if val_set is not None else -row["train_accuracy"]
        if config.schedule == "plateau":
            plateau.update(monitored)
        sign = 1 if config.monitor == "val_loss" or val_set is None else -1
        if best is None or sign * monitored < sign * best:
            best, bad_epochs = monitored, 0
            if ctx.is_main:
                save_weights(run_dir / "model.safetensors", model)
        else:
            bad_epochs += 1
        rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        if ctx.is_main:  # the state is global (same weights, optimiser and generator on every rank)
            save_checkpoint(
                run_dir,
                model,
                optimizer,
                {
                    "epoch": epoch + 1,
                    "history": history,
                    "best": best,
                    "bad_epochs": bad_epochs,
                    "plateau": plateau.state(),
                    "config_hash": config_hash(config),
                    "created": meta["created"],
                },
                rng,
            )
            _write_history(run_dir, history)
        distributed.barrier(ctx)  # the others read model.safetensors at the end
        call(callbacks, "on_epoch_end", row)

    load_weights(run_dir / "model.safetensors", model)
    model.eval()
    metrics: dict[str, Any] = {
        "best_epoch": _best_epoch(history, config.monitor, val_set is not None),
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
    }
    if history:
        metrics["train_images_per_s"] = round(sum(r["images_per_s"] for r in history) / len(history), 1)
    if val_set is not None and history:
        metrics["val"] = {"accuracy": history[metrics["best_epoch"] - 1]["val_accuracy"]}
    if test_set is not None and len(test_set):
        logits = _sharded_logits(model, test_set.images, dataset, config, dtype, channels_last, ctx)
        metrics["test"] = classification_metrics(logits, test_set.labels, dataset.class_names)
        if ctx.is_main:
            predictions_csv(run_dir / "predictions.csv", logits, test_set.labels, dataset.class_names)
    meta["status"] = "finished"
    if ctx.is_main:
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "config.json", meta)
    distributed.barrier(ctx)  # the run folder is complete when any rank returns
    run = Run(
        run_dir,
        config,
        model,
        dataset.class_names,
        dataset.mean,
        dataset.std,
        dataset.image_size,
        dataset.channels,
        history,
        metrics,
    )
    call(callbacks, "on_train_end", run)
    return run


def _best_epoch(history: list[dict[str, Any]], monitor: str, has_val: bool) -> int:
    if not history:
        return 0
    if not has_val:
        key, sign = "train_accuracy", -1
    else:
        key, sign = monitor, (1 if monitor == "val_loss" else -1)
    return min(range(len(history)), key=lambda i: (sign * history[i][key], i)) + 1
