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


def test_time_to_accuracy_prints_the_seed_over_xailab_ratio_per_cell(monkeypatch):
    """Both reached: the ratio of their times; only xailab's: no finite ratio, and why the seed's ended; only
    the seed's: no ratio."""
    bench = script("time_to_accuracy", monkeypatch)

    def row(model: str, recipe: str, reached: bool, seconds: float, epochs: int) -> dict:
        return {
            "model": model, "dataset": "cifar10", "recipe": recipe, "target": 0.8, "reached": reached,
            "epochs": epochs if reached else None, "seconds": seconds if reached else None,
            "epochs_run": epochs, "seconds_run": seconds, "best_test_accuracy": 0.81 if reached else 0.65,
            "epoch_budget": 30, "data_notes": [],
        }  # fmt: skip

    rows = [
        row("resnet18", "xailab", True, 100.0, 4),
        row("resnet18", "seed", True, 250.0, 9),
        row("mobilenetv2", "xailab", True, 200.0, 14),
        row("mobilenetv2", "seed", False, 150.0, 12),
        row("efficient_cnn", "xailab", False, 300.0, 16),
        row("efficient_cnn", "seed", True, 400.0, 20),
    ]
    ratios = {r["model"]: r["ratio"] for r in bench.speedups(rows)}
    assert ratios == {
        "resnet18": "2.50x",
        "mobilenetv2": "only xailab's reaches it (the seed's stopped early)",
        "efficient_cnn": "-",
    }
    text = bench.markdown(rows, "a CPU")
    assert "| resnet18 | cifar10 | 4 epochs, 100 s | 9 epochs, 250 s | 2.50x |" in text
    assert "not reached: 12 epochs, 150 s run (best 0.6500)" in text
    assert bench.speedups(rows[:1]) == []  # one recipe only: nothing to compare
    spent = [rows[2], {**rows[3], "epochs_run": 30}]
    assert bench.speedups(spent)[0]["ratio"] == "only xailab's reaches it (the seed's budget ran out)"


def test_a_killed_time_to_accuracy_run_resumes_with_its_clock(shared_data_dir, tmp_path, monkeypatch, capsys):
    """Killed during the second cell: ``--resume`` keeps the first cell (not retrained), continues the second
    from its checkpoint with its clock (same per-epoch test accuracies as an uninterrupted run, timed seconds
    carried on), refuses other arguments, and restarts a cell whose clock is behind its checkpoint."""
    import shutil

    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")  # the same fixed settings in every process of the test
    bench = script("time_to_accuracy", monkeypatch)
    monkeypatch.setitem(
        bench.SEED_CLAIMS, "mobilenetv2", {"mnist": 1.01, "fashion_mnist": 1.01}
    )  # never reached
    args = ["--data-dir", str(shared_data_dir), "--recipes", "xailab", "--xailab-epochs", "3"]
    args += ["--train-limit", "256", "--test-limit", "64"]
    both = ["--cells", "mnist:mobilenetv2,fashion_mnist:mobilenetv2"]
    record = bench.TimeToAccuracy.on_epoch_end

    def killed_in_fashion_epoch_2(self, row):
        record(self, row)  # the clock is written, as after any epoch
        if "fashion" in str(self.run_dir) and row["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(bench.TimeToAccuracy, "on_epoch_end", killed_in_fashion_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*args, *both, "--out", str(tmp_path / "a")])
    monkeypatch.setattr(bench.TimeToAccuracy, "on_epoch_end", record)
    (folder,) = (tmp_path / "a").iterdir()
    fashion = folder / "mobilenetv2__fashion_mnist__xailab"
    before = json.loads((fashion / "clock.json").read_text())["rows"]
    assert [r["epoch"] for r in before] == [1, 2]
    behind = tmp_path / "behind"
    shutil.copytree(folder, behind)

    trained: list[str] = []
    real_train = bench.train
    monkeypatch.setattr(bench, "train", lambda *a, **k: trained.append(k["name"]) or real_train(*a, **k))
    assert bench.main([*args, *both, "--resume", str(folder)]) == 0
    assert trained == ["mobilenetv2__fashion_mnist__xailab"]  # the finished cell is kept as it was
    rows = json.loads((folder / "time_to_accuracy.json").read_text())["rows"]
    assert [r["dataset"] for r in rows] == ["mnist", "fashion_mnist"]
    after = rows[1]["per_epoch"]
    assert after[:2] == before and after[2]["epoch"] == 3 and after[2]["seconds"] > before[1]["seconds"]
    assert rows[1]["epochs_run"] == 3 and not rows[1]["reached"]

    fresh = ["--cells", "fashion_mnist:mobilenetv2", "--out", str(tmp_path / "b")]
    assert bench.main([*args, *fresh]) == 0
    (uninterrupted,) = (tmp_path / "b").glob("*/time_to_accuracy.json")
    expected = json.loads(uninterrupted.read_text())["rows"][0]["per_epoch"]
    assert [r["test_accuracy"] for r in after] == [r["test_accuracy"] for r in expected]

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        bench.main([*args[:-4], "--train-limit", "512", "--test-limit", "64", *both, "--resume", str(behind)])
    assert refused.value.code == 2
    assert "--train-limit is 512 here but the run was started with 256" in capsys.readouterr().err
    clock = behind / "mobilenetv2__fashion_mnist__xailab" / "clock.json"
    clock.write_text(json.dumps({"rows": json.loads(clock.read_text())["rows"][:1]}))  # behind its checkpoint
    assert bench.main([*args, *both, "--resume", str(behind)]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert len(list(behind.glob("mobilenetv2__fashion_mnist__xailab.interrupted-*"))) == 1
    restarted = json.loads((behind / "time_to_accuracy.json").read_text())["rows"][1]["per_epoch"]
    assert [r["test_accuracy"] for r in restarted] == [r["test_accuracy"] for r in expected]
