"""Data-parallel training (DDP) with two CPU processes on gloo: parity with one process, rank-0-only writes,
resume across a changed world size, and ``xailab train --devices N``.

One module fixture does all the training (process start-up dominates the cost): in-process single runs and
one ``torch.multiprocessing`` spawn of two ranks, described by the variables torchrun sets, running three jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import StopAfter
from xailab import TrainConfig, load_dataset, train
from xailab.cli import main as cli_main
from xailab.errors import ConfigError
from xailab.io import read_json
from xailab.train import distributed

# 359 test digits at ~95% accuracy: one accuracy has a standard error of sqrt(.95 * .05 / 359) = 0.012, the
# difference of two independent ones 0.016, so 0.05 is three standard errors. The runs compared share
# initialisation and data order, so they differ less: only BatchNorm's per-rank batch statistics (32 images
# instead of 64), the dropout masks and the order of floating-point sums differ.
ACCURACY_TOLERANCE = 0.05
RUN_FILES = {
    "config.json",
    "model.safetensors",
    "checkpoint.safetensors",
    "history.csv",
    "history.json",
    "metrics.json",
    "predictions.csv",
}


def recipe() -> TrainConfig:
    """A tiny recipe: mnist_cnn on 8x8 digits, global batch 64, two epochs, exact fp32."""
    return TrainConfig(
        model="mnist_cnn",
        dataset="digits",
        image_size=8,
        epochs=2,
        batch_size=64,
        lr=3e-3,
        schedule="onecycle",
        precision="fp32",
        seed=0,
    )


def _free_ports(n: int) -> list[int]:
    """``n`` free ports below Linux's ephemeral range (32768-60999). A port the OS hands out (bind to 0) can be
    given again as the ephemeral source port of a later connection, and a rank connecting to a rendezvous
    port that is its own source port connects to itself and waits forever (seen once in the full suite)."""
    rng = random.Random(os.getpid())
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _rank_worker(rank: int, world_size: int, ports: list[int], out: str) -> None:
    """One rank, described by the variables torchrun would set: trains ``ddp_full``, a killed ``ddp_half``,
    resumes the one-process ``single_half``, and records the files it wrote."""
    torch.set_num_threads(1)
    root = Path(out) / "runs"
    renames: list[str] = []

    def audit(event: str, args: tuple) -> None:  # every atomic write ends in os.replace -> "os.rename"
        if event == "os.rename" and str(args[1]).startswith(str(root)):
            renames.append(Path(args[1]).name)

    sys.addaudithook(audit)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size, "MASTER_ADDR": "127.0.0.1"}
    os.environ.update({k: str(v) for k, v in env.items()})
    groups = iter(ports)  # each train() call forms and ends its own process group

    def next_group() -> None:
        os.environ["MASTER_PORT"] = str(next(groups))

    next_group()
    with distributed.process_group(torch.device("cpu")) as ctx:
        roundtrip = distributed.gather_shards(distributed.shard(torch.arange(7.0)[:, None], ctx), 7, ctx)
    ds = load_dataset("digits", image_size=8)
    next_group()
    run = train(recipe(), out_dir=root, name="ddp_full", dataset=ds, progress=False)
    next_group()
    with contextlib.suppress(KeyboardInterrupt):
        train(recipe(), out_dir=root, name="ddp_half", dataset=ds, progress=False, callbacks=[StopAfter(1)])
    next_group()
    train(recipe(), out_dir=root, name="single_half", dataset=ds, progress=False, resume=True)
    record = {
        "renames": renames,
        "test_accuracy": run.metrics["test"]["accuracy"],
        "roundtrip": roundtrip[:, 0].tolist(),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    root = out / "runs"
    ds = load_dataset("digits", image_size=8)
    single = train(recipe(), out_dir=root, name="single_full", dataset=ds, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(
            recipe(), out_dir=root, name="single_half", dataset=ds, progress=False, callbacks=[StopAfter(1)]
        )
    mp.spawn(_rank_worker, args=(2, _free_ports(4), str(out)), nprocs=2, join=True)
    # The two processes' epoch-1 checkpoint, finished by one process.
    resumed_by_one = train(recipe(), out_dir=root, name="ddp_half", dataset=ds, progress=False, resume=True)
    ranks = [read_json(out / f"rank{r}.json") for r in range(2)]
    return {"root": root, "single": single, "ranks": ranks, "resumed_by_one": resumed_by_one}


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}


def test_two_processes_complete_and_match_one_process(runs):
    full = runs["root"] / "ddp_full"
    meta = read_json(full / "config.json")
    assert meta["status"] == "finished"
    assert meta["environment"]["world_size"] == 2 and meta["environment"]["backend"] == "gloo"
    assert len(read_json(full / "history.json")) == 2
    single = runs["single"].metrics["test"]["accuracy"]
    ddp = read_json(full / "metrics.json")["test"]["accuracy"]
    assert single > 0.9
    assert abs(ddp - single) <= ACCURACY_TOLERANCE, (ddp, single)
    # Every rank computed the same all-reduced metrics, and they are the ones rank 0 wrote.
    assert [r["test_accuracy"] for r in runs["ranks"]] == [ddp, ddp]
    # Same seed, same global permutation and augmentation: the data generator ends in the same state.
    ddp_rng = load_file(str(full / "checkpoint.safetensors"))["rng.data"]
    single_rng = load_file(str(runs["single"].path / "checkpoint.safetensors"))["rng.data"]
    assert torch.equal(ddp_rng, single_rng)


def test_only_rank_zero_writes_files(runs):
    rank0, rank1 = (set(r["renames"]) for r in runs["ranks"])
    assert rank1 == set()
    assert rank0 >= RUN_FILES
    assert {p.name for p in (runs["root"] / "ddp_full").iterdir()} == RUN_FILES


def test_shards_gather_back_in_order(runs):
    for r in runs["ranks"]:  # 7 rows over 2 ranks: shards of 4 and 3
        assert r["roundtrip"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_two_process_checkpoint_resumes_with_one_process(runs):
    resumed = runs["resumed_by_one"]
    full = read_json(runs["root"] / "ddp_full" / "history.json")
    assert len(resumed.history) == 2
    assert _numbers(resumed.history[0]) == pytest.approx(_numbers(full[0]), rel=1e-6)
    assert read_json(resumed.path / "config.json")["environment"]["world_size"] == 1
    acc = resumed.metrics["test"]["accuracy"]
    assert abs(acc - runs["single"].metrics["test"]["accuracy"]) <= ACCURACY_TOLERANCE
    rng = load_file(str(resumed.path / "checkpoint.safetensors"))["rng.data"]
    assert torch.equal(rng, load_file(str(runs["root"] / "ddp_full" / "checkpoint.safetensors"))["rng.data"])


def test_one_process_checkpoint_resumes_with_two(runs):
    half = runs["root"] / "single_half"
    meta = read_json(half / "config.json")
    assert meta["status"] == "finished" and meta["environment"]["world_size"] == 2
    history = read_json(half / "history.json")
    assert len(history) == 2
    assert _numbers(history[0]) == pytest.approx(_numbers(runs["single"].history[0]), rel=1e-6)
    acc = read_json(half / "metrics.json")["test"]["accuracy"]
    assert abs(acc - runs["single"].metrics["test"]["accuracy"]) <= ACCURACY_TOLERANCE


def test_cli_devices_relaunches_the_same_command_under_torchrun(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda argv, n: launched.append((argv, n)) or 7)
    argv = ["train", "--model", "mnist_cnn", "--dataset", "digits", "--devices", "2"]
    assert cli_main(argv) == 7  # the launcher's status, without training here
    assert launched == [(argv, 2)]
    # A rank sees torchrun's variables and goes on to train (here: stops at the missing --model) instead.
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.setenv(name, "0")
    assert cli_main(["train", "--dataset", "digits", "--devices", "2"]) == 2
    assert launched == [(argv, 2)]


def test_global_batch_must_split_evenly_over_ranks():
    three = distributed.DistributedContext(rank=0, world_size=3, backend="gloo")
    assert distributed.local_batch_size(63, three) == 21
    with pytest.raises(ConfigError, match=r"batch_size = 64.*divisible.*\(3\)"):
        distributed.local_batch_size(64, three)


def test_outside_a_launcher_nothing_is_distributed(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group(torch.device("cpu")) as ctx:
        assert ctx == distributed.SINGLE_PROCESS and ctx.is_main and not ctx.is_distributed
        x = torch.arange(5)
        assert distributed.shard(x, ctx) is x and distributed.gather_shards(x, 5, ctx) is x
    cmd = distributed.launch_command(["train", "--model", "m"], 4)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd == [*launcher, "-m", "xailab", "train", "--model", "m"]
