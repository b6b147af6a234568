"""Fetching official dataset files: mirrors first, md5-verified, atomic; and the messages for when that fails."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from xailab.errors import DatasetError

_TIMEOUT_S = 30
_CHUNK = 1 << 20


class DownloadFailed(DatasetError):
    """No URL could deliver a file (offline, 404, server down); the message says where to put it by hand."""


def md5sum(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _join(base: str, filename: str) -> str:
    return base.rstrip("/") + "/" + filename


def _stream_to(url: str, path: Path) -> None:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(path, "wb") as out:
        while block := response.read(_CHUNK):
            out.write(block)


def fetch(filename: str, dest_dir: Path, md5: str, urls: Sequence[str]) -> Path:
    """Download ``filename`` into ``dest_dir`` from the first base URL in ``urls`` that serves it.

    Streams to a temporary file beside the target, checks its md5 and renames it into place, so the
    final name only ever holds a verified file. A checksum mismatch raises ``DatasetError`` (expected
    and actual md5); when every URL fails, ``DownloadFailed`` says where to put the file by hand.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    failures = []
    for base in urls:
        url = _join(base, filename)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _stream_to(url, tmp)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            failures.append(f"{url}: {exc}")
            continue
        actual = md5sum(tmp)
        if actual != md5:
            tmp.unlink(missing_ok=True)
            raise DatasetError(
                f"{filename} downloaded from {url} has md5 {actual}, expected {md5}: the file is corrupt "
                f"or not the official one. Nothing was saved to {dest_dir}; try again or use another mirror."
            )
        os.replace(tmp, target)
        return target
    raise DownloadFailed(
        f"could not download {filename}; tried:\n  " + "\n  ".join(failures or ["(no URLs given)"]) + "\n"
        f"Download it by hand from one of those URLs and put it in {dest_dir}"
    )


def missing_files_message(
    dataset: str, folder: Path, missing: Sequence[str], official_urls: Sequence[str], *, tried_download: bool
) -> str:
    """The message for files a loader needs but cannot find: which, exactly where to put them, from where."""
    lines = [f"{dataset}: missing {len(missing)} file(s) in {folder}:"]
    lines += [f"  {name}" for name in missing]
    lines.append(f"Put the official files in {folder}. They are published at:")
    lines += [f"  {base}" for base in official_urls]
    if tried_download:
        lines.append("Downloading them failed (offline?). Copy them there by hand, then run again.")
    else:
        lines.append(
            "Run with --dataset-option download=true (download=True in Python) to fetch and verify them, "
            "or set XAILAB_DATA_DIR (or pass --dataset-root) to point at a folder that already holds them."
        )
    return "\n".join(lines)


def ensure_files(
    dataset: str,
    folder: Path,
    files: Mapping[str, str],
    present: Sequence[str],
    *,
    download: bool,
    mirrors: Sequence[str],
    official_urls: Sequence[str],
) -> None:
    """Make sure every name in ``files`` (name -> md5) not in ``present`` exists in ``folder``.

    With ``download`` the missing ones are fetched (``mirrors`` first, then ``official_urls``); otherwise,
    or when fetching fails, raises ``DatasetError`` listing the missing files and where to put them.
    """
    missing = [name for name in files if name not in present]
    if not missing:
        return
    if download:
        try:
            for name in missing:
                fetch(name, folder, files[name], [*mirrors, *official_urls])
            return
        except DownloadFailed as exc:
            still = [name for name in missing if not (folder / name).exists()]
            raise DatasetError(
                missing_files_message(dataset, folder, still, official_urls, tried_download=True) + f"\n{exc}"
            ) from None
    raise DatasetError(missing_files_message(dataset, folder, missing, official_urls, tried_download=False))


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, ``..`` and links that leave ``dest``."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if (
                    Path(member.name).is_absolute()
                    or ".." in Path(member.name).parts
                    or dest
                    not in (
                        target,
                        *target.parents,
                    )
                ):
                    raise DatasetError(
                        f"{archive} contains an unsafe path {member.name!r} (absolute or '..'); refusing to "
                        "extract it. Delete the archive and download the official one."
                    )
                if not (member.isfile() or member.isdir()):
                    raise DatasetError(
                        f"{archive} contains {member.name!r}, which is not a plain file or folder; refusing "
                        "to extract it. Delete the archive and download the official one."
                    )
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(
            f"{archive} is not a readable tar archive ({exc}). Delete it and run with "
            "--dataset-option download=true."
        ) from None


def file_status(folder: Path, files: Mapping[str, str | None]) -> dict:
    """Which of ``files`` (name -> md5, or None when unknown) are in ``folder``, and whether they verify.

    ``verified`` is False if any present file's md5 differs, True if all are present and match, else None.
    """
    missing = [name for name in files if not (folder / name).is_file()]
    checks = [md5sum(folder / name) == md5 for name, md5 in files.items() if md5 and name not in missing]
    if not all(checks):
        verified: bool | None = False
    elif not missing and len(checks) == len(files):
        verified = True
    else:
        verified = None
    return {
        "folder": str(folder),
        "found": len(missing) < len(files),
        "missing": missing,
        "verified": verified,
    }
