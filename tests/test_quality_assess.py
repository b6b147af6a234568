"""``xailab assess``: a run's explanations scored, tabulated and drawn, and clear errors for bad names."""

from __future__ import annotations

import csv
import json

import pytest

from xailab.cli import main


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
    }
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
