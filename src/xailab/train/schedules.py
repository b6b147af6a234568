"""Learning-rate schedules as pure functions of the step, plus ReduceLROnPlateau as a tiny state machine.

Keeping them as plain numbers (not torch scheduler objects holding lambdas) makes the state JSON and
the resume exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def _cosine(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * min(1.0, pct)) + 1)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    ``onecycle``: cosine warm-up from 1/25 to 1 over ``warmup_steps`` (30% of the run if 0), then cosine
    annealing to 1/25/1e4 (Smith's one-cycle, step for step as ``torch.optim.lr_scheduler.OneCycleLR``).
    ``cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine to 0.
    ``plateau``/``constant``: 1 (plateau changes the rate between epochs, see ``Plateau``).
    """
    if schedule in ("plateau", "constant"):
        return 1.0
    if schedule == "onecycle":
        # Exactly torch.optim.lr_scheduler.OneCycleLR's two cosine phases (div 25, final div 1e4).
        start, end = 1 / 25, 1 / 25 / 1e4
        peak = (warmup_steps or 0.3 * total_steps) - 1
        if peak > 0 and step <= peak:
            return _cosine(start, 1.0, step / peak)
        return _cosine(1.0, end, (step - peak) / (total_steps - 1 - peak))
    if schedule == "cosine":
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Plateau:
    """ReduceLROnPlateau (the seeds' choice): scale the rate by ``factor`` after ``patience`` epochs without
    a relative improvement of 1e-4 in the monitored value. ``mode`` is ``min`` (loss) or ``max`` (accuracy)."""

    factor: float = 0.5
    patience: int = 2
    mode: str = "min"
    min_scale: float = 1e-4
    scale: float = 1.0
    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float) -> float:
        """Feed one epoch's monitored value; returns the new scale of the base learning rate."""
        better = self.best is None or (
            value < self.best * (1 - 1e-4) if self.mode == "min" else value > self.best * (1 + 1e-4)
        )
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.scale = max(self.min_scale, self.scale * self.factor)
                self.bad_epochs = 0
        return self.scale

    def state(self) -> dict:
        return asdict(self)
