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

A full run takes hours on a CPU; ``--resume runs/time-to-accuracy/<stamp>`` continues a killed one with the
arguments it was started with (refused on another machine, or when the arguments differ): finished cells are
kept, and the cell that was training continues from its last checkpoint with its clock (``clock.json`` in its
run folder: the timed seconds and test accuracies so far), so its figure is the sum of its timed epochs across
the processes (each process's start-up is outside the clock, as the first one's is). A cell whose clock is
behind its checkpoint (killed in the instant between the two writes) starts again, its folder kept aside.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from xailab.data import Dataset, load_dataset
from xailab.device import cpu_name  # the processor's model name, as runs record it
from xailab.errors import CheckpointError
from xailab.io import read_json, write_json, write_text
from xailab.models import model_input_size
from xailab.train import TrainConfig, predict_logits, train
from xailab.train.checkpoint import checkpoint_info, load_weights

# The multi-model seed's claimed test accuracies (claims, not measurements): model -> dataset -> accuracy.
SEED_CLAIMS: dict[str, dict[str, float]] = {
    "mobilenetv2": {"mnist": 0.992, "fashion_mnist": 0.925, "cifar10": 0.782},
    "efficient_cnn": {"mnist": 0.995, "fashion_mnist": 0.934, "cifar10": 0.801},
    "resnet18": {"mnist": 0.993, "fashion_mnist": 0.928, "cifar10": 0.763},
}
DEFAULT_CELLS = "cifar10:mobilenetv2,cifar10:efficient_cnn,cifar10:resnet18,fashion_mnist:efficient_cnn"
CLOCK = "clock.json"  # in each run folder: the clock's rows so far (a killed cell resumes with them)
# The arguments a resumed benchmark must share with the run it continues (the rest: where and how verbose).
SAME_ARGS = (
    "cells",
    "recipes",
    "xailab_epochs",
    "seed_epochs",
    "seed_augment",
    "train_limit",
    "test_limit",
    "seed",
)


class TargetReached(Exception):
    """Raised by ``TimeToAccuracy`` to end a run once the target accuracy is reached."""


class TimeToAccuracy:
    """A training callback: after each epoch, the test accuracy of the run's best-so-far weights (untimed);
    records the timed seconds and raises ``TargetReached`` when the accuracy reaches ``target``."""

    def __init__(
        self, dataset: Any, config: TrainConfig, target: float, rows: list[dict[str, Any]] | None = None
    ) -> None:
        self.dataset, self.config, self.target = dataset, config, target
        self.test = dataset["test"]
        self.rows: list[dict[str, Any]] = list(rows or [])  # a resumed cell's rows so far
        self.offset = self.rows[-1]["seconds"] if self.rows else 0.0  # timed seconds of earlier processes
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
        timed = self.offset + start - self.t0 - self.untimed
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
        # after the run's checkpoint of this epoch: a resumed cell continues from both
        write_json(self.run_dir / CLOCK, {"target": self.target, "rows": self.rows})
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


def cell_state(run_dir: Path, target: float) -> tuple[str, list[dict[str, Any]]]:
    """Where a cell's run folder stands, and its clock's rows: ``new`` (no folder), ``done`` (the target
    reached, or the run ended: budget spent or early stopping), ``resume`` (the clock matches the last
    checkpoint), ``restart`` (a folder without a checkpoint, or a clock behind it)."""
    if not run_dir.exists():
        return "new", []
    rows = read_json(run_dir / CLOCK)["rows"] if (run_dir / CLOCK).is_file() else []
    if (rows and rows[-1]["test_accuracy"] >= target) or (run_dir / "metrics.json").is_file():
        return "done", rows
    try:
        epoch = checkpoint_info(run_dir)["epoch"]
    except CheckpointError:
        return "restart", rows
    return ("resume" if rows and rows[-1]["epoch"] == epoch else "restart"), rows


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
    name = f"{model}__{dataset_name}__{recipe}"
    run_dir = Path(args.out) / name
    state, rows = cell_state(run_dir, target)
    if state == "restart":
        aside = run_dir.with_name(f"{name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(
            f"{name}: nothing to resume (killed in its first epoch, or between its checkpoint and its "
            f"clock); starts again, the old folder kept as {aside.name}",
            flush=True,
        )
        rows = []
    if state != "done":
        clock = TimeToAccuracy(dataset, config, target, rows)
        with contextlib.suppress(TargetReached):
            train(
                config,
                out_dir=args.out,
                name=name,
                dataset=dataset,
                callbacks=[clock],
                progress=False,
                resume=state == "resume",
            )
        rows = clock.rows
    reached = bool(rows) and rows[-1]["test_accuracy"] >= target
    last = rows[-1] if rows else {}
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
        "best_test_accuracy": max((r["test_accuracy"] for r in rows), default=None),
        "epoch_budget": epochs,
        "data_notes": list(dataset.notes),
        "per_epoch": rows,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("data_dir", "dataset_root")},
    }


