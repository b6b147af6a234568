"""The report's comparison galleries: several models on one dataset side by side on the same test images, and a
two-class cell's true and false positives and negatives (positive = class index 1) in four galleries."""

from __future__ import annotations

import csv
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xailab.data.transforms import to_model_input
from xailab.explain import explain
from xailab.explain.figures import overlay
from xailab.io import read_json
from xailab.report.build import QUADRANT_SECTION, SECTIONS, page_sections
from xailab.study import expand_cells, run_study, spec_from_dict
from xailab.study.runner import cell_dataset
from xailab.train import load_run, predict_logits

pytestmark = pytest.mark.usefixtures("single_thread")

N_GALLERY = 3
CLASSES = ("clear", "spot")  # class index 1, "spot", is the positive class


def write_tree(root: Path, n_train: int = 96, n_test: int = 24, flipped: int = 4, seed: int = 0) -> None:
    """A two-class 16x16 grey image tree: "spot" images carry a bright 8x8 square at a random place on noise,
    "clear" images are noise only. ``flipped`` test images of each class carry the other label, so that a
    model that learnt the task makes false positives and false negatives."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                image = rng.integers(0, 90, (16, 16), dtype=np.uint8)
                if c == 1:
                    y, x = rng.integers(0, 9, 2)
                    image[y : y + 8, x : x + 8] = 255
                label = CLASSES[1 - c] if split == "test" and i < flipped else name
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{name}-{i:03d}.png")


def binary_spec(root: Path, cache: Path) -> dict:
    return {
        "name": "binary",
        "datasets": ["image_folder"],
        "dataset_roots": {"image_folder": str(root)},
        "dataset_options": {"image_folder": {"cache_dir": str(cache)}},
        "models": ["keras_cnn", "vit_tiny"],
        "model_options": {"keras_cnn": {"image_size": 16}, "vit_tiny": {"depth": 1, "width": 16, "heads": 2}},
        "train": {"epochs": 4, "batch_size": 32, "image_size": 16, "lr": 0.01, "channels": 1},
        "methods": ["gradcam", "saliency", "attention_rollout"],
        "metrics": [],
        "n_explain": 4,
        "n_gallery": N_GALLERY,
        "n_misclassified": 0,
        "misclassification_method": "gradcam",
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[dict, Path]:
    """The two-model study on the tiny two-class tree, run once for the module."""
    tmp = tmp_path_factory.mktemp("binary")
    write_tree(tmp / "tree")
    spec = binary_spec(tmp / "tree", tmp / "cache")
    return spec, run_study(spec_from_dict(spec), out=tmp / "out", progress=False).parent


class Tables(HTMLParser):
    """The page's section ids and, per gallery table: its class, data attributes, rows' attributes and images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.section_ids: list[str] = []
        self.inside = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section_ids.append(a["id"])
        if tag == "table" and "gallery" in (a.get("class") or ""):
            self.tables.append({"class": a["class"], "attrs": a, "rows": [], "images": []})
            self.inside = True
        elif self.inside and tag == "tr":
            self.tables[-1]["rows"].append(a)
        elif self.inside and tag == "img":
            self.tables[-1]["images"].append(a["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False


def parsed(study_dir: Path) -> Tables:
    page = Tables()
    page.feed((study_dir / "report.html").read_text())
    return page


def test_side_by_side_shows_each_models_row_for_the_same_images(study):
    _, study_dir = study
    page = parsed(study_dir)
    side = [t for t in page.tables if "sidebyside" in t["class"]]
    # one table per method both models ran; attention_rollout applies to the ViT only, so it is not one
    assert [t["attrs"]["data-method"] for t in side] == ["gradcam", "saliency"]
    cells = ["keras_cnn__image_folder", "vit_tiny__image_folder"]
    for table in side:
        assert table["attrs"]["data-dataset"] == "image_folder"
        rows = [r for r in table["rows"] if "data-cell" in r]
        assert [r["data-cell"] for r in rows] == cells  # one row per model, in study order
        images = {r["data-images"] for r in rows}
        explained = load_file(str(study_dir / cells[0] / "explanations.safetensors"))["indices"]
        # the same test images, in the same order: the first of the cells' balanced sample, by test index
        assert images == {" ".join(str(i) for i in explained[:N_GALLERY].tolist())}
        # the input row, then each model's maps, all files of the study folder
        assert len(table["images"]) == N_GALLERY * (1 + len(cells))
        for cell in cells:
            assert sum(src.startswith(f"{cell}/") for src in table["images"][N_GALLERY:]) == N_GALLERY
        assert all((study_dir / src).is_file() for src in table["images"])
    html = (study_dir / "report.html").read_text()
    assert "attention_rollout</b>: keras_cnn__image_folder: n/a — needs attention, tokens" in html
    for cell in cells:  # the tiles are the ones of each cell's own gallery
        gallery = read_json(study_dir / cell / "record.json")["gallery"]
        maps = [f"{cell}/{g['maps']['gradcam']}" for g in gallery[:N_GALLERY]]
        assert [src for src in side[0]["images"][N_GALLERY:] if src.startswith(f"{cell}/")] == maps


def own_quadrants(spec: dict, study_dir: Path, cell) -> dict[str, list[int]]:
    """The test indices of each outcome, from the trained model's own predictions (positive: class 1)."""
    dataset = cell_dataset(cell)
    run = load_run(study_dir / cell.name)
    logits = predict_logits(
        run.model.eval(), dataset["test"].images, dataset.mean, dataset.std, run.config.eval_batch_size
    )
    predicted = logits.argmax(1).cpu().tolist()
    labels = dataset["test"].labels.cpu().tolist()
    assert dataset.class_names == CLASSES
    out: dict[str, list[int]] = {"TP": [], "FP": [], "TN": [], "FN": []}
    for i, (y, p) in enumerate(zip(labels, predicted, strict=True)):
        out[("T" if y == p else "F") + ("P" if p == 1 else "N")].append(i)
    return out


def test_two_class_cells_get_four_labelled_galleries_with_the_right_counts(study):
    spec, study_dir = study
    page = parsed(study_dir)
    order = [sid for sid, _ in SECTIONS]
    expected = [*order[: order.index("misclassified") + 1], QUADRANT_SECTION[0]]
    assert page.section_ids[: len(expected)] == expected
    html = (study_dir / "report.html").read_text()
    assert "positive spot, negative clear; maps by gradcam" in html
    quadrant_tables = [t for t in page.tables if "quadrant" in t["class"]]
    for cell in expand_cells(spec_from_dict(spec)):
        mine = own_quadrants(spec, study_dir, cell)
        assert sum(len(v) for v in mine.values()) == 2 * 24
        assert all(mine.values())  # an easy task with flipped test labels: every outcome occurs
        record = read_json(study_dir / cell.name / "record.json")["quadrants"]
        assert (
            record["positive"] == "spot" and record["negative"] == "clear" and record["method"] == "gradcam"
        )
        assert record["counts"] == {q: len(v) for q, v in mine.items()}
        for q, indices in mine.items():
            shown = record["galleries"][q]
            assert [t["index"] for t in shown] == indices[:N_GALLERY]  # the first ones, in test order
            for t in shown:
                assert (t["label"] == "spot") == (q in ("TP", "FN"))
                assert (t["prediction"] == "spot") == (q in ("TP", "FP"))
            title = {
                "TP": "true positives: spot predicted spot",
                "FP": "false positives: clear predicted spot",
            }
            title |= {
                "TN": "true negatives: clear predicted clear",
                "FN": "false negatives: spot predicted clear",
            }
            assert f"{q} — {title[q]}: {len(indices)} test image" in html
            tables = [
                t
                for t in quadrant_tables
                if t["attrs"]["data-cell"] == cell.name and t["attrs"]["data-quadrant"] == q
            ]
            # a gallery per non-empty outcome: an input and a Grad-CAM tile per image shown
            assert len(tables) == (1 if indices else 0)
            if indices:
                assert len(tables[0]["images"]) == 2 * min(N_GALLERY, len(indices))
                assert all((study_dir / src).is_file() for src in tables[0]["images"])


def test_the_quadrant_maps_are_the_methods_maps_for_the_predicted_class(study):
    """Each outcome's stored tiles equal Grad-CAM overlays recomputed on the same images (one batch, as the
    runner explains them) for the predicted class, and differ from the overlays for the other class."""
    spec, study_dir = study
    cell = expand_cells(spec_from_dict(spec))[0]
    quadrants = read_json(study_dir / cell.name / "record.json")["quadrants"]
    dataset = cell_dataset(cell)
    model = load_run(study_dir / cell.name).model.eval()
    for q in ("TP", "FP", "TN", "FN"):
        tiles = quadrants["galleries"][q]
        images = dataset["test"].images[[t["index"] for t in tiles]]
        x = to_model_input(images, dataset.mean, dataset.std)
        predicted = torch.tensor([CLASSES.index(t["prediction"]) for t in tiles])
        for target, same in ((predicted, True), (1 - predicted, False)):
            maps = explain(model, x, "gradcam", target=target)
            for i, t in enumerate(tiles):
                expected = np.asarray(overlay(images[i], maps[i]))
                stored = np.asarray(Image.open(study_dir / cell.name / t["maps"]["gradcam"]).convert("RGB"))
                scale = stored.shape[0] // expected.shape[0]
                error = np.abs(stored[::scale, ::scale] / 255.0 - expected).max()
                assert (error <= 0.5 / 255 + 1e-6) == same, (q, i, error)  # PNG rounding only


def test_two_class_cells_get_sensitivity_specificity_and_roc_auc_in_the_results_table(study):
    _, study_dir = study
    rows = list(csv.DictReader((study_dir / "results.csv").open()))
    assert list(rows[0])[3:8] == ["accuracy", "macro_f1", "sensitivity", "specificity", "roc_auc"]
    for row in rows:
        test = read_json(study_dir / f"{row['model']}__{row['dataset']}" / "record.json")["test"]
        # known answer from the record's confusion matrix (rows true, columns predicted; positive = index 1)
        (tn, fp), (fn, tp) = test["confusion_matrix"]
        assert float(row["sensitivity"]) == pytest.approx(tp / (tp + fn))
        assert float(row["specificity"]) == pytest.approx(tn / (tn + fp))
        assert float(row["roc_auc"]) == test["roc_auc"] and 0 <= test["roc_auc"] <= 1
    html = (study_dir / "report.html").read_text()
    assert "<th>sensitivity</th><th>specificity</th><th>ROC-AUC</th>" in html


def test_the_quadrant_section_comes_only_with_two_class_cells():
    assert QUADRANT_SECTION not in page_sections(shortcut=False, quadrants=False)
    sections = page_sections(shortcut=False, quadrants=True)
    assert sections.index(QUADRANT_SECTION) == sections.index(("misclassified", "Misclassifications")) + 1
