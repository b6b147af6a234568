"""The Ray executor: a tiny study on a local Ray instance started here gives the same records as the local
executor."""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import load_file

from study_helpers import ensemble_study, tiny
from xailab.io import read_json
from xailab.study import run_study, spec_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")  # Ray workers run one thread per task, so do we


SPEC = tiny(name="tiny-ray", train={**tiny()["train"], "epochs": 1})
COMPARED = ("test", "history_losses", "quality", "agreement", "sanity", "misclassified", "parameters", "macs")


def comparable(record: dict) -> dict:
    """A record without what legitimately differs between runs (timings, the run's own paths)."""
    out = {k: record[k] for k in COMPARED if k in record}
    out["history_losses"] = [(r["train_loss"], r["val_loss"], r["val_accuracy"]) for r in record["history"]]
    return out


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_matches_local(tmp_path, local_ray):
    spec = spec_from_dict(SPEC)
    on_ray = run_study(spec, out=tmp_path / "ray", executor="ray", progress=False).parent
    assert ray.is_initialized()  # an instance the caller started is left running for the caller
    local = run_study(spec, out=tmp_path / "local", executor="local", progress=False).parent
    assert read_json(on_ray / "study.json")["executor"] == "ray"
    cells = read_json(local / "study.json")["cells"]
    assert len(cells) == 2
    for cell in cells:
        a, b = read_json(on_ray / cell / "record.json"), read_json(local / cell / "record.json")
        assert comparable(a) == comparable(b)
        wa, wb = (
            load_file(str(on_ray / cell / "model.safetensors")),
            load_file(str(local / cell / "model.safetensors")),
        )
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
        ma = load_file(str(on_ray / cell / "explanations.safetensors"))
        mb = load_file(str(local / cell / "explanations.safetensors"))
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=0)
    assert (on_ray / "report.html").is_file()


def test_ray_trains_a_cell_after_the_cells_whose_weights_it_starts_from(tmp_path, local_ray):
    # the two members run side by side (two CPUs); the ensemble, which reads their model.safetensors, after them
    spec = spec_from_dict(ensemble_study(name="members-ray"))
    study = run_study(spec, out=tmp_path, executor="ray", progress=False).parent
    meta = read_json(study / "transfer_ensemble__digits" / "config.json")
    assert meta["status"] == "finished"
    assert meta["model"]["weights_source"].startswith("mobilenetv2_imagenet=xailab run:")
    assert all((study / c / "record.json").is_file() for c in read_json(study / "study.json")["cells"])