def _reach(row: dict[str, Any]) -> str:
    if row["reached"]:
        return f"{row['epochs']} epochs, {row['seconds']:.0f} s"
    return (
        f"not reached: {row['epochs_run']} epochs, {row['seconds_run']:.0f} s run "
        f"(best {row['best_test_accuracy']:.4f})"
    )


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per cell with both recipes run: each recipe's way to the claim and the seed's time over xailab's.

    Where only xailab's recipe reached the claim there is no finite ratio: the row says whether the seed's run
    stopped early (its early stopping) or ran its whole budget; where neither or only the seed's reached it,
    there is no ratio (``-``)."""
    by_cell: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_cell.setdefault((r["model"], r["dataset"]), {})[r["recipe"]] = r
    out = []
    for (model, dataset), recipes in by_cell.items():
        if "xailab" not in recipes or "seed" not in recipes:
            continue
        ours, seed = recipes["xailab"], recipes["seed"]
        if ours["reached"] and seed["reached"]:
            ratio = f"{seed['seconds'] / ours['seconds']:.2f}x"
        elif ours["reached"] and seed["epochs_run"] < seed["epoch_budget"]:
            ratio = "only xailab's reaches it (the seed's stopped early)"
        elif ours["reached"]:
            ratio = "only xailab's reaches it (the seed's budget ran out)"
        else:
            ratio = "-"
        out.append(
            {"model": model, "dataset": dataset, "xailab": _reach(ours), "seed": _reach(seed), "ratio": ratio}
        )
    return out


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
    ratios = speedups(rows)
    if ratios:
        lines += [
            "",
            "| model | dataset | xailab's recipe to the claim | the seed's recipe to the claim | seed / xailab (time) |",
            "|---|---|---|---|---|",
        ]
        for r in ratios:
            lines.append(f"| {r['model']} | {r['dataset']} | {r['xailab']} | {r['seed']} | {r['ratio']} |")
    if any("JPEG" in n for r in rows for n in r["data_notes"]):
        lines += ["", "CIFAR-10 rows use the lossy JPEG q75 copy (see each run's config.json notes)."]
    return "\n".join(lines) + "\n"


def resumed_rows(
    parser: argparse.ArgumentParser, args: argparse.Namespace, machine: str
) -> list[dict[str, Any]]:
    """The finished rows of the benchmark run in ``args.resume``, after checking that it was started on this
    machine with these arguments (``parser.error`` naming the difference otherwise)."""
    folder = Path(args.resume)
    if not (folder / "arguments.json").is_file():
        parser.error(f"--resume {folder}: no arguments.json there; give the folder of a time-to-accuracy run")
    started = read_json(folder / "arguments.json")
    if started.get("machine") != machine:
        parser.error(
            f"--resume {folder}: started on {started.get('machine')!r}, this is {machine!r}; wall-clock figures "
            "from two machines do not add up: start a new run"
        )
    for key in SAME_ARGS:
        if started.get(key) != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            parser.error(
                f"--resume {folder}: {flag} is {getattr(args, key)!r} here but the run was started with "
                f"{started.get(key)!r}; resume with the same arguments"
            )
    result = folder / "time_to_accuracy.json"
    return list(read_json(result)["rows"]) if result.is_file() else []


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
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the killed benchmark run in DIR (same arguments)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cells = [tuple(cell.strip().split(":")) for cell in args.cells.split(",")]
    for cell in cells:
        if len(cell) != 2 or cell[1] not in SEED_CLAIMS or cell[0] not in SEED_CLAIMS[cell[1]]:
            parser.error(
                f"--cells: {':'.join(cell)!r} is no seed cell (dataset:model); models {list(SEED_CLAIMS)}, "
                "datasets mnist, fashion_mnist, cifar10"
            )
    rows: list[dict[str, Any]] = []
    if args.resume is None:
        args.out = str(Path(args.out) / time.strftime("%Y%m%d-%H%M%S"))  # a new run in its own folder
        write_json(Path(args.out) / "arguments.json", {"machine": machine, **vars(args)})
    else:
        args.out = args.resume
        rows = resumed_rows(parser, args, machine)
    done = {(r["model"], r["dataset"], r["recipe"]) for r in rows}
    for dataset_name, model in cells:
        for recipe in args.recipes.split(","):
            if (model, dataset_name, recipe) in done:
                continue
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
