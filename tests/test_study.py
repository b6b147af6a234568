"""Studies: spec validation, cell expansion, skipping finished cells, and resuming a study killed halfway."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from assess_helpers import ExplainCalls
from study_helpers import tiny
from xailab.cli import main
from xailab.errors import CheckpointError, ConfigError
from xailab.io import read_json
from xailab.models import create_model
from xailab.study import STUDIES, expand_cells, list_studies, load_study, run_study, runner, spec_from_dict
from xailab.study.runner import CellTask, cell_key, run_cell

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"modelz": ["keras_cnn"]},
            ["unknown key 'modelz'", "Did you mean 'models'", "Valid keys:", "datasets"],
        ),
        ({"models": ["keras_cnm"]}, ["models[0]", "Did you mean 'keras_cnn'"]),
        ({"datasets": ["digitz"]}, ["datasets[0]", "Did you mean 'digits'"]),
        ({"methods": ["saliency", "gradcan"]}, ["methods[1]", "Did you mean 'gradcam'"]),
        ({"metrics": ["sparsenes"]}, ["metrics[0]", "Did you mean 'sparseness'"]),
        ({"train": {"epochz": 3}}, ["train: unknown key 'epochz'", "Did you mean 'epochs'", "Valid keys:"]),
        ({"train": {"epochs": "three"}}, ["train.epochs", "expected int"]),
        ({"train": {"model": "resnet18"}}, ["train.model is set per cell"]),
        (
            {"option_grid": {"resnet18": {"stride": [1]}}},
            ["option_grid", "'resnet18' is not in the study", "keras_cnn"],
        ),
        ({"option_grid": {"keras_cnn": {"stride": 2}}}, ["option_grid.keras_cnn.stride", "non-empty list"]),
        ({"method_params": {"lime": {}}}, ["method_params", "'lime' is not in the study"]),
        ({"n_explain": 0}, ["n_explain must be at least 1"]),
        ({"dataset_roots": {"cifar10": "x"}}, ["dataset_roots", "'cifar10' is not in the study", "digits"]),
        ({"sanity_method": "lime"}, ["sanity_method 'lime' is not one of the study's methods"]),
        ({"models": []}, ["models: give at least one", "keras_cnn"]),
        ({"models": "keras_cnn", "n_gallery": "4"}, ["n_gallery: expected int"]),
        ({"model_train": {"resnet18": {"epochs": 2}}}, ["model_train", "'resnet18' is not in the study"]),
        ({"model_train": {"keras_cnn": {"epochz": 2}}}, ["model_train.keras_cnn: unknown key 'epochz'"]),
        ({"model_train": {"keras_cnn": {"epochs": "2"}}}, ["model_train.keras_cnn.epochs", "expected int"]),
        (
            {"model_train": {"keras_cnn": {"dataset": "mnist"}}},
            ["model_train.keras_cnn.dataset cannot be set"],
        ),
        (
            {"model_train": {"keras_cnn": {"model_options": {"stride": 2}}}},
            ["model_train.keras_cnn.model_options is not read", "model_options"],
        ),
        (
            {"dataset_train": {"mnist": {"epochs": 2}}},
            ["dataset_train", "'mnist' is not in the study", "digits"],
        ),
        ({"dataset_train": {"digits": {"lr": -1}}}, ["dataset_train.digits.lr"]),
        ({"dataset_train": {"digits": {"model": "mnist_cnn"}}}, ["dataset_train.digits.model cannot be set"]),
        (
            {"dataset_train": {"digits": {"dataset_root": "x"}}},
            ["dataset_train.digits.dataset_root is not read", "dataset_roots"],
        ),
        (
            {
                "model_train": {"keras_cnn": {"epochs": 5}},
                "dataset_train": {"digits": {"epochs": 2, "lr": 0.1}},
            },
            ["epochs set in both model_train.keras_cnn and dataset_train.digits", "set it in one of them"],
        ),
        (
            {"cell_train": {"keras_cnn__mnist": {"epochs": 2}}},
            ["cell_train", "'keras_cnn__mnist' is not in the study", "keras_cnn__digits"],
        ),
        ({"cell_train": {"keras_cnn__digits": {"epochs": 0}}}, ["cell_train.keras_cnn__digits.epochs"]),
        (
            {"cell_train": {"keras_cnn__digits": {"model": "x"}}},
            ["cell_train.keras_cnn__digits.model cannot"],
        ),
        (
            {"cell_train": {"keras_cnn__digits": {"model_options": {"stride": 2}}}},
            ["cell_train.keras_cnn__digits.model_options is not read", "model_options"],
        ),
        ({"cell_train": {"keras_cnn__digits": 16}}, ["cell_train.keras_cnn__digits: expected a mapping"]),
    ],
)
def test_bad_spec_names_the_key(changes, expected):
    with pytest.raises(ConfigError) as e:
        spec_from_dict(tiny(**changes), where="study tiny")
    for text in expected:
        assert text in str(e.value)


def test_model_train_replaces_the_shared_recipe_for_that_model_only():
    """A per-model budget (a ViT needs more epochs than a CNN): the other model's cells keep the shared
    recipe and their keys, so their finished records stay valid."""
    shared = tiny(models=["keras_cnn", "mnist_cnn"], option_grid={})
    per_model = tiny(
        models=["keras_cnn", "mnist_cnn"],
        option_grid={},
        model_train={"mnist_cnn": {"epochs": 5, "lr": 0.01}},
    )
    a, b = spec_from_dict(shared), spec_from_dict(per_model)
    cells_a, cells_b = expand_cells(a), expand_cells(b)
    assert [c.config.epochs for c in cells_b] == [3, 5] and cells_b[1].config.lr == 0.01
    assert cells_b[0].config == cells_a[0].config and cells_b[1].config.batch_size == 64  # the rest shared
    assert cell_key(b, cells_b[0]) == cell_key(a, cells_a[0])
    assert cell_key(b, cells_b[1]) != cell_key(a, cells_a[1])


def test_dataset_train_gives_one_dataset_its_budget_and_composes_with_model_train():
    """Digits converge in fewer epochs than CIFAR-10: a per-dataset budget for that dataset's cells only,
    with a model's own settings on top (different keys); the shared recipe's cells keep their keys."""
    shared = tiny(models=["keras_cnn", "mnist_cnn"], option_grid={})
    both = tiny(
        models=["keras_cnn", "mnist_cnn"],
        option_grid={},
        dataset_train={"digits": {"epochs": 2, "batch_size": 32}},
        model_train={"mnist_cnn": {"lr": 0.01}},
    )
    cells_a, cells_b = expand_cells(spec_from_dict(shared)), expand_cells(spec_from_dict(both))
    assert [c.config.epochs for c in cells_b] == [2, 2] and [c.config.batch_size for c in cells_b] == [32, 32]
    assert [c.config.lr for c in cells_b] == [0.003, 0.01]
    assert cells_b[0].config.train_limit == cells_a[0].config.train_limit == 256  # the rest shared
    assert cell_key(spec_from_dict(both), cells_b[0]) != cell_key(spec_from_dict(shared), cells_a[0])


def test_cell_train_gives_one_model_dataset_pair_its_budget_over_the_model_and_dataset_ones():
    """The seed grid's two Fashion-MNIST misses need 16 epochs, the other cells of the dataset and of those
    models do not: ``cell_train`` wins over ``model_train`` and ``dataset_train`` (no ambiguity: it is the
    most specific) for that pair only, and the other cells keep their configs and keys."""
    layered = tiny(
        models=["keras_cnn", "mnist_cnn"],
        option_grid={},
        dataset_train={"digits": {"epochs": 2}},
        model_train={"mnist_cnn": {"lr": 0.01}},
    )
    per_cell = {**layered, "cell_train": {"mnist_cnn__digits": {"epochs": 4, "lr": 0.02}}}
    a, b = spec_from_dict(layered), spec_from_dict(per_cell)
    cells_a, cells_b = expand_cells(a), expand_cells(b)
    assert [(c.config.epochs, c.config.lr) for c in cells_a] == [(2, 0.003), (2, 0.01)]
    assert [(c.config.epochs, c.config.lr) for c in cells_b] == [(2, 0.003), (4, 0.02)]
    assert cells_b[1].config.batch_size == cells_a[1].config.batch_size  # the rest of the layers kept
    assert cell_key(b, cells_b[0]) == cell_key(a, cells_a[0])  # the other cell's record stays valid
    assert cell_key(b, cells_b[1]) != cell_key(a, cells_a[1])


def test_study_file_errors_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("datasets: [digits]\nmodels: [keras_cnn]\nmethods: [saliency]\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key 'epochs'.*Valid keys"):
        load_study(path)
    path.write_text("datasets: [digits]\nmodels: [keras_cnn]\nmethods: [saliency]\n")
    assert load_study(path).name == "mine"  # the name defaults to the file's stem
    toml = tmp_path / "other.toml"
    toml.write_text('name = "t"\ndatasets = ["digits"]\nmodels = ["keras_cnn"]\nmethods = ["gradcam"]\n')
    assert load_study(toml).methods == ["gradcam"]


def test_unknown_study_name_suggests():
    with pytest.raises(Exception, match="Did you mean 'quick'"):
        load_study("quik")


# ---------------------------------------------------------------------------------------------------------
# Bundled studies and cell expansion
# ---------------------------------------------------------------------------------------------------------


def test_bundled_studies_validate_and_expand():
    assert list_studies() == sorted(
        [
            "quick",
            "seed-grid",
            "mnist-cnn",
            "cifar10-cnn",
            "kernel-stride",
            "chest-xray",
            "shortcut",
            "shortcut-chest-xray",
            "cnn-vs-vit",
        ]
    )
    expected = {
        "quick": ["keras_cnn__digits", "mnist_cnn__digits"],
        "seed-grid": [
            f"{m}__{d}"
            for d in ("mnist", "fashion_mnist", "cifar10")
            for m in ("mobilenetv2", "efficient_cnn", "resnet18")
        ],
        "mnist-cnn": ["mnist_cnn__mnist"],
        "shortcut": ["mnist_cnn__shortcut"],  # kind: shortcut, the control trains inside the cell
        "shortcut-chest-xray": ["mobilenetv2__shortcut"],
        "cifar10-cnn": ["simple_cnn__cifar10"],
        "kernel-stride": [f"keras_cnn-stride{s}-kernel_size{k}__cifar10" for s in (1, 2, 3) for k in (3, 4)],
        "chest-xray": [
            f"{m}__chest_xray" for m in ("transfer_ensemble", "mobilenetv2_imagenet", "densenet169")
        ],
        "cnn-vs-vit": [
            f"{m}__{d}" for d in ("cifar10", "mnist") for m in ("resnet18", "efficient_cnn", "vit_tiny")
        ],
    }
    for name in list_studies():
        spec = STUDIES.get(name)()
        cells = expand_cells(spec, data_dir="../shared/datasets")
        assert [c.name for c in cells] == expected[name], name
        assert all(c.config.data_dir == "../shared/datasets" for c in cells)
        assert len({cell_key(spec, c) for c in cells}) == len(cells)  # every cell its own key


def test_the_cpu_seed_grid_config_validates_and_reads_the_shared_cifar10_subset():
    spec = load_study(Path(__file__).parents[1] / "configs" / "seed-grid-cpu.yaml")
    cells = expand_cells(spec)
    assert len(cells) == 9 and all(c.config.train_limit == 4000 for c in cells)
    roots = {c.dataset: c.config.dataset_root for c in cells}
    assert roots == {"mnist": None, "fashion_mnist": None, "cifar10": "../shared/datasets/cifar10-subset"}


def test_dataset_roots_reach_their_cells_only():
    spec = spec_from_dict(
        tiny(datasets=["digits", "cifar10"], dataset_roots={"cifar10": "../shared/datasets/cifar10-subset"})
    )
    roots = {c.dataset: c.config.dataset_root for c in expand_cells(spec)}
    assert roots == {"digits": None, "cifar10": "../shared/datasets/cifar10-subset"}


def test_kernel_stride_cells_build_their_models():
    spec = load_study("kernel-stride")
    cells = expand_cells(spec)
    seen = set()
    for cell in cells:
        opts = cell.config.model_options
        assert opts["padding"] == "same"  # fixed option merged with the grid's
        seen.add((opts["stride"], opts["kernel_size"]))
        model = create_model("keras_cnn", in_channels=3, num_classes=10, **opts)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert model.block1.conv.stride == (opts["stride"],) * 2
        assert model.block1.conv.kernel_size == (opts["kernel_size"],) * 2
    assert seen == {(s, k) for s in (1, 2, 3) for k in (3, 4)}


def test_quick_study_is_offline_and_small():
    spec = load_study("quick")
    assert spec.datasets == ["digits"] and 2 <= len(spec.models) <= 3
    assert spec.sanity_method and spec.metrics


# ---------------------------------------------------------------------------------------------------------
# Running, skipping, resuming
# ---------------------------------------------------------------------------------------------------------


class InterruptSecondCell:
    """A training callback that raises KeyboardInterrupt (as Ctrl-C would) after epoch ``epoch`` of the
    second cell it sees, and records where each training started."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.cells: list[str] = []
        self.starts: dict[str, int] = {}

    def on_train_begin(self, info: dict) -> None:
        self.cells.append(info["run_dir"].name)
        self.starts[info["run_dir"].name] = info["start_epoch"]

    def on_epoch_end(self, row: dict) -> None:
        if self.epoch is not None and len(self.cells) == 2 and row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_killed_study_resumes_without_redoing_or_losing_work(tmp_path):
    spec = spec_from_dict(tiny())
    first, second = (c.name for c in expand_cells(spec))
    killer = InterruptSecondCell(epoch=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, out=tmp_path, callbacks=[killer], progress=False)
    study = tmp_path / "tiny"
    assert (study / first / "record.json").is_file()
    assert not (study / first / runner.PARTS_DIR).exists()  # the assessment's parts go with the record
    assert not (study / second / "record.json").is_file()
    assert read_json(study / second / "history.json")[-1]["epoch"] == 2  # two epochs checkpointed
    before = mtimes(study / first)

    watcher = InterruptSecondCell(epoch=None)
    report = run_study(spec, out=tmp_path, callbacks=[watcher], progress=False)
    assert report == study / "report.html" and report.is_file()
    assert watcher.cells == [second]  # the finished cell was not trained again ...
    assert mtimes(study / first) == before  # ... nor re-explained: no file of it was rewritten
    assert watcher.starts[second] == 2  # the killed one continued from its last checkpoint
    history = read_json(study / second / "history.json")
    assert [row["epoch"] for row in history] == [1, 2, 3]

    # Nothing lost: the resumed cell equals one trained without interruption (deterministic fp32).
    uninterrupted = run_study(spec, out=tmp_path / "straight", progress=False).parent
    for cell in (first, second):
        a = load_file(str(study / cell / "model.safetensors"))
        b = load_file(str(uninterrupted / cell / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        ra, rb = read_json(study / cell / "record.json"), read_json(uninterrupted / cell / "record.json")
        assert ra["test"]["confusion_matrix"] == rb["test"]["confusion_matrix"]
        assert ra["quality"] == rb["quality"]

    # A third run finds every cell finished with the same key: nothing trained, every record reused.
    watcher = InterruptSecondCell(epoch=None)
    before = {c: mtimes(study / c) for c in (first, second)}
    run_study(spec, out=tmp_path, callbacks=[watcher], progress=False)
    assert watcher.cells == []
    assert {c: mtimes(study / c) for c in (first, second)} == before


def test_a_study_killed_inside_an_assessment_resumes_at_the_method_it_was_on(tmp_path, monkeypatch):
    """Killed while explaining a cell's second method: the rerun trains nothing and explains only the
    methods not finished (saliency's part is read), and the cell's record equals an uninterrupted one's."""
    spec = spec_from_dict(tiny(option_grid={}, n_misclassified=0, sanity_method=""))
    (cell,) = expand_cells(spec)
    ExplainCalls(monkeypatch, die_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, out=tmp_path, progress=False)
    cell_dir = tmp_path / "tiny" / cell.name
    assert (cell_dir / runner.PARTS_DIR / "saliency.json").is_file() and not (
        cell_dir / "record.json"
    ).exists()
    calls = ExplainCalls(monkeypatch)
    watcher = InterruptSecondCell(epoch=None)
    run_study(spec, out=tmp_path, callbacks=[watcher], progress=False)
    assert watcher.cells == [] and calls.count == 1  # no training; gradcam explained, saliency read
    assert not (cell_dir / runner.PARTS_DIR).exists()
    straight = run_study(spec, out=tmp_path / "straight", progress=False).parent
    assert (
        read_json(cell_dir / "record.json")["quality"]
        == read_json(straight / cell.name / "record.json")["quality"]
    )


def test_changed_settings_redo_only_what_they_affect(tmp_path):
    spec = spec_from_dict(tiny(option_grid={}, n_misclassified=0, sanity_method=""))
    (cell,) = expand_cells(spec)
    record = run_cell(CellTask(spec, cell, str(tmp_path)))
    assert not record["skipped"] and record["sanity"] is None and record["misclassified"]["figure"] is None
    weights = (tmp_path / cell.name / "model.safetensors").stat().st_mtime_ns

    # Another metric: the record is redone, the trained model reused.
    more = spec_from_dict(tiny(option_grid={}, n_misclassified=0, sanity_method="", metrics=["complexity"]))
    (cell_more,) = expand_cells(more)
    assert cell_key(more, cell_more) != cell_key(spec, cell)
    watcher = InterruptSecondCell(epoch=None)
    record = run_cell(CellTask(more, cell_more, str(tmp_path), callbacks=(watcher,)))
    assert watcher.cells == [] and not record["skipped"]
    assert list(record["quality"]["saliency"]) == ["complexity"]
    assert (tmp_path / cell.name / "model.safetensors").stat().st_mtime_ns == weights

    # Another recipe in the same folder: refused, naming the folder, instead of mixing two runs.
    other = spec_from_dict(tiny(option_grid={}, train={**tiny()["train"], "lr": 0.01}))
    (cell_other,) = expand_cells(other)
    with pytest.raises(CheckpointError, match="another recipe"):
        run_cell(CellTask(other, cell_other, str(tmp_path)))


def test_redo_trains_a_changed_cell_again_and_names_unknown_cells(tmp_path, capsys):
    """A recipe changed on purpose: the refusal names ``--redo <cell>``; ``redo`` deletes that cell's folder
    first and it is trained with the new recipe; a misspelt cell is refused before anything is deleted."""
    base = tiny(option_grid={}, n_misclassified=0, sanity_method="")
    run_study(spec_from_dict(base), out=tmp_path, progress=False)
    changed = {**base, "train": {**base["train"], "lr": 0.01}}
    (cell,) = expand_cells(spec_from_dict(changed))
    with pytest.raises(CheckpointError, match=f"--redo {cell.name}"):
        run_study(spec_from_dict(changed), out=tmp_path, progress=False)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({**changed, "name": "tiny"}))
    argv = ["run", str(path), "--out", str(tmp_path), "--redo", "keras__digits"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "redo: 'keras__digits' not a cell of tiny" in err and cell.name in err and "Traceback" not in err
    assert (tmp_path / "tiny" / cell.name / "record.json").is_file()  # nothing deleted
    assert main(["run", str(path), "--out", str(tmp_path), "--redo", cell.name]) == 0
    assert read_json(tmp_path / "tiny" / cell.name / "record.json")["train_config"]["lr"] == 0.01


def test_record_holds_what_the_report_needs(tmp_path):
    spec = spec_from_dict(tiny(option_grid={}))
    (cell,) = expand_cells(spec)
    record = run_cell(CellTask(spec, cell, str(tmp_path)))
    folder = tmp_path / cell.name
    cm = torch.tensor(record["test"]["confusion_matrix"])
    assert cm.sum() == record["test"]["n"] == 359  # digits' test split
    assert record["misclassified"]["total"] == int(cm.sum() - cm.trace())
    assert set(record["quality"]) == {"saliency", "gradcam"}
    for scores in record["quality"].values():
        assert set(scores) == {"sparseness", "deletion_auc"}
        assert all(s["n"] == 4 and s["ci_low"] <= s["mean"] <= s["ci_high"] for s in scores.values())
    assert record["agreement"]["methods"] == ["saliency", "gradcam"]
    assert record["agreement"]["spearman"][0][0] == pytest.approx(1.0)
    assert len(record["sanity"]["mean_spearman"]) == len(record["sanity"]["layers"]) > 0
    assert len(record["gallery"]) == 2
    for item in record["gallery"]:
        assert (folder / item["input"]).is_file()
        assert all((folder / path).is_file() for path in item["maps"].values())
    maps = load_file(str(folder / "explanations.safetensors"))
    assert maps["map.saliency"].shape == (4, 1, 16, 16) and maps["images"].shape == (4, 16, 16, 1)
    assert record["parameters"] > 0 and record["macs"] > 0 and len(record["history"]) == 3


def test_cli_runs_a_study_file_and_records_the_command(tmp_path, capsys):
    path = tmp_path / "one.yaml"
    spec = tiny(name="one", option_grid={}, metrics=[], sanity_method="", n_misclassified=0)
    spec["train"] = {**spec["train"], "epochs": 1}
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert f"report: {out / 'one' / 'report.html'}" in capsys.readouterr().out
    assert read_json(out / "one" / "study.json")["command"] == f"xailab run {path} --out {out}"
    assert main(["run", "--list"]) == 0
    assert capsys.readouterr().out.split() == list_studies()
    assert main(["run", "quik"]) == 2  # a typo: a clear one-line error, no traceback
    assert "Did you mean 'quick'" in capsys.readouterr().err


def test_a_study_with_a_bad_metric_precision_is_refused_before_training(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(tiny(name="mp", metric_precision="fast")))
    assert main(["run", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "metric_precision: 'fast' is not valid; choose one of 'fp32', 'bf16', 'auto'" in err
    assert str(study) in err and "\n" not in err
    assert not (tmp_path / "out" / "mp").exists()  # nothing trained, no folder made


def test_metric_precision_is_part_of_the_cell_key_but_the_default_keeps_old_keys():
    """A record written before the key existed (fp32 then) stays valid; another precision redoes the
    assessment (the training is reused: the recipe's hash does not change)."""
    spec = spec_from_dict(tiny())
    cell = expand_cells(spec)[0]
    explain_part = {k: v for k, v in spec.to_dict().items() if k not in runner.CELL_DEFINING_KEYS}
    del explain_part["metric_precision"]
    explain_part["explain_sample"] = (
        "balanced"  # not the default then: records of the first images are redone
    )
    old = {
        "version": runner.CELL_KEY_VERSION,
        "recipe": runner.config_hash(cell.config),
        "epochs": cell.config.epochs,
        "early_stopping": cell.config.early_stopping,
        "explain": explain_part,
    }
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert cell_key(spec, cell) == old_key
    auto = spec_from_dict(tiny(metric_precision="auto"))
    assert auto.metric_precision == "auto" and cell_key(auto, expand_cells(auto)[0]) != old_key


def test_explain_sample_takes_the_classes_in_turn_and_first_keeps_old_records(tmp_path):
    """A cell explains a balanced sample of its test split by default (the classes in turn: a split stored
    class by class is not judged on its first class), recorded in explanations.safetensors; ``first`` explains
    the first n, and its cell key is the key of records made before the option (they stay valid)."""
    from xailab.data import load_dataset, sample_indices

    labels = load_dataset("digits", image_size=16)["test"].labels
    keys = {}
    for how in ("balanced", "first"):
        spec = spec_from_dict(
            tiny(option_grid={}, n_explain=6, n_misclassified=0, sanity_method="", explain_sample=how)
        )
        (cell,) = expand_cells(spec)
        record = run_cell(CellTask(spec, cell, str(tmp_path / how)))
        saved = load_file(str(tmp_path / how / cell.name / "explanations.safetensors"))
        assert (
            torch.equal(saved["indices"], sample_indices(labels, 6, how))
            and record["explain"]["sample"] == how
        )
        assert torch.equal(saved["labels"], labels[saved["indices"]])
        gallery = [g["index"] for g in record["gallery"]]  # named by their index in the test split
        assert gallery and gallery == saved["indices"][: len(gallery)].tolist()
        keys[how] = cell_key(spec, cell)
    assert saved["indices"].tolist() == list(range(6))
    balanced = load_file(str(tmp_path / "balanced" / cell.name / "explanations.safetensors"))
    assert sorted(balanced["labels"].tolist()) == list(range(6))  # six images, six classes
    part = {k: v for k, v in spec.to_dict().items() if k not in runner.CELL_DEFINING_KEYS}
    del part["metric_precision"], part["explain_sample"]
    before = {"version": runner.CELL_KEY_VERSION, "recipe": runner.config_hash(cell.config), "epochs": cell.config.epochs,
              "early_stopping": cell.config.early_stopping, "explain": part}  # fmt: skip
    assert keys["first"] == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert keys["balanced"] != keys["first"]
