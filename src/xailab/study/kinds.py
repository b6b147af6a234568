"""Study kinds: how one cell of a study is run, chosen by the spec's ``kind``.

``grid`` (the default) trains, explains and assesses each cell (``runner.run_cell``); ``shortcut`` also
trains a control model without the planted marker and scores the explanations against the marker's mask
(``shortcut.run_shortcut_cell``). The executors call ``run_task``, so a new kind is one registration here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xailab.registry import Registry
from xailab.study.runner import CellTask, run_cell
from xailab.study.seed_outputs import run_keras_seed_cell
from xailab.study.shortcut import run_shortcut_cell

CELL_RUNNERS: Registry[Callable[[CellTask], dict[str, Any]]] = Registry("study kind")
CELL_RUNNERS.register("grid")(run_cell)
CELL_RUNNERS.register("shortcut")(run_shortcut_cell)
CELL_RUNNERS.register("keras_seed")(run_keras_seed_cell)  # a grid cell plus the Keras seed's out.csv


def run_task(task: CellTask) -> dict[str, Any]:
    """Run one cell the way its study's kind says; its record."""
    return CELL_RUNNERS.get(task.spec.kind)(task)
