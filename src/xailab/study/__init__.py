"""Studies: a grid of cells (model x dataset [x model options]) trained, explained and assessed, then
consolidated into one report. ``run_study("quick")`` is the main job; ``STUDIES`` lists the bundled
study files (``studies/*.yaml``), so adding one is dropping a file there.
"""

from __future__ import annotations

import functools
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xailab.device import cpu_name, resolve_device
from xailab.errors import ConfigError
from xailab.io import folder_lock, remove_orphans, write_json
from xailab.registry import Registry
from xailab.study.executors import EXECUTORS
from xailab.study.runner import Cell, CellTask, cell_key, check_methods_apply, expand_cells, run_cell
from xailab.study.spec import StudySpec, read_study, spec_from_dict
from xailab.study.tracking import TRACKERS

__all__ = [
    "EXECUTORS",
    "STUDIES",
    "TRACKERS",
    "Cell",
    "CellTask",
    "StudySpec",
    "cell_key",
    "expand_cells",
    "list_studies",
    "load_study",
    "read_study",
    "run_cell",
    "run_study",
    "spec_from_dict",
]

STUDIES: Registry[Callable[[], StudySpec]] = Registry("study")
STUDY_DIR = Path(str(resources.files("xailab.study") / "studies"))
for _file in sorted(STUDY_DIR.glob("*.yaml")):
    STUDIES.register(_file.stem)(functools.partial(read_study, _file))


def list_studies() -> list[str]:
    """Names of the bundled studies (``xailab run NAME``)."""
    return STUDIES.names()


def load_study(study: str | Path | StudySpec) -> StudySpec:
    """A validated study: a ``StudySpec`` as is, a ``.yaml``/``.yml``/``.toml`` file, or a bundled name."""
    if isinstance(study, StudySpec):
        return study
    path = Path(study)
    if path.suffix in (".yaml", ".yml", ".toml") or path.is_file():
        return read_study(path)
    return STUDIES.get(str(study))()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def study_environment() -> dict[str, Any]:
    """Versions, platform and compute device of this process, for the report's reproducibility section."""
    device = resolve_device("auto")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "xailab": _version("xailab"),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
    }


def default_command(
    name: str, out: str | Path, executor: str, tracking: str | None, data_dir: str | None
) -> str:
    """The ``xailab run`` command line that repeats a study run with these settings."""
    args = ["xailab", "run", name, "--out", str(out)]
    if executor != "local":
        args += ["--executor", executor]
    if tracking:
        args += ["--tracking", tracking]
    if data_dir:
        args += ["--data-dir", str(data_dir)]
    return shlex.join(args)


def run_study(
    study: str | Path | StudySpec = "quick",
    out: str | Path = "runs",
    executor: str = "local",
    address: str | None = None,
    tracking: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    command: str | None = None,
    redo: Sequence[str] = (),
) -> Path:
    """Run every cell of ``study`` into ``<out>/<study name>/`` and write the report there; returns the path
    of ``report.html``.

    Finished cells (same recipe and settings) are skipped, a killed one resumes from its last checkpoint.
    The study folder is locked while it runs: a second process on it gets a ``LockedError``.
    ``executor``: ``local`` or ``ray`` (``address`` of an existing cluster, else a local one);
    ``tracking``: ``mlflow`` (``tracking_uri``, default a file store ``<out>/mlruns``); ``callbacks``: training
    callbacks of every cell (local executor). ``redo``: cells (by name) whose folders are deleted first, so
    they are trained and assessed again — after their recipe was changed on purpose, for instance.
    """
    from xailab.report import build_report  # report reads records only; imported here to keep layers clear

    spec = load_study(study)
    run_executor = EXECUTORS.get(executor)
    cells = expand_cells(spec, data_dir)
    check_methods_apply(spec, cells)  # a method that applies to no model fails now, not after training
    names = [c.name for c in cells]
    unknown = [r for r in redo if r not in names]
    if unknown:
        raise ConfigError(
            f"redo: {', '.join(map(repr, unknown))} not a cell of {spec.name}; its cells: {', '.join(names)}"
        )
    study_dir = Path(out) / spec.name
    with folder_lock(study_dir, "study folder"):  # a second `xailab run` on it stops with a clear error
        remove_orphans(study_dir)
        for name in dict.fromkeys(redo):
            shutil.rmtree(study_dir / name, ignore_errors=True)
        write_json(
            study_dir / "study.json",
            {
                "spec": spec.to_dict(),
                "cells": [c.name for c in cells],
                "command": command or default_command(spec.name, out, executor, tracking, data_dir),
                "executor": executor,
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "environment": study_environment(),
            },
        )
        tracker = TRACKERS.get(tracking)(study_dir, tracking_uri) if tracking else None
        if tracker is not None:
            tracker.on_study_begin(spec, cells)
        show = progress and sys.stderr.isatty()
        bar = tqdm(total=len(cells), desc=f"study {spec.name}", unit="cell", position=0, disable=not show)
        t0 = time.perf_counter()
        done = [0]  # cells reported so far (a disabled tqdm bar does not count)

        def on_result(record: dict[str, Any]) -> None:
            bar.update(1)
            done[0] += 1
            state = (
                "already done"
                if record.get("skipped")
                else f"{time.perf_counter() - t0:.0f} s into the study"
            )
            accuracy = record.get("test", {}).get("accuracy")
            line = f"[{done[0]}/{len(cells)}] {record['cell']}: test accuracy {accuracy:.4f} ({state})"
            if show:
                bar.write(line, file=sys.stderr)  # above the bars, which stay at the bottom
            elif progress:
                print(line, file=sys.stderr)
            if tracker is not None:
                tracker.on_cell_end(record)

        tasks = [CellTask(spec, c, str(study_dir), progress, tuple(callbacks)) for c in cells]
        try:
            run_executor(tasks, on_result, address)
            report = build_report(study_dir)
        except BaseException:
            if tracker is not None:
                tracker.on_study_failed()
            raise
        finally:
            bar.close()
        if tracker is not None:
            tracker.on_study_end(report)
        return report
