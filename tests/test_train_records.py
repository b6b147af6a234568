"""Run folders as typed, validated records; bounded configs; divergence; folder locks; crash leftovers."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xailab import TrainConfig, load_dataset, load_run, train
from xailab.config import Bounds, bounded, from_dict
from xailab.errors import CheckpointError, ConfigError, LockedError, TrainingDiverged
from xailab.io import folder_lock, remove_orphans, write_json
from xailab.train.loop import is_better
from xailab.train.runs import DatasetInfo, ModelInfo, RunMeta, SplitSizes, list_runs, read_run_meta


def small(**kw) -> TrainConfig:
    base = dict(
        model="mnist_cnn", dataset="digits", epochs=1, batch_size=64, precision="fp32", train_limit=128
    )
    return TrainConfig(**{**base, **kw})


def meta_dict() -> dict:
    meta = RunMeta(
        status="finished",
        created="2026-01-01T00:00:00+00:00",
        config_hash="abc",
        train=small(),
        dataset=DatasetInfo(
            name="digits",
            class_names=tuple("0123456789"),
            mean=(0.3,),
            std=(0.4,),
            image_size=(28, 28),
            channels=1,
            sizes=SplitSizes(128, 10, 10),
        ),
        model=ModelInfo(name="mnist_cnn", parameters=10, macs=100),
    )
    return meta.to_dict()


def test_run_meta_round_trips_through_json(tmp_path):
    data = meta_dict()
    write_json(tmp_path / "config.json", data)
    meta = read_run_meta(tmp_path)
    assert json.loads(json.dumps(meta.to_dict())) == json.loads(json.dumps(data)) and meta.version == 1
    assert meta.dataset.image_size == (28, 28) and meta.train == small()


def test_a_folder_written_before_versions_still_loads(tmp_path):
    data = meta_dict()
    del data["version"]
    write_json(tmp_path / "config.json", data)
    assert read_run_meta(tmp_path).version == 1


HOSTILE = [
    ("dataset.channels", lambda d: d["dataset"].update(channels=-3), "-3"),
    ("dataset.image_size", lambda d: d["dataset"].update(image_size=[100000, 100000]), "100000"),
    ("dataset.mean", lambda d: d["dataset"].update(mean=["abc"]), "abc"),
    ("missing required key(s) dataset", lambda d: d.pop("dataset"), ""),
    ("dataset.sizes.train", lambda d: d["dataset"]["sizes"].update(train=-5), "-5"),
    ("missing required key(s) model, dataset", lambda d: d.update(train={}), ""),
    ("dataset.mean", lambda d: d["dataset"].update(mean=[0.1, 0.2]), "one per channel"),
    ("status", lambda d: d.update(status="done"), "done"),
    ("version", lambda d: d.update(version=7), "7"),
]


@pytest.mark.parametrize(("field", "corrupt", "value"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_config_json_is_a_config_error_naming_file_field_and_value(tmp_path, field, corrupt, value):
    data = meta_dict()
    corrupt(data)
    write_json(tmp_path / "config.json", data)
    with pytest.raises(ConfigError) as e:
        read_run_meta(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "config.json") in message and field in message and value in message
    with pytest.raises(ConfigError):
        load_run(tmp_path)  # never reaches the model or a huge allocation
    # Listed as broken, with why; the other runs are unaffected.
    write_json(tmp_path / "ok" / "config.json", meta_dict())
    rows = {r["run"]: r for r in list_runs(tmp_path)}
    assert rows["."]["status"] == "broken" and field in rows["."]["error"]
    assert rows["ok"]["status"] == "finished" and rows["ok"]["model"] == "mnist_cnn"


def test_corrupt_config_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_run_meta(tmp_path)
    assert list_runs(tmp_path)[0]["status"] == "broken"


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    ),
    st.sampled_from(["dataset", "model", "train", "status", "environment", "sizes", "mean"]),
)
def test_any_json_value_in_any_field_is_a_config_error_or_valid(junk, key):
    data = meta_dict()
    if key in ("sizes", "mean"):
        data["dataset"][key] = junk
    else:
        data[key] = junk
    try:
        RunMeta.from_dict(data, where="config.json:")
    except ConfigError as e:
        assert str(e).startswith("config.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 0}, r"train.image_size: 0 is out of range; valid: in \[8, 2048\]"),
        ({"image_size": 1}, r"train.image_size: 1 is out of range"),
        ({"image_size": 100000}, r"train.image_size: 100000"),
        ({"eval_batch_size": 0}, r"train.eval_batch_size: 0 is out of range; valid: in \[1, "),
        ({"weight_decay": -0.1}, r"train.weight_decay: -0.1 is out of range; valid: >= 0"),
        ({"momentum": 1.0}, r"train.momentum: 1.0 is out of range; valid: in \[0, 1\)"),
        ({"momentum": -0.5}, r"train.momentum: -0.5"),
        ({"lr": math.nan}, r"train.lr: nan is out of range; valid: > 0"),
        ({"channels": 2}, r"train.channels: 2 is out of range; valid: one of 1, 3"),
        ({"epochs": "3"}, r"train.epochs: expected int, got '3'"),
    ],
)
def test_train_config_bounds_name_the_field_the_value_and_the_range(change, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone: no warning about a rate that is not one (nan)
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "digits", **change})
    with pytest.raises(ConfigError, match=message.split(":")[0]):
        TrainConfig(model="mnist_cnn", dataset="digits", **change)


def test_bounds_helpers():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Form:
        n: int = bounded(4, low=1, high=10, help="how many")
        p: float = bounded(0.5, low=0, high=1, low_open=True)
        sizes: tuple[int, ...] = bounded((1,), low=1)

    assert from_dict(Form, {"n": 10, "p": 1, "sizes": [2, 3]}) == Form(10, 1.0, (2, 3))
    with pytest.raises(ConfigError, match=r"form.n: 11 is out of range; valid: in \[1, 10\]"):
        from_dict(Form, {"n": 11}, where="form")
    with pytest.raises(ConfigError, match=r"form.p: 0.0 is out of range; valid: in \(0, 1\]"):
        from_dict(Form, {"p": 0}, where="form")
    with pytest.raises(ConfigError, match=r"form.sizes: \(2, 0\) is out of range; valid: >= 1"):
        from_dict(Form, {"sizes": [2, 0]}, where="form")
    assert Bounds(low=0).contains(None) and not Bounds(low=0).contains(math.inf)
    assert not Bounds(low=0).contains(True)  # a bool is no number


def test_is_better_is_strict():
    assert is_better(1.0, None, "min") and is_better(0.5, 1.0, "min") and not is_better(1.0, 1.0, "min")
    assert is_better(2.0, 1.0, "max") and not is_better(1.0, 1.0, "max")


def test_a_huge_learning_rate_stops_as_diverged_and_says_what_is_true(tmp_path, digits):
    with pytest.raises(TrainingDiverged) as e:
        train(small(lr=1e6, optimizer="sgd"), out_dir=tmp_path, name="d", dataset=digits, progress=False)
    message = str(e.value)
    assert (
        "epoch 1" in message and "no epoch had finished" in message and "checkpoint of epoch" not in message
    )
    assert "fp32" not in message  # the run already was fp32
    assert json.loads((tmp_path / "d" / "config.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "d" / "checkpoint.safetensors").exists()


def test_a_model_too_big_for_the_images_is_a_config_error(tmp_path):
    tiny = load_dataset("digits")  # 8x8: efficient_cnn's poolings leave nothing
    with pytest.raises(ConfigError, match="cannot take 1x8x8 inputs"):
        train(small(model="efficient_cnn"), out_dir=tmp_path, dataset=tiny, progress=False)
    assert not (tmp_path / "efficient_cnn__digits").exists()  # the lock created the folder, and removed it


def test_a_locked_run_folder_refuses_a_second_trainer(tmp_path, digits):
    with folder_lock(tmp_path / "r", "run folder"), pytest.raises(LockedError) as e:
        train(small(), out_dir=tmp_path, name="r", dataset=digits, progress=False)
    assert str(tmp_path / "r") in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    # Released at the end of the block (and by the kernel when a process dies): training proceeds.
    run = train(small(), out_dir=tmp_path, name="r", dataset=digits, progress=False)
    assert not (run.path / ".xailab.lock").exists()  # removed on release


def test_resume_removes_the_temp_files_of_killed_writes(tmp_path, digits):
    train(small(), out_dir=tmp_path, name="r", dataset=digits, progress=False)
    leftovers = [tmp_path / "r" / ".checkpoint.safetensors.x1y2.tmp", tmp_path / "r" / ".tmpab12cd"]
    for p in leftovers:
        p.write_bytes(b"\0" * 1000)
    train(small(epochs=2), out_dir=tmp_path, name="r", dataset=digits, progress=False, resume=True)
    assert not any(p.exists() for p in leftovers)
    assert (tmp_path / "r" / "model.safetensors").is_file()
    assert remove_orphans(tmp_path / "missing") == []


def test_atomic_writes_fsync_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    write_json(tmp_path / "a.json", {"x": 1})
    assert events == ["fsync", "rename", "fsync"]  # the file, the rename, then the folder
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_locked_study_folder_refuses_a_second_run(tmp_path):
    from study_helpers import tiny
    from xailab.study import run_study, spec_from_dict

    spec = spec_from_dict(tiny(name="locked"))
    with folder_lock(tmp_path / "locked", "study folder"), pytest.raises(LockedError, match="study folder"):
        run_study(spec, out=tmp_path, progress=False)
    assert not (tmp_path / "locked" / "study.json").exists()  # nothing written while it was held


def test_a_cell_record_is_validated_and_a_broken_one_is_redone(tmp_path):
    from study_helpers import tiny
    from xailab.records import CellRecord, read_cell_record
    from xailab.study import expand_cells, spec_from_dict
    from xailab.study.runner import cell_key, finished_record

    spec = spec_from_dict(tiny())
    cell = expand_cells(spec)[0]
    record = CellRecord(
        cell=cell.name,
        cell_key=cell_key(spec, cell),
        model=cell.model,
        dataset=cell.dataset,
        image_size=(16, 16),
        test={"accuracy": 0.5},
        sections={"quality": {"saliency": {}}, "shortcut": {"x": 1}},
    )
    record.write(tmp_path)
    data = json.loads((tmp_path / "record.json").read_text())
    assert data["quality"] == {"saliency": {}} and data["shortcut"] == {"x": 1} and "sections" not in data
    again = finished_record(spec, cell, tmp_path)
    assert again == read_cell_record(tmp_path / "record.json") and again.accuracy == 0.5
    data["parameters"] = -1  # hand-edited: the cell is redone rather than reported
    write_json(tmp_path / "record.json", data)
    with pytest.raises(ConfigError, match=r"record.json: parameters: -1 is out of range"):
        read_cell_record(tmp_path / "record.json")
    assert finished_record(spec, cell, tmp_path) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../escape"}, r"train name: '\.\./escape' cannot be a folder name"),
        ({"name": "a/b"}, r"train name: 'a/b' cannot be a folder name"),
        ({"config": {"dataset_options": {"csvv": "x"}}}, r"train\.dataset_options.*'csvv'"),
        ({"config": {"device": "tpu"}}, r"tpu"),
    ],
)
def test_api_train_checks_name_device_and_dataset_options_before_any_folder(tmp_path, kwargs, message):
    """The Python API checks what the CLI checks, before a run folder (or a lock file) exists."""
    config = {"model": "mnist_cnn", "dataset": "digits", "epochs": 1, **kwargs.get("config", {})}
    with pytest.raises(ConfigError, match=message):
        train(config, out_dir=tmp_path / "runs", name=kwargs.get("name"), progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()
