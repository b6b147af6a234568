"""Durable file writes, folder locks and the digests that key resumable work.

Atomic writes: a crash (or a power loss) mid-write never leaves a half-written or empty file under the
final name. Folder locks: two processes never write the same run or study folder at once. Digests: a
killed job reuses a finished piece of work only when everything that decided it (weights, inputs,
parameters) is the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xailab.errors import LockedError

LOCK_FILE = ".xailab.lock"
# Temporary files a killed write leaves beside its target: ours (``.<name>.<random>.tmp``) and
# safetensors' own (``.tmp<random>`` inside ours, before its rename).
ORPHAN_PATTERNS = (".*.tmp", ".tmp*")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is fsynced before the rename and the folder after it, so after a power loss
    readers see the old file or the complete new one, never a renamed but empty one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:  # `write` may have replaced the file: sync what is there now
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files killed writes left directly in ``folder``; returns what was removed.

    Call it only while holding the folder's lock, so no live write of another process is in progress.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for pattern in ORPHAN_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file() and p.name != LOCK_FILE:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block.

    The lock is an ``fcntl`` lock on ``folder/.xailab.lock``, which the kernel releases when the process
    dies, so a killed run never leaves a stale lock; the file is removed on release, and a folder the lock
    created stays only if something was written into it. A second process gets a ``LockedError`` naming the
    folder and the holder's pid. ``what`` names the folder's kind in that message ("run folder", ...).
    """
    folder = Path(folder)
    created = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"the {what} {folder} is in use by another xailab process (pid {holder}); wait for it to "
                "finish, or use another name / --out"
            ) from None
        try:  # the holder may have removed the file as we opened it: then lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one holds a lock on a removed file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: keep it
                folder.rmdir()


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (any dtype, any device, any layout)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()
