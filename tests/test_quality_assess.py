"""``xailab assess``: a run's explanations scored, tabulated and drawn, and clear errors for bad names."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from assess_helpers import ExplainCalls
from xailab.cli import main
from xailab.errors import ConfigError
from xailab.metrics import Assessment, assess, summarise
from xailab.report.assessment import write_assessment


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--model", "mnist_cnn", "--dataset", "digits", "--epochs", "1", "--precision", "fp32"]
    assert main([*argv, "--out", str(out), "--name", "d"]) == 0
    return out / "d"


def test_assess_writes_tables_and_figures(digits_run, tmp_path, capsys):
    out = tmp_path / "assessment"
    metrics = "deletion_auc,insertion_auc,sparseness,model_randomisation"
    argv = ["assess", str(digits_run), "--n", "6", "--methods", "saliency,gradcam", "--metrics", metrics]
    assert main([*argv, "--out", str(out)]) == 0
    assert "model_randomisation" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {(r["method"], r["metric"]) for r in rows} == {
        (m, k) for m in ("saliency", "gradcam") for k in metrics.split(",")
    } | {("chance (random maps)", k) for k in ("deletion_auc", "insertion_auc")}  # the level to beat
    assert all(
        int(r["n"]) == 6 and float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in rows
    )
    report = json.loads((out / "scores.json").read_text())
    layers = report["sanity_check"]["saliency"]["layers"]
    assert len(layers) == len(report["sanity_check"]["saliency"]["mean_spearman"]) > 1
    assert len(report["curves"]["gradcam"]["deletion"]) == 33
    assert report["agreement"]["methods"] == ["saliency", "gradcam"]
    assert len(list(csv.DictReader((out / "per_image.csv").open()))) == 12
    for name in ("deletion_insertion", "sanity_check", "sanity_maps_saliency", "agreement"):
        assert (out / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--metrics", "deletion_acu", "deletion_auc"), ("--methods", "salency", "saliency")],
)
def test_assess_unknown_names_suggest_the_nearest(digits_run, tmp_path, capsys, option, value, message):
    assert main(["assess", str(digits_run), "--n", "2", option, value, "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "Did you mean" in err and message in err and "Traceback" not in err


def test_scores_json_is_the_assessment_record(digits_run, tmp_path):
    out = tmp_path / "a"
    argv = ["assess", str(digits_run), "--n", "4", "--methods", "saliency", "--metrics", "sparseness"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "scores.json").read_text())
    record = Assessment.from_json(data)
    assert record.to_json() == data and record.version == 1
    assert record.methods == ("saliency",) and len(record.per_image["saliency"]["sparseness"]) == 4


def tiny_conv() -> torch.nn.Module:
    """A conv + linear model for 1x8x8 inputs and 3 classes, from seed 0, in eval mode."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 3)
    ).eval()


def test_the_engine_returns_data_and_the_report_draws_it(tmp_path):
    model = tiny_conv()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    record = assess(
        model, x, None, ["saliency", "gradcam"], ["deletion_auc", "sparseness", "model_randomisation"],
        model_name="tiny", metric_params={"n_steps": 4}, n_examples=2,
    )  # fmt: skip
    # data only: per-image scores, curves, sanity, agreement; the summary is the per-image scores' summary
    assert set(record.per_image) == {"saliency", "gradcam"} and len(record.curves["gradcam"]["deletion"]) == 5
    expected = summarise({m: torch.tensor(v) for m, v in record.per_image["saliency"].items()})
    assert record.quality()["saliency"] == expected
    assert record.sanity_maps["saliency"].shape[:2] == (len(record.sanity["saliency"].layers) + 1, 2)
    assert record.agreement is not None and record.agreement.methods == ("saliency", "gradcam")
    assert Assessment.from_json(json.loads(json.dumps(record.to_json()))) == record
    write_assessment(record, tmp_path)
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 6 + 1 and {r["better"] for r in rows} == {"lower", "higher"}  # + deletion's chance
    assert [r["metric"] for r in rows if r["method"] == "chance (random maps)"] == ["deletion_auc"]
    assert (tmp_path / "per_image.csv").read_text().count("\n") == 1 + 2 * 5
    for name in ("deletion_insertion", "sanity_check", "sanity_maps_gradcam", "agreement"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="version"):
        Assessment.from_json({**record.to_json(), "version": 99})


