"""The consolidated report: every section and image present, tables right, records-only imports, and a
headless Chromium screenshot that is not blank."""

from __future__ import annotations

import ast
import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xailab.report
from xailab.errors import CheckpointError
from xailab.records import CellRecord
from xailab.report import build_report, top_confusions
from xailab.report.build import SECTIONS
from xailab.study import run_study, spec_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A two-cell study (two models on 16x16 digits), run once for the module."""
    spec = spec_from_dict(
        {
            "name": "tiny-report",
            "description": "two models for the report test",
            "datasets": ["digits"],
            "models": ["keras_cnn", "mnist_cnn"],
            "model_options": {"keras_cnn": {"image_size": 16}},
            # flip TTA (digits would not get it by default) so the report's counts are checked against it
            "train": {
                "epochs": 2,
                "batch_size": 64,
                "image_size": 16,
                "train_limit": 300,
                "lr": 0.003,
                "tta": "flip",
                "precision": "fp32",
            },
            "model_train": {"mnist_cnn": {"epochs": 3}},
            "dataset_train": {"digits": {"lr": 0.004}},
            "methods": ["saliency", "gradcam", "integrated_gradients"],
            "method_params": {"integrated_gradients": {"n_steps": 8}},
            "metrics": ["sparseness", "deletion_auc", "complexity"],
            "n_explain": 4,
            "n_gallery": 2,
            "n_misclassified": 3,
            "sanity_method": "gradcam",
            "sanity_images": 2,
        }
    )
    out = tmp_path_factory.mktemp("studies")
    return run_study(spec, out=out, progress=False, command="xailab run tiny.yaml").parent


class Links(HTMLParser):
    """Collects section ids, image sources and link targets of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "a" and not a["href"].startswith("#"):
            self.links.append(a["href"])


def test_every_section_and_image_is_there(study_dir):
    html = (study_dir / "report.html").read_text()
    page = Links()
    page.feed(html)
    assert page.ids == [sid for sid, _ in SECTIONS]
    # 2 cells x 2 gallery images x (input + 3 methods) tiles, plus charts and per-cell figures
    assert len(page.images) >= 16 + 5
    for src in page.images + page.links:
        assert (study_dir / src).is_file(), src
        assert not src.startswith("/")  # relative: the folder can be sent or moved as a whole
    for needle in (
        "keras_cnn__digits",
        "mnist_cnn__digits",
        "xailab run tiny.yaml",
        "deletion_auc",
        "complexity",
        "integrated_gradients",
        "Top confusion pairs",
        "torch",
        "a balanced sample: the classes in turn",  # which test images the quality tables are over
    ):
        assert needle in html, needle
    assert "nan%" not in html.lower() and "undefined" not in html.lower()
    # a per-model budget is said where the shared recipe is (it had read as if every cell trained 2 epochs)
    assert '<b>mnist_cnn</b> {"epochs": 3}.' in html and '<b>digits</b> {"lr": 0.004}.' in html


