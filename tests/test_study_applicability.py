"""Per-cell method applicability in studies: a cell explains and assesses only the study's methods that apply
to its model (transformer methods on a ViT, LRP on a CNN), records the others with what they need, and the
report says "n/a — needs ..." there; a method that applies to no model fails before anything trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from xailab.errors import ConfigError
from xailab.io import read_json
from xailab.records import CellRecord, read_cell_record
from xailab.study import STUDIES, expand_cells, load_study, run_study, spec_from_dict
from xailab.study.runner import check_methods_apply, plan_methods, record_is_current

pytestmark = pytest.mark.usefixtures("single_thread")

CNN, VIT = "keras_cnn__digits", "vit_tiny__digits"


def cnn_and_vit(**changes) -> dict:
    """A tiny CNN and a tiny ViT (1 block, 16 wide, patch 4: a 4x4 token grid) on 16x16 digits, 1 epoch."""
    spec = {
        "name": "cnn-and-vit",
        "datasets": ["digits"],
        "models": ["keras_cnn", "vit_tiny"],
        "model_options": {"keras_cnn": {"image_size": 16}, "vit_tiny": {"depth": 1, "width": 16, "heads": 2}},
        "train": {"epochs": 1, "batch_size": 64, "image_size": 16, "train_limit": 256, "lr": 0.003},
        "methods": ["saliency", "attention_rollout", "lrp"],
        "metrics": ["sparseness"],
        "n_explain": 4,
        "n_gallery": 2,
        "n_misclassified": 2,
        "misclassification_method": "attention_rollout",
        "sanity_method": "attention_rollout",
        "sanity_images": 2,
    }
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """The tiny CNN + ViT study, run once for the module."""
    out = tmp_path_factory.mktemp("studies")
    return run_study(spec_from_dict(cnn_and_vit()), out=out, progress=False).parent


def test_each_cell_runs_only_the_methods_that_apply_to_its_model(study_dir):
    cnn = read_json(study_dir / CNN / "record.json")
    vit = read_json(study_dir / VIT / "record.json")
    assert cnn["explain"]["methods"] == ["saliency", "lrp"]
    assert vit["explain"]["methods"] == ["saliency", "attention_rollout"]
    # what a skipped method needs and the model lacks, and what the model offers
    assert cnn["skipped_methods"] == {
        "attention_rollout": {"needs": ["attention", "tokens"], "offers": ["conv", "relu"]}
    }
    assert vit["skipped_methods"] == {"lrp": {"needs": ["conv"], "offers": ["attention", "tokens"]}}
    for record, methods in ((cnn, {"saliency", "lrp"}), (vit, {"saliency", "attention_rollout"})):
        assert set(record["quality"]) == methods
        assert set(record["explain"]["seconds_per_image"]) == methods
        assert record["agreement"]["methods"] == record["explain"]["methods"]
        assert all(set(g["maps"]) == methods for g in record["gallery"])
        maps = load_file(str(study_dir / record["cell"] / "explanations.safetensors"))
        assert {k for k in maps if k.startswith("map.")} == {f"map.{m}" for m in methods}
    # the sanity method needs a ViT: checked there, n/a on the CNN
    assert cnn["sanity"] is None
    assert vit["sanity"]["method"] == "attention_rollout" and len(vit["sanity"]["layers"]) > 0
    # the misclassification method falls back to the first method that applies
    assert vit["misclassified"]["method"] == "attention_rollout"
    assert cnn["misclassified"]["method"] == "saliency"


def test_the_record_reads_back_typed_and_says_why(study_dir):
    record = read_cell_record(study_dir / CNN / "record.json")
    assert record.version == 2
    assert record.skipped_methods["attention_rollout"].reason == "needs attention, tokens"
    assert read_cell_record(study_dir / VIT / "record.json").skipped_methods["lrp"].reason == "needs conv"


def quality_rows(html: str, cell: str) -> dict[str, str]:
    """method -> the text of its row in ``cell``'s quality table."""
    section = html[html.index('<section id="quality">') : html.index('<section id="agreement">')]
    table = section[section.index(f"<h3>{cell}</h3>") :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", table, flags=re.S)
    return {method: re.sub(r"<[^>]+>", " ", rest).strip() for method, rest in rows}


def test_report_shows_na_with_the_reason_in_that_cells_tables(study_dir):
    html = (study_dir / "report.html").read_text()
    cnn, vit = quality_rows(html, CNN), quality_rows(html, VIT)
    assert list(cnn) == ["saliency", "lrp", "attention_rollout"]
    assert cnn["attention_rollout"] == "n/a — needs attention, tokens"
    assert list(vit) == ["saliency", "attention_rollout", "lrp"]
    assert vit["lrp"] == "n/a — needs conv"
    assert re.match(r"\d\.\d{3} \[", vit["attention_rollout"])  # scored where it applies
    sanity = html[html.index('<section id="sanity">') : html.index('<section id="trust">')]
    assert (
        f'<td>{CNN}</td><td>attention_rollout</td><td class="na" colspan="6">n/a — needs attention, tokens'
        in sanity
    )
    assert f'<td>{VIT}</td><td>attention_rollout</td><td class="num">' in sanity
    galleries = html[html.index('<section id="galleries">') : html.index('<section id="sidebyside">')]
    assert galleries.count("n/a — needs attention, tokens") == 2  # the CNN's row of each of 2 gallery images
    assert galleries.count("n/a — needs conv") == 2


def test_a_method_that_applies_to_no_model_fails_before_training(tmp_path):
    spec = spec_from_dict(cnn_and_vit(models=["keras_cnn"], model_options={"keras_cnn": {"image_size": 16}}))
    with pytest.raises(ConfigError) as e:
        run_study(spec, out=tmp_path, progress=False)
    message = str(e.value)
    for text in (
        "'attention_rollout' applies to none of the study's models",
        "keras_cnn",
        "attention, tokens",
    ):
        assert text in message
    assert not (tmp_path / "cnn-and-vit").exists()  # refused before the study folder, let alone training


def test_a_cell_left_without_methods_fails_before_training(tmp_path):
    spec = spec_from_dict(cnn_and_vit(methods=["attention_rollout"], misclassification_method=""))
    with pytest.raises(ConfigError, match=f"cell {CNN} has no method that applies to its model"):
        run_study(spec, out=tmp_path, progress=False)
    assert not (tmp_path / "cnn-and-vit").exists()


def test_plan_methods_known_answers():
    plan = plan_methods(["saliency", "lrp", "legrad", "gradcam"], frozenset({"conv"}))
    assert plan.applicable == ("saliency", "lrp", "gradcam")
    assert plan.skipped["legrad"].needs == ("attention", "tokens") and plan.skipped["legrad"].offers == (
        "conv",
    )
    plan = plan_methods(["saliency", "lrp", "legrad"], frozenset({"attention", "tokens"}))
    assert plan.applicable == ("saliency", "legrad") and plan.skipped["lrp"].reason == "needs conv"


def test_bundled_cnn_vs_vit_runs_each_method_where_it_applies():
    spec = STUDIES.get("cnn-vs-vit")()
    plans = check_methods_apply(spec, expand_cells(spec))
    transformer = {"attention_rollout", "transformer_attribution", "legrad"}
    for cell, plan in plans.items():
        if cell.startswith("vit_tiny"):
            assert transformer <= set(plan.applicable) and set(plan.skipped) == {"lrp"}, cell
        else:
            assert "lrp" in plan.applicable and set(plan.skipped) == transformer, cell
        assert "gradcam" in plan.applicable


def test_the_cpu_cnn_vs_vit_config_validates():
    path = Path(__file__).resolve().parents[1] / "configs" / "cnn-vs-vit-cpu.yaml"
    spec = load_study(path)
    plans = check_methods_apply(spec, expand_cells(spec))
    assert set(plans) == {"efficient_cnn__mnist", "vit_tiny__mnist"}
    assert all(plan.applicable for plan in plans.values())


def minimal_record(**changes) -> dict:
    return {"cell": "m__d", "model": "m", "dataset": "d", "class_names": ["a", "b"], **changes}


def test_version_1_records_still_read_and_cannot_carry_version_2_fields():
    old = CellRecord.from_dict(minimal_record(version=1, gallery=[]))
    assert old.version == 1 and old.skipped_methods == {} and old.quadrants is None
    assert not record_is_current(old)  # a two-class cell without quadrants is re-assessed
    assert record_is_current(CellRecord.from_dict(minimal_record(version=1, class_names=["a", "b", "c"])))
    skipped = {"lrp": {"needs": ["conv"], "offers": []}}
    with pytest.raises(ConfigError, match="version 1 has no skipped_methods"):
        CellRecord.from_dict(minimal_record(version=1, skipped_methods=skipped))
    new = CellRecord.from_dict(minimal_record(skipped_methods=skipped))
    assert CellRecord.from_dict(new.to_dict()) == new
    with pytest.raises(ConfigError, match=r"skipped_methods\.lrp.*needs must name"):
        CellRecord.from_dict(minimal_record(skipped_methods={"lrp": {"needs": []}}))


def test_quadrants_are_validated():
    tile = {
        "index": 3,
        "label": "b",
        "prediction": "b",
        "confidence": 0.9,
        "input": "q/0-input.png",
        "maps": {},
    }
    quadrants = {
        "method": "gradcam",
        "positive": "b",
        "negative": "a",
        "counts": {"TP": 1, "FP": 0, "TN": 0, "FN": 0},
        "galleries": {"TP": [tile], "FP": [], "TN": [], "FN": []},
    }
    record = CellRecord.from_dict(minimal_record(quadrants=quadrants))
    assert record.quadrants is not None and record.quadrants.galleries["TP"][0].index == 3
    assert record_is_current(record) and CellRecord.from_dict(record.to_dict()) == record
    too_many = {**quadrants, "counts": {"TP": 0, "FP": 0, "TN": 0, "FN": 0}}
    with pytest.raises(ConfigError, match="TP: 1 images shown of 0 counted"):
        CellRecord.from_dict(minimal_record(quadrants=too_many))
    with pytest.raises(ConfigError, match="expected the keys TP, FP, TN, FN"):
        CellRecord.from_dict(minimal_record(quadrants={**quadrants, "counts": {"TP": 1}}))
    with pytest.raises(ConfigError, match="confidence"):
        bad = {**quadrants, "galleries": {**quadrants["galleries"], "TP": [{**tile, "confidence": 1.5}]}}
        CellRecord.from_dict(minimal_record(quadrants=bad))


def test_sanity_method_all_checks_every_method_that_applies_per_architecture(tmp_path):
    """``sanity_method: all``: each cell runs the cascade for every method that applies to its model; the report
    has one verdict per cell and method (the figure on the misclassification method's row) and the trust table
    reads them instead of "not checked"."""
    spec = spec_from_dict(cnn_and_vit(sanity_method="all"))
    study_dir = run_study(spec, out=tmp_path, progress=False).parent
    cnn = read_json(study_dir / CNN / "record.json")
    vit = read_json(study_dir / VIT / "record.json")
    assert set(cnn["sanity_by_method"]) == {"saliency", "lrp"}
    assert set(vit["sanity_by_method"]) == {"saliency", "attention_rollout"}
    assert vit["sanity"]["method"] == "attention_rollout"  # the misclassification method draws the figure
    assert cnn["sanity"]["method"] == "saliency"  # ... where it applies; else the first method
    for record in (cnn, vit):
        for method, curves in record["sanity_by_method"].items():
            assert curves["method"] == method and curves["images"] == 2
            assert len(curves["mean_spearman"]) == len(curves["layers"]) > 0
    html = (study_dir / "report.html").read_text()
    sanity = html[html.index('<section id="sanity">') : html.index('<section id="trust">')]
    for cell, methods in ((CNN, ("saliency", "lrp")), (VIT, ("saliency", "attention_rollout"))):
        for method in methods:
            assert f'<td>{cell}</td><td>{method}</td><td class="num">' in sanity
    assert sanity.count('alt="randomisation cascade of') == 2  # one figure per cell
    trust = html[html.index('<section id="trust">') :]
    assert "not checked" not in trust[: trust.index("</section>")]


def test_sanity_method_all_is_valid_and_a_typo_names_it():
    assert spec_from_dict(cnn_and_vit(sanity_method="all")).sanity_method == "all"
    with pytest.raises(ConfigError, match=r"sanity_method 'al' is not one of the study's methods.*or 'all'"):
        spec_from_dict(cnn_and_vit(sanity_method="al"))
