"""Small duck-typed callbacks. A callback implements any of:

``on_train_begin(info)`` (info: epochs, run_dir, start_epoch, model), ``on_epoch_begin(epoch, steps)``,
``on_step_end(step, images)``, ``on_epoch_end(row)``, ``on_train_end(run)``; missing methods are skipped.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


def call(callbacks, hook: str, *args: Any) -> None:
    """Invoke ``hook`` on every callback that has it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


class ProgressBar:
    """One bar per epoch with images/s and ETA; prints the epoch's losses and accuracies when it ends.

    It never reads a device tensor inside the epoch, so it adds no host synchronisation per step.
    """

    def __init__(self, stream=None) -> None:
        self.stream = (
            stream or sys.stderr
        )  # looked up now, so redirected stderr (pytest, notebooks) is honoured
        self.bar: tqdm | None = None
        self.epochs = 0
        self.start = 0.0

    def on_train_begin(self, info: dict) -> None:
        self.epochs = info["epochs"]

    def on_epoch_begin(self, epoch: int, steps: int) -> None:
        self.bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="step",
            file=self.stream,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
            disable=not self.stream.isatty(),  # a log file gets the epoch lines only
        )
        self.start = time.perf_counter()
        self.images = 0

    def on_step_end(self, step: int, images: int) -> None:
        self.images += images
        if self.bar is not None:
            self.bar.update(1)
            elapsed = time.perf_counter() - self.start
            if elapsed > 0 and step % 10 == 0:
                self.bar.set_postfix_str(f"{self.images / elapsed:,.0f} img/s", refresh=False)

    def on_epoch_end(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        val = (
            f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
            if row.get("val_loss") is not None
            else ""
        )
        print(
            f"epoch {row['epoch']:>3}/{self.epochs}  loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"{val}  lr {row['lr']:.2e}  {row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s",
            file=self.stream,
        )
