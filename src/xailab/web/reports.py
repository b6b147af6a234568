"""The studies' ``report.html`` pages under the runs folder, served safely: only from folders holding a
``report.html`` whose real location (after symlinks) stays inside the runs folder, only files of known
types, and never a path part that could climb out."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException

REPORT_FILE = "report.html"
REPORT_ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".css": "text/css",
    ".js": "text/javascript",
    ".json": "application/json",
    ".csv": "text/csv",
}


def find_reports(root: Path) -> dict[str, Path]:
    """Study name (its folder relative to ``root``) -> resolved folder, for every ``report.html`` under it
    whose real location (after symlinks) stays inside ``root``."""
    real_root = root.resolve()
    reports = {}
    for path in sorted(root.rglob(REPORT_FILE)) if root.is_dir() else []:
        real = path.resolve()
        if real.is_file() and real.is_relative_to(real_root):
            reports[path.parent.relative_to(root).as_posix()] = real.parent
    return reports


def report_file(root: Path, path: str) -> Path:
    """The file a ``/reports/<path>`` URL names: inside a report folder, of a known type; else a 404."""
    parts = path.split("/")
    missing = HTTPException(404, f"no report file {path!r}; list the reports at /api/reports")
    if any(part in ("", ".", "..") or part.startswith(".") or "\\" in part for part in parts):
        raise missing
    folders = find_reports(root)
    for name, folder in folders.items():
        prefix = [] if name == "." else name.split("/")
        if parts[: len(prefix)] != prefix or len(parts) == len(prefix):
            continue
        candidate = folder.joinpath(*parts[len(prefix) :]).resolve()  # parts already checked above
        if (
            candidate.is_relative_to(folder)
            and candidate.is_file()
            and candidate.suffix in REPORT_ASSET_TYPES
        ):
            return candidate
    raise missing
