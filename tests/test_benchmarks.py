"""The benchmark scripts run end to end at tiny settings on real data (their figures are made by hand on a
quiet machine; these tests keep the scripts from rotting and check what they compute, not their speed)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from xailab import TrainConfig, train

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The benchmark ``benchmarks/<name>.py`` imported as a module (its folder on the path, as when run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, shared_data_dir) -> Path:
    """A briefly trained mnist_cnn run (512 images, one epoch): what the interleaved benchmarks load."""
    cfg = TrainConfig(
        model="mnist_cnn", dataset="mnist", epochs=1, train_limit=512, data_dir=str(shared_data_dir)
    )
    return train(cfg, out_dir=tmp_path_factory.mktemp("runs"), progress=False).path


def test_ig_ab_prints_the_ratio_and_maps_equal_to_captums(mnist_run, shared_data_dir, monkeypatch, capsys):
    bench = script("ig_ab", monkeypatch)
    argv = ["ig_ab", "--data-dir", str(shared_data_dir), "--mnist-run", str(mnist_run)]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--n", "3", "--steps", "8", "--rounds", "2", "--peer-batch", "8"]
    )
    bench.main()
    out = capsys.readouterr().out
    ratio = re.search(r"captum time / xailab time: median ([\d.]+)x, fastest ([\d.]+)x", out)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0, out
    diff = re.search(r"max \|xailab - captum\| = (\S+) \(map max (\S+)\)", out)
    assert diff and float(diff.group(1)) <= 1e-5 * float(diff.group(2)), out  # the same maps


def test_limit_ab_prints_each_method_against_its_bare_forwards(
    mnist_run, shared_data_dir, monkeypatch, capsys
):
    bench = script("limit_ab", monkeypatch)
    argv = ["limit_ab", "--data-dir", str(shared_data_dir), "--mnist-run", str(mnist_run), "--n", "2"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--rounds", "1", "--batches", "16", "--methods", "occlusion", "lime"]
    )
    bench.main()
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^(\w+)\s+xailab / fastest bare forwards: median ([\d.]+)", out, re.M))
    assert set(ratios) == {"occlusion", "lime"} and all(float(r) > 0 for r in ratios.values()), out


def test_time_to_accuracy_stops_at_the_claim_and_records_a_miss(shared_data_dir, tmp_path, monkeypatch):
    """Claim 0 is reached after the first epoch (training stops there although 2 were budgeted); a claim above
    1 is never reached and the whole budget is run and written as a miss."""
    bench = script("time_to_accuracy", monkeypatch)
    monkeypatch.setitem(bench.SEED_CLAIMS, "efficient_cnn", {"mnist": 0.0, "fashion_mnist": 1.01})
    argv = ["--data-dir", str(shared_data_dir), "--cells", "mnist:efficient_cnn,fashion_mnist:efficient_cnn"]
    limits = ["--train-limit", "256", "--test-limit", "64", "--out", str(tmp_path)]
    assert bench.main([*argv, "--recipes", "xailab", "--xailab-epochs", "2", *limits]) == 0
    (result,) = tmp_path.glob("*/time_to_accuracy.json")
    hit, miss = json.loads(result.read_text())["rows"]
    assert hit["reached"] and hit["epochs"] == 1 and hit["epochs_run"] == 1 and hit["seconds"] > 0
    assert not miss["reached"] and miss["epochs"] is None and miss["epochs_run"] == 2
    assert 0 <= miss["best_test_accuracy"] <= 1 and len(miss["per_epoch"]) == 2
    assert (result.parent / "time_to_accuracy.md").read_text().count("\n|") >= 2