def test_a_study_folder_written_before_the_per_model_and_per_dataset_keys_still_renders(study_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(study_dir, old)
    study = json.loads((old / "study.json").read_text())
    for key in ("model_train", "dataset_train"):
        del study["spec"][key]
    (old / "study.json").write_text(json.dumps(study))
    html = build_report(old).read_text()
    assert "Training recipe shared by the cells" in html and "model_train" not in html


def test_results_table_files(study_dir):
    rows = list(csv.DictReader((study_dir / "results.csv").open()))
    assert [r["model"] for r in rows] == ["keras_cnn", "mnist_cnn"]
    assert [r["epochs"] for r in rows] == ["2", "3"]  # model_train's budget for mnist_cnn
    assert "roc_auc" not in rows[0] and "sensitivity" not in rows[0]  # ten classes: no screening columns
    for row in rows:
        record = json.loads((study_dir / f"{row['model']}__digits" / "record.json").read_text())
        assert float(row["accuracy"]) == record["test"]["accuracy"]
        assert int(row["parameters"]) == record["parameters"] and int(row["macs"]) == record["macs"]
        assert float(row["train_seconds"]) > 0 and float(row["inference_images_per_s"]) > 0
    md = (study_dir / "results.md").read_text()
    assert md.count("| keras_cnn |") == 1 and "| accuracy |" in md and "xailab run tiny.yaml" in md


def test_top_confusions_known_answer():
    names = ["a", "b", "c"]
    records = [
        CellRecord.from_dict(
            {
                "cell": cell,
                "model": "m",
                "dataset": "d",
                "class_names": names,
                "test": {"confusion_matrix": cm},
            }
        )
        for cell, cm in (("m1", [[5, 3, 0], [1, 6, 0], [0, 2, 4]]), ("m2", [[7, 1, 0], [0, 7, 0], [0, 4, 2]]))
    ]
    top = top_confusions(records, k=3)
    assert [(p["true"], p["predicted"], p["total"]) for p in top] == [
        ("c", "b", 6),
        ("a", "b", 4),
        ("b", "a", 1),
    ]
    assert top[0]["per_cell"] == {"m1": 2, "m2": 4}


def test_report_layer_never_imports_models_or_torch():
    """ARCHITECTURE.md: report/ reads result records only."""
    for path in Path(xailab.report.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("torch", "xailab.models", "xailab.train", "xailab.study")), (
                        f"{path.name} imports {name}"
                    )


def test_report_figures_normalise_maps_bit_for_bit_as_explain_figures():
    """report/ redoes explain.figures' map normalisation and overlay in numpy: identical bytes (so the PNGs
    are), for signed, non-negative, all-zero and sparse maps and grey or colour images."""
    import torch

    from xailab.explain import figures
    from xailab.report import assessment

    rng = np.random.default_rng(0)
    for i in range(300):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        m = (rng.standard_normal((1, h, w)) * 10 ** rng.uniform(-6, 3)).astype(np.float32)
        m = [m, np.abs(m) + 3.0, np.zeros_like(m), np.where(m > 0.5, m, 0), -np.abs(m)][i % 5]
        expected = figures.normalise_map(torch.from_numpy(m)).numpy()
        assert assessment.normalise_map(m).tobytes() == expected.tobytes()
        image = rng.integers(0, 256, (h, w, 3 if i % 2 else 1), dtype=np.uint8)
        expected = figures.overlay(torch.from_numpy(image), torch.from_numpy(m))
        assert assessment.overlay(image, m).tobytes() == expected.tobytes()


def test_missing_study_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a study folder"):
        build_report(tmp_path)


def test_chromium_screenshot_is_not_blank(study_dir, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            shutil.which("chromium") or shutil.which("chromium-browser") or "chromium",  # Debian's package
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,4000",
            f"--screenshot={shot}",
            (study_dir / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (4000, 1280)
    # A rendered page has the dark header, text, charts and heatmaps: many distinct colours, not one.
    assert pixels.std() > 20
    assert len(np.unique(pixels[::4, ::4].reshape(-1, 3), axis=0)) > 500


def _fake_records(n: int, classes: int = 10) -> list[dict]:
    """``n`` cells' records as the charts read them: a 12-epoch history and a test confusion matrix."""
    rng = np.random.default_rng(0)
    return [
        {
            "cell": f"model{i}__cifar10",
            "class_names": [f"class{c}" for c in range(classes)],
            "history": [
                {
                    "epoch": e,
                    "train_accuracy": 0.5 + 0.03 * e,
                    "val_accuracy": 0.5 + 0.02 * e,
                    "train_loss": 2.0 / e,
                    "val_loss": 2.2 / e,
                }
                for e in range(1, 13)
            ],
            "test": {"confusion_matrix": rng.integers(0, 50, (classes, classes)).tolist()},
        }
        for i in range(n)
    ]


def _boxes(fig):
    """Draws ``fig`` and returns its axes' and legends' bounding boxes in display units."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    legends = [leg.get_window_extent(renderer) for leg in fig.legends]
    return axes, legends


@pytest.mark.parametrize("n", [1, 6, 12])
def test_the_training_curves_legend_never_covers_the_plots(n):
    from xailab.report import charts

    fig = charts.training_curves(_fake_records(n))
    axes, legends = _boxes(fig)
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside a plot
    assert len(legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"model{i}__cifar10" for i in range(n)] + ["training", "validation"]
    for box in axes:
        assert not box.overlaps(legends[0]), (box, legends[0])
    height = fig.get_figheight() * fig.dpi
    assert legends[0].y0 >= 0 and legends[0].y1 <= height  # inside the saved image


def test_confusion_matrices_wrap_so_each_keeps_its_size():
    from xailab.report import charts

    one = charts.confusion_matrices(_fake_records(1))
    six = charts.confusion_matrices(_fake_records(6))
    (box_one,), _ = _boxes(one)
    boxes, _ = _boxes(six)
    assert len(boxes) == 6  # spare axes hidden
    assert six.get_figwidth() == pytest.approx(one.get_figwidth() * 3 - 0.6 * 2)  # three to a row
    rows = sorted({round(b.y0) for b in boxes})
    assert len(rows) == 2
    for box in boxes:  # each matrix at least 80% as wide as a lone one
        assert box.width >= 0.8 * box_one.width
    for a, b in [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]]:
        assert not a.overlaps(b)


def test_long_cell_names_wrap_in_the_confusion_titles():
    from xailab.report import charts

    assert charts.wrap_cell_name("resnet18__mnist") == "resnet18__mnist"
    assert charts.wrap_cell_name("transfer_ensemble__chest_xray") == "transfer_ensemble__\nchest_xray"
    records = _fake_records(3, classes=2)  # two classes: the narrowest matrices
    for i, rec in enumerate(records):
        rec["cell"] = ("mobilenetv2_imagenet", "densenet169", "transfer_ensemble")[i] + "__chest_xray"
    fig = charts.confusion_matrices(records)
    _boxes(fig)  # draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    width = fig.get_figwidth() * fig.dpi
    assert all(t.x0 >= 0 and t.x1 <= width for t in titles), (titles, width)  # none cut at the edge
    for a, b in [(a, b) for i, a in enumerate(titles) for b in titles[i + 1 :]]:
        assert not a.overlaps(b), (a, b)


def _stats(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": 64}


@pytest.mark.parametrize(
    ("stats", "better", "expected"),
    [
        (_stats(0.69, 0.65, 0.73), "higher", "above"),  # insertion, interval wholly above chance's 0.56
        (_stats(0.61, 0.56, 0.66), "higher", "at"),  # the interval holds 0.56 (its low end 0.557 < 0.561)
        (_stats(0.50, 0.45, 0.55), "higher", "below"),
        (_stats(0.69, 0.65, 0.73), "lower", "below"),  # deletion-like: higher than chance is worse
        (_stats(0.40, 0.35, 0.45), "lower", "above"),
        (_stats(0.69, 0.65, 0.73), "none", None),  # a property (sparseness): no direction, no verdict
        (None, "higher", None),
        (_stats(float("nan"), float("nan"), float("nan")), "higher", None),
    ],
)
def test_versus_chance_known_answers(stats, better, expected):
    from xailab.report.shortcut import versus_chance

    assert versus_chance(stats, _stats(0.561, 0.499, 0.620), better) == expected
    assert versus_chance(stats, None, better) is None  # records made before the chance level existed


def test_the_best_score_is_bold_only_when_it_beats_chance():
    """cifar10-cnn's converged simple_cnn (2026-12-01): every method's deletion AUC is at or below the chance
    level, so none is bold there, while Grad-CAM's insertion AUC beats chance and stays bold."""
    from xailab.report.build import quality_table
    from xailab.report.shortcut import trust_table

    quality = {
        "gradcam": {
            "deletion_auc": _stats(0.278, 0.240, 0.320),
            "insertion_auc": _stats(0.687, 0.645, 0.731),
        },
        "saliency": {
            "deletion_auc": _stats(0.307, 0.265, 0.355),
            "insertion_auc": _stats(0.608, 0.557, 0.659),
        },
        "smoothgrad": {
            "deletion_auc": _stats(0.265, 0.231, 0.299),
            "insertion_auc": _stats(0.683, 0.636, 0.729),
        },
    }
    chance = {"deletion_auc": _stats(0.263, 0.208, 0.326), "insertion_auc": _stats(0.561, 0.499, 0.620)}
    info = {"deletion_auc": {"better": "lower"}, "insertion_auc": {"better": "higher"}}
    metrics = ["deletion_auc", "insertion_auc"]
    record = {
        "cell": "simple_cnn__cifar10",
        "model": "simple_cnn",
        "dataset": "cifar10",
        "explain": {"methods": list(quality)},
        "quality": quality,
        "chance": chance,
    }
    rows = quality_table(CellRecord.from_dict(record), metrics, info)
    by_method = {row["method"]: row["scores"] for row in rows}
    (trust,) = trust_table([record], metrics, info, 0.5)["cells"]
    trusted = {row["method"]: row["quality"] for row in trust["rows"]}
    for table in (by_method, trusted):
        assert [table[m]["deletion_auc"]["chance"] for m in quality] == ["at", "below", "at"]
        assert not any(table[m]["deletion_auc"]["best"] for m in quality)  # smoothgrad's 0.265 is the lowest
        assert [table[m]["insertion_auc"]["chance"] for m in quality] == ["above", "at", "above"]
        assert [table[m]["insertion_auc"]["best"] for m in quality] == [True, False, False]
    assert rows[-1]["chance"] and rows[-1]["scores"]["deletion_auc"]["text"] == "0.263 [0.208, 0.326]"
    assert trust["chance"] == {
        "deletion_auc": "0.263 [0.208, 0.326]",
        "insertion_auc": "0.561 [0.499, 0.620]",
    }


def test_the_misclassified_count_agrees_with_the_test_accuracy_under_tta(study_dir):
    """The cells' test accuracy is measured with the recipe's flip TTA; the report's misclassified images are
    counted with it too (they were counted on the plain logits: 1,200 wrong beside 88.49% of 10,000)."""
    for path in sorted(study_dir.glob("*/record.json")):
        record = json.loads(path.read_text())
        assert record["train_config"]["tta"] == "flip"
        cm = np.asarray(record["test"]["confusion_matrix"])
        wrong = int(cm.sum() - np.trace(cm))
        assert record["misclassified"]["searched"] == cm.sum()
        assert record["misclassified"]["total"] == wrong, path


def _grid_records() -> list[dict]:
    """Nine cells of a seed grid: three models x three datasets, two MNIST ones equally accurate."""
    accuracy = {
        "mnist": (0.9959, 0.9959, 0.9950),
        "fashion_mnist": (0.94, 0.936, 0.928),
        "cifar10": (0.86, 0.83, 0.78),
    }
    sizes = {"resnet18": 11_000_000, "efficient_cnn": 1_200_000, "mobilenetv2": 2_200_000}
    return [
        {
            "cell": f"{model}__{dataset}",
            "model": model,
            "dataset": dataset,
            "parameters": sizes[model],
            "train_seconds": 600.0 + 100 * (j // 2),  # two cells at one point of the time panel
            "test": {"accuracy": accuracy[dataset][j]},
        }
        for dataset in accuracy
        for j, model in enumerate(sizes)
    ]


def test_the_accuracy_scatter_has_a_row_per_dataset_and_no_overlapping_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from xailab.report import charts

    fig = charts.accuracy_scatter(_grid_records())
    assert len(fig.axes) == 6  # two panels per dataset
    titles = [ax.get_title() for ax in fig.axes]
    assert (
        titles[0] == "mnist: accuracy vs parameters"
        and titles[-1] == "cifar10: accuracy vs training time (s)"
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts]
        assert sorted(t.get_text() for t in labels) == ["efficient_cnn", "mobilenetv2", "resnet18"]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b), (ax.get_title(), a, b)
    # one dataset: one row, the cells named without the dataset (in the title); option cells keep their suffix
    records = _grid_records()[:3]
    records[0]["cell"] = "resnet18-stride2__mnist"
    one = charts.accuracy_scatter(records)
    assert len(one.axes) == 2 and one.axes[0].get_title() == "mnist: accuracy vs parameters"
    assert sorted(t.get_text() for t in one.axes[1].texts) == [
        "efficient_cnn",
        "mobilenetv2",
        "resnet18-stride2",
    ]


def test_every_table_scrolls_inside_its_own_box(study_dir):
    # a table wider than the window (many metrics, long model options) scrolls by itself: the page does not
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.parents: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.parents.append(self.stack[-1] if self.stack else "")
            if tag in ("div", "section", "main", "body"):
                self.stack.append(f"{tag}.{dict(attrs).get('class', '')}")

        def handle_endtag(self, tag):
            if tag in ("div", "section", "main", "body"):
                self.stack.pop()

    html = (study_dir / "report.html").read_text()
    page = Tables()
    page.feed(html)
    assert len(page.parents) >= 4 and set(page.parents) == {"div.wide"}, page.parents
    assert "div.wide { max-width: 100%; overflow-x: auto; }" in html