def test_the_chance_level_is_the_metrics_on_seeded_noise_and_a_faithful_map_beats_it():
    """``Assessment.chance``: deletion and insertion of seeded uniform-noise maps (known answer: the same as
    scoring ``chance_maps`` directly), none for map-only metrics; on a model that reads one pixel, saliency
    (all mass on that pixel) deletes the evidence at the first step and beats chance by far."""
    from torch import nn

    from xailab.metrics import evaluate_explanations
    from xailab.metrics.assessment import chance_maps

    one_pixel = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False))
    with torch.no_grad():
        one_pixel[1].weight.zero_()
        one_pixel[1].weight[0, 0] = 4.0  # class 0's logit is 4 x pixel (0, 0); class 1's is 0
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)) + 1.0  # pixel (0,0) > 0: class 0
    metrics = ["deletion_auc", "insertion_auc", "sparseness"]
    record = assess(one_pixel, x, None, ["saliency"], metrics, metric_params={"n_steps": 16}, seed=3)
    assert set(record.chance) == {"deletion_auc", "insertion_auc"}  # not sparseness: noise says nothing there
    direct = evaluate_explanations(
        one_pixel, x, None, chance_maps(x, 3), metrics=["deletion_auc"], n_steps=16
    )
    assert record.chance["deletion_auc"]["mean"] == pytest.approx(
        direct["deletion_auc"].mean().item(), abs=1e-6
    )
    assert len(record.chance_curves["deletion"]) == 17
    saliency = record.quality()["saliency"]["deletion_auc"]["mean"]
    assert saliency < record.chance["deletion_auc"]["mean"] - 0.2  # the pixel goes at step 1, not at random
    assert assess(one_pixel, x, None, ["saliency"], metrics, with_chance=False).chance == {}
    old = {k: v for k, v in record.to_json().items() if k not in ("chance", "chance_curves")}
    assert Assessment.from_json(old).chance == {}  # scores.json written before the chance level


def test_legends_name_the_parameters_the_user_set():
    """Two assessments of lrp under two composites must not both read "lrp" in the sanity figure."""
    from xailab.report.assessment import curves_figure, sanity_figure

    model = tiny_conv()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    record = assess(
        model, x, None, ["lrp", "saliency"], ["deletion_auc", "model_randomisation"], n_examples=1,
        method_params={"lrp": {"composite": "epsilon"}}, metric_params={"n_steps": 4},
    )  # fmt: skip
    assert record.method_labels == {"lrp": "lrp (composite=epsilon)", "saliency": "saliency"}
    assert (
        Assessment.from_json(json.loads(json.dumps(record.to_json()))).method_labels == record.method_labels
    )
    old = {k: v for k, v in record.to_json().items() if k != "method_labels"}  # records written before labels
    assert Assessment.from_json(old).method_labels == {}
    for figure in (
        sanity_figure(record.sanity, record.method_labels),
        curves_figure(record.curves, record.method_labels),
    ):
        texts = {t.get_text() for t in figure.axes[0].get_legend().get_texts()}
        assert texts == {"lrp (composite=epsilon)", "saliency"}


def _assess_tiny(model, x, parts, **overrides):
    kwargs = dict(
        model_name="tiny", metric_params={"n_steps": 4}, n_examples=2, resume_dir=parts,
        method_params={"smoothgrad": {"n_samples": 4}},
    )  # fmt: skip
    metrics = ["deletion_auc", "sparseness", "model_randomisation"]
    return assess(model, x, None, ["saliency", "smoothgrad"], metrics, **{**kwargs, **overrides})


def test_a_killed_assessment_resumes_at_the_method_it_was_on(tmp_path, monkeypatch):
    """The first run dies inside its second method; the rerun reads the first method's part (no
    explanation, no metric of it is computed again), computes the second, and the record equals an
    uninterrupted run's."""
    model, parts = tiny_conv(), tmp_path / "parts"
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = _assess_tiny(model, x, None)
    ExplainCalls(monkeypatch, die_at=2)  # killed inside the second method
    with pytest.raises(KeyboardInterrupt):
        _assess_tiny(model, x, parts)
    assert sorted(p.name for p in parts.iterdir()) == ["saliency.json", "saliency.safetensors"]
    calls = ExplainCalls(monkeypatch)
    resumed = _assess_tiny(model, x, parts)
    assert calls.count == 1  # smoothgrad only: saliency came from its part
    assert resumed.per_image == whole.per_image and resumed.curves == whole.curves
    assert resumed.sanity == whole.sanity and resumed.scores == whole.scores
    assert all(torch.equal(resumed.maps[m], whole.maps[m]) for m in whole.maps)
    assert all(torch.equal(resumed.sanity_maps[m], whole.sanity_maps[m]) for m in whole.sanity_maps)


