"""Downloads against a real HTTP server on 127.0.0.1 serving the shared MNIST files."""

from __future__ import annotations

import functools
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xailab.data import dataset_status, fetch, load_dataset
from xailab.data.download import DownloadFailed, ensure_files, safe_extract
from xailab.data.idx import MNIST_MD5
from xailab.errors import DatasetError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass


def _free_dead_url() -> str:
    with socket.socket() as s:  # bind then close: nothing listens on this port afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def serve() -> Iterator:
    """``serve(folder) -> base URL`` of a real HTTP server on 127.0.0.1 for ``folder``; stopped afterwards."""
    servers = []

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_full_mnist_then_load(shared_data_dir, serve, tmp_path):
    url = serve(shared_data_dir / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, download=True, mirrors=[url])
    assert len(ds["train"]) == 60000 and len(ds["test"]) == 10000
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_MD5)
    assert dataset_status("mnist", data_dir=tmp_path)["verified"] is True


def test_fetch_checksum_mismatch_names_file_and_md5s(shared_data_dir, serve, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    name = "t10k-labels-idx1-ubyte.gz"
    data = bytearray((shared_data_dir / "mnist" / name).read_bytes())
    data[100] ^= 0xFF
    (served / name).write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(
        DatasetError, match=rf"{name} downloaded from .* has md5 \w+, expected {MNIST_MD5[name]}"
    ):
        fetch(name, dest, MNIST_MD5[name], [serve(served)])
    assert list(dest.iterdir()) == []  # neither the file nor a temporary part is left


def test_fetch_tries_mirrors_in_order(shared_data_dir, serve, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    name = "t10k-images-idx3-ubyte.gz"
    path = fetch(name, tmp_path / "dest", MNIST_MD5[name], [serve(empty), serve(shared_data_dir / "mnist")])
    assert path == tmp_path / "dest" / name and path.stat().st_size == 1_648_877


@pytest.mark.parametrize("server", ["404", "down"])
def test_offline_message_lists_files_folder_and_urls(serve, tmp_path, server):
    empty = tmp_path / "empty"
    empty.mkdir()
    url = serve(empty) if server == "404" else _free_dead_url()
    name = "train-labels-idx1-ubyte.gz"
    with pytest.raises(DownloadFailed, match=rf"could not download {name}"):
        fetch(name, tmp_path / "dest", MNIST_MD5[name], [url])
    dest = tmp_path / "mnist"
    with pytest.raises(DatasetError) as info:
        ensure_files("mnist", dest, MNIST_MD5, [], download=True, mirrors=[url], official_urls=[url])
    message = str(info.value)
    assert f"Put the official files in {dest}" in message and url in message
    assert all(n in message for n in MNIST_MD5) and "Downloading them failed" in message


def test_download_skips_files_already_present(shared_data_dir, serve, tmp_path):
    dest = tmp_path / "mnist"
    dest.mkdir()
    for name in MNIST_MD5:
        if "t10k" in name:
            shutil.copy(shared_data_dir / "mnist" / name, dest / name)
    url = serve(shared_data_dir / "mnist")
    ensure_files(
        "mnist",
        dest,
        MNIST_MD5,
        [n for n in MNIST_MD5 if "t10k" in n],
        download=True,
        mirrors=[url],
        official_urls=[],
    )
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_MD5)


def test_safe_extract_rejects_escaping_paths(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DatasetError, match=r"unsafe path '../escaped.txt'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
