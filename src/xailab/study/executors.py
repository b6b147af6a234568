"""Executors run a study's cells: ``local`` one after another in this process, ``ray`` as Ray tasks (one GPU
per cell where the cluster has GPUs). Both call ``run_task`` (``run_cell``, or the runner of the study's
kind) on the same ``CellTask``s, so the records are the same; ``on_result`` is called in this process as
each cell finishes (progress, tracking)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from xailab.registry import Registry
from xailab.study.kinds import run_task
from xailab.study.runner import CellTask, has_cell_references

OnResult = Callable[[dict[str, Any]], None]
EXECUTORS: Registry = Registry("executor")


@EXECUTORS.register("local")
def run_local(tasks: Sequence[CellTask], on_result: OnResult, address: str | None = None) -> list[dict]:
    """Run the cells one after another in this process (``address`` is not used)."""
    records = []
    for task in tasks:
        record = run_task(task)
        on_result(record)
        records.append(record)
    return records


@EXECUTORS.register("ray")
def run_ray(tasks: Sequence[CellTask], on_result: OnResult, address: str | None = None) -> list[dict]:
    """Run the cells as Ray tasks on the cluster at ``address`` (``auto``: the one this machine belongs to),
    on the Ray instance this process already started, or on a new local one, shut down afterwards.

    Each task asks for one GPU when the cluster has any, and one CPU; Ray runs it with one intra-op thread,
    so on the CPU its records equal those of a local run with ``torch.set_num_threads(1)`` bit for bit. The workers write the cells' folders themselves,
    so on a multi-node cluster the study's ``--out`` must be a path every node sees (a shared file system).
    Cells that start from another cell's weights (``"cell:<model>"`` options) run in a second wave, after the
    cells they refer to have finished.
    """
    import ray  # an optional extra: imported only when this executor is chosen

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(run_task)
        records: list[Any] = [None] * len(tasks)
        later = [has_cell_references(task.cell) for task in tasks]
        for wave in (False, True):
            refs = {
                remote.remote(_without_progress(task)): i for i, task in enumerate(tasks) if later[i] == wave
            }
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    record = ray.get(ref)
                    records[refs[ref]] = record
                    on_result(record)
        return records
    finally:
        if started_here:
            ray.shutdown()


def _without_progress(task: CellTask) -> CellTask:
    """The task with its progress bars off (a worker's stderr is not a terminal)."""
    return replace(task, progress=False)
