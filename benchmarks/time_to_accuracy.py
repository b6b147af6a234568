"""Time to the seed's accuracy: xailab's default recipe against the seed's own, per seed cell, same machine, same run.

For each cell (model x dataset of the multi-model seed) and each recipe, one training run; after every epoch the
model the recipe would deliver if stopped there (its best-on-validation weights, ``model.safetensors``) is
evaluated on the test split *outside the timed part*, and the run stops once that accuracy reaches the seed's
claimed test accuracy. Reported: epochs and wall-clock seconds (training plus the recipe's own validation,
without the benchmark's test evaluations) until the claim was reached, or "not reached" within the budget.

Recipes:
  xailab  ``TrainConfig.from_dict`` with nothing but model, dataset, epochs and channels: the dataset's recipe
          (``xailab.train.recipes``: one-cycle, label smoothing, weight EMA, flip TTA where meaningful).
  seed    the multi-model seed's: Adam 1e-3, ReduceLROnPlateau (factor 0.5, patience 2), early stopping after
          5 epochs without a better validation loss, batch 128, ``--seed-augment`` (default ``none``: the seed
          describes resizing and normalisation only), no label smoothing, EMA or TTA.

    .venv/bin/python benchmarks/time_to_accuracy.py --data-dir ../shared/datasets \
        --cells cifar10:mobilenetv2,cifar10:efficient_cnn,cifar10:resnet18,fashion_mnist:efficient_cnn \
        --xailab-epochs 10 --seed-epochs 30 --out runs/time-to-accuracy

``--train-limit N --test-limit M`` and ``--xailab-epochs 1 --seed-epochs 1`` make a smoke run. Keep the machine quiet while it
runs: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from xailab.data import Dataset, load_dataset
from xailab.device import cpu_name  # the processor's model name, as runs record it
from xailab.io import write_json, write_text
from xailab.models import model_input_size
from xailab.train import TrainConfig, predict_logits, train
from xailab.train.checkpoint import load_weights

# The multi-model seed's claimed test accuracies (claims, not measurements): model -> dataset -> accuracy.
SEED_CLAIMS: dict[str, dict[str, float]] = {
    "mobilenetv2": {"mnist": 0.992, "fashion_mnist": 0.925, "cifar10": 0.782},
    "efficient_cnn": {"mnist": 0.995, "fashion_mnist": 0.934, "cifar10": 0.801},
    "resnet18": {"mnist": 0.993, "fashion_mnist": 0.928, "cifar10": 0.763},
}
DEFAULT_CELLS = "cifar10:mobilenetv2,cifar10:efficient_cnn,cifar10:resnet18,fashion_mnist:efficient_cnn"


class TargetReached(Exception):
    """Raised by ``TimeToAccuracy`` to end a run once the target accuracy is reached."""


class TimeToAccuracy:
    """A training callback: after each epoch, the test accuracy of the run's best-so-far weights (untimed);
    records the timed seconds and raises ``TargetReached`` when the accuracy reaches ``target``."""

    def __init__(self, dataset: Any, config: TrainConfig, target: float) -> None:
        self.dataset, self.config, self.target = dataset, config, target
        self.test = dataset["test"]
        self.rows: list[dict[str, Any]] = []
        self.untimed = 0.0
        self.t0 = 0.0
        self.model: torch.nn.Module | None = None
        self.run_dir: Path | None = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.model, self.run_dir = info["model"], Path(info["run_dir"])
        self.t0 = time.perf_counter()

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        assert self.model is not None and self.run_dir is not None
        start = time.perf_counter()
        timed = start - self.t0 - self.untimed
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        load_weights(self.run_dir / "model.safetensors", self.model)  # what the recipe would deliver now
        test = self.test
        logits = predict_logits(
            self.model,
            test.images,
            self.dataset.mean,
            self.dataset.std,
            self.config.eval_batch_size,
            tta=self.config.tta,
        )
        accuracy = (logits.argmax(1).cpu() == test.labels).float().mean().item()
        self.model.load_state_dict(current)
        self.rows.append(
            {
                "epoch": row["epoch"],
                "seconds": round(timed, 2),
                "val_accuracy": row.get("val_accuracy"),
                "test_accuracy": round(accuracy, 4),
            }
        )
        self.untimed += time.perf_counter() - start
        if accuracy >= self.target:
            raise TargetReached


def recipe_config(
    recipe: str, model: str, dataset: str, epochs: int, args: argparse.Namespace
) -> TrainConfig:
    """The ``TrainConfig`` of ``recipe`` (``xailab`` or ``seed``) for one cell."""
    common: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "epochs": epochs,
        "channels": 3,  # the seed feeds every model 3 channels
        "seed": args.seed,
        "data_dir": args.data_dir,
    }
    if recipe == "xailab":
        return TrainConfig.from_dict(common)
    return TrainConfig.from_dict(
        {
            **common,
            "recipe": "none",
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 128,
            "schedule": "plateau",
            "plateau_factor": 0.5,
            "plateau_patience": 2,
            "early_stopping": 5,
            "monitor": "val_loss",
            "augment": args.seed_augment == "dataset",
        }
    )


def smoke_cut(dataset: Dataset, train_limit: int | None, test_limit: int | None) -> Dataset:
    """``dataset`` with its train split cut to ``train_limit`` images (validation is then held out of those)
    and its test split to ``test_limit``, evenly spaced through each split (image folders are read class by
    class): smoke runs, in which every evaluation stays small."""
    splits = dict(dataset.splits)
    for split, limit in (("train", train_limit), ("test", test_limit)):
        if limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].subset(torch.linspace(0, len(splits[split]) - 1, limit).long())
    return replace(dataset, splits=splits)


def run_cell(
    model: str, dataset_name: str, recipe: str, epochs: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one cell with one recipe until the claim is reached or the budget ends; its result row."""
    target = SEED_CLAIMS[model][dataset_name]
    dataset = smoke_cut(
        load_dataset(dataset_name, data_dir=args.data_dir, image_size=model_input_size(model)[0], channels=3),
        args.train_limit,
        args.test_limit,
    )
    config = recipe_config(recipe, model, dataset_name, epochs, args)
    clock = TimeToAccuracy(dataset, config, target)
    name = f"{model}__{dataset_name}__{recipe}"
    reached = False
    try:
        train(config, out_dir=args.out, name=name, dataset=dataset, callbacks=[clock], progress=False)
    except TargetReached:
        reached = True
    last = clock.rows[-1] if clock.rows else {}
    return {
        "model": model,
        "dataset": dataset_name,
        "recipe": recipe,
        "target": target,
        "reached": reached,
        "epochs": last.get("epoch") if reached else None,
        "seconds": last.get("seconds") if reached else None,
        "epochs_run": last.get("epoch"),
        "seconds_run": last.get("seconds"),
        "best_test_accuracy": max((r["test_accuracy"] for r in clock.rows), default=None),
        "epoch_budget": epochs,
        "data_notes": list(dataset.notes),
        "per_epoch": clock.rows,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("data_dir", "dataset_root")},
    }


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    """The results as a markdown table."""
    lines = [
        f"Machine: {machine}",
        "",
        "| model | dataset | recipe | seed claim | reached | epochs | seconds | best test acc | budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['recipe']} | {r['target']:.3f} | "
            f"{'yes' if r['reached'] else 'no'} | {r['epochs'] if r['reached'] else '-'} | "
            f"{r['seconds'] if r['reached'] else '-'} | {r['best_test_accuracy']} | {r['epoch_budget']} |"
        )
    if any("JPEG" in n for r in rows for n in r["data_notes"]):
        lines += ["", "CIFAR-10 rows use the lossy JPEG q75 copy (see each run's config.json notes)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder of datasets (default: $XAILAB_DATA_DIR)")
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated dataset:model pairs")
    parser.add_argument("--recipes", default="xailab,seed", help="comma-separated: xailab, seed")
    parser.add_argument("--xailab-epochs", type=int, default=10, help="epoch budget of xailab's recipe")
    parser.add_argument("--seed-epochs", type=int, default=30, help="epoch budget of the seed's recipe")
    parser.add_argument("--seed-augment", choices=("none", "dataset"), default="none")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use N of the training images (smoke runs only)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="use N of the test images (smoke runs only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="runs/time-to-accuracy")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out = str(out / stamp)  # every benchmark run trains fresh (no resumed runs)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = []
    for cell in args.cells.split(","):
        dataset_name, model = cell.strip().split(":")
        if model not in SEED_CLAIMS or dataset_name not in SEED_CLAIMS[model]:
            parser.error(
                f"--cells: {cell!r} is no seed cell; models {list(SEED_CLAIMS)}, datasets mnist, "
                "fashion_mnist, cifar10"
            )
        for recipe in args.recipes.split(","):
            epochs = args.xailab_epochs if recipe == "xailab" else args.seed_epochs
            row = run_cell(model, dataset_name, recipe, epochs, args)
            rows.append(row)
            print(
                f"{model} {dataset_name} {recipe}: target {row['target']} "
                + (
                    f"reached in {row['epochs']} epochs, {row['seconds']} s"
                    if row["reached"]
                    else f"not reached in {row['epochs_run']} epochs (best {row['best_test_accuracy']})"
                ),
                flush=True,
            )
            # written after every run, so a long benchmark killed midway keeps what it measured
            write_json(Path(args.out) / "time_to_accuracy.json", {"machine": machine, "rows": rows})
            write_text(Path(args.out) / "time_to_accuracy.md", markdown(rows, machine))
    print(markdown(rows, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