@pytest.mark.parametrize("change", ["weights", "inputs", "seed", "method_params", "unreadable"])
def test_a_part_of_another_request_or_unreadable_is_computed_again(tmp_path, monkeypatch, change):
    model, parts = tiny_conv(), tmp_path / "parts"
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _assess_tiny(model, x, parts)
    overrides: dict = {}
    if change == "weights":
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] += 1.0
    elif change == "inputs":
        x = x.clone()
        x[0, 0, 0, 0] += 1.0
    elif change == "seed":
        overrides["seed"] = 1
    elif change == "method_params":
        overrides["method_params"] = {"smoothgrad": {"n_samples": 5}}
    else:
        (parts / "saliency.safetensors").write_bytes(b"not a safetensors file")
    calls = ExplainCalls(monkeypatch)
    _assess_tiny(model, x, parts, **overrides)
    expected = {"weights": 2, "inputs": 2, "seed": 2, "method_params": 1, "unreadable": 1}[change]
    assert calls.count == expected


def test_finished_parts_names_methods_as_given_and_skips_unreadable_files(tmp_path):
    """The part files' names are made file-safe (``captum_Saliency``); what a user is told is the method's own
    name, read from the part."""
    from xailab.api import ASSESS_PARTS_DIR, unfinished_assessment
    from xailab.metrics.assessment import MethodPart, finished_parts, save_part

    parts = tmp_path / ASSESS_PARTS_DIR
    parts.mkdir()
    part = MethodPart(1.0, {}, {}, None, torch.zeros(1, 1, 2, 2), None)
    for method in ("saliency", "captum:Saliency"):
        save_part(parts, method, "key", part)
    (parts / "broken.json").write_text("{not json")
    assert sorted(p.name for p in parts.glob("*.json")) == [
        "broken.json",
        "captum_Saliency.json",
        "saliency.json",
    ]
    assert finished_parts(parts) == unfinished_assessment(tmp_path) == ["captum:Saliency", "saliency"]
    assert finished_parts(tmp_path / "none") == []


def test_assess_resumes_a_killed_run_says_so_and_removes_its_parts(digits_run, tmp_path, monkeypatch, capsys):
    from xailab.api import ASSESS_PARTS_DIR

    out = tmp_path / "a"
    argv = ["assess", str(digits_run), "--n", "3", "--methods", "saliency,gradcam", "--metrics", "sparseness"]
    ExplainCalls(monkeypatch, die_at=2)
    assert main([*argv, "--out", str(out)]) != 0  # Ctrl-C: the CLI stops with a message, no traceback
    assert (out / ASSESS_PARTS_DIR / "saliency.json").is_file()
    calls = ExplainCalls(monkeypatch)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming: finished before: saliency" in capsys.readouterr().err
    assert calls.count == 1  # gradcam only
    assert (out / "scores.json").is_file() and not (out / ASSESS_PARTS_DIR).exists()


@pytest.mark.parametrize(
    ("stages", "columns", "expected"),
    [(106, 12, [0, 10, 19, 29, 38, 48, 57, 67, 76, 86, 95, 105]), (5, 12, [0, 1, 2, 3, 4]), (2, 8, [0, 1])],
)
def test_cascade_stages_spread_evenly_and_keep_both_ends(stages, columns, expected):
    from xailab.report.assessment import cascade_stages

    assert cascade_stages(stages, columns) == expected


def test_a_deep_cascade_draws_at_most_twelve_readable_columns():
    """MobileNetV2's 105 randomised layers drew 106 columns too thin to see: 12 are drawn, first the trained
    model's maps, last every layer random, each named by how many layers are random and the last one."""
    import numpy as np

    from xailab.report.assessment import sanity_maps_figure

    layers = [f"features.{i}" for i in range(105)]
    maps = np.random.default_rng(0).random((106, 3, 1, 16, 16))
    fig = sanity_maps_figure("guided_backprop", maps, layers)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == 12
    assert labels[0] == "original" and labels[-1] == "105 random\n(to features.104)"
    assert labels[1] == "10 random\n(to features.9)"
    assert ax.images[0].get_array().shape == (3 * 16 + 2 * 2, 12 * 16 + 11 * 2)  # 3 images x 12 stages
