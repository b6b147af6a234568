"""Explaining to disk: streamed attribution parts, index CSV, figures, resume, and the `xailab explain` CLI."""

from __future__ import annotations

import csv

import torch
from PIL import Image
from safetensors.torch import load_file

from xailab import explain_run, train
from xailab.cli import main
from xailab.explain import export
from xailab.explain.export import explain_to_disk
from xailab.explain.figures import normalise_map
from xailab.models import create_model


def test_normalise_map_known_answers():
    signed = torch.tensor([[-4.0, 2.0], [0.0, 1.0]])
    torch.testing.assert_close(normalise_map(signed, percentile=100), torch.tensor([[1.0, 0.5], [0.0, 0.25]]))
    offset = torch.tensor([[10.0, 12.0], [11.0, 14.0]])  # a common offset (RISE, Score-CAM) is removed
    torch.testing.assert_close(normalise_map(offset, percentile=100), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    spiky = torch.zeros(10, 10)
    spiky[0, 0], spiky[5, 5] = 1000.0, 1.0  # one extreme pixel is clipped, the rest stays visible
    assert normalise_map(spiky, percentile=98)[5, 5] == 1.0
    assert normalise_map(torch.zeros(3, 3)).sum() == 0


def test_explain_to_disk_streams_parts_and_resumes(tmp_path, digits, monkeypatch):
    torch.manual_seed(0)
    model = create_model("mnist_cnn", in_channels=1, num_classes=10).eval()
    test = digits["test"]
    args = (model, test.images[:5], digits.mean, digits.std, digits.class_names, ["saliency", "gradcam"])
    options = {"labels": test.labels[:5], "batch_size": 2, "panels": 3}
    out = explain_to_disk(*args, tmp_path / "x", **options)
    parts = sorted((out / "attributions").glob("part-*.safetensors"))
    assert len(parts) == 3
    first = load_file(str(parts[0]))
    assert first["saliency"].shape == (2, 1, 28, 28) and first["gradcam"].shape == (2, 1, 28, 28)
    assert first["top_index"].shape == (2, 3) and torch.equal(first["index"], torch.tensor([0, 1]))
    rows = list(csv.reader((out / "index.csv").open()))
    assert rows[0] == ["image", "label", "prediction", "confidence"] and len(rows) == 6
    assert rows[1][1] == digits.class_names[int(test.labels[0])]
    for png in [out / "grid.png", *(out / "panels" / f"{i}.png" for i in range(3))]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100
    assert not (out / "panels" / "3.png").exists()
    with Image.open(out / "grid.png") as grid:
        # five images: five columns (1.6 in each at 110 dpi), not eight with three blank
        assert grid.width <= 5 * 1.6 * 110 + 1

    # A second call finds every part on disk and recomputes nothing.
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a finished part")

    monkeypatch.setattr(export, "explain", fail)
    (out / "index.csv").unlink()
    explain_to_disk(*args, tmp_path / "x", **options)
    assert list(csv.reader((out / "index.csv").open())) == rows


def test_a_folder_of_other_explanations_is_refused_before_any_work(tmp_path, digits, monkeypatch):
    """Parts are reused only when their key says they are this job's: other images, another method or its
    parameters, fewer images (a leftover part) or other weights are refused, naming the folder and the part,
    before anything is computed (they were silently read back as this job's maps before)."""
    import pytest

    from xailab.errors import ConfigError

    torch.manual_seed(0)
    model = create_model("mnist_cnn", in_channels=1, num_classes=10).eval()
    images = digits["test"].images
    common = (digits.mean, digits.std, digits.class_names)
    out = explain_to_disk(model, images[:4], *common, ["saliency"], tmp_path / "x", batch_size=2)
    other = create_model("mnist_cnn", in_channels=1, num_classes=10).eval()  # other random weights
    cases = [
        (model, images[4:8], ["saliency"], {}),
        (model, images[:4], ["gradcam"], {}),
        (model, images[:4], ["saliency"], {"saliency": {"abs": False}}),
        (model, images[:2], ["saliency"], {}),  # part-00001 is no part of this job
        (other, images[:4], ["saliency"], {}),
    ]

    def fail(*args, **kwargs):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(export, "explain", fail)
    for net, x, methods, params in cases:
        with pytest.raises(
            ConfigError, match=r"already holds explanations of other .*attributions/part-0000"
        ):
            explain_to_disk(net, x, *common, methods, out, batch_size=2, params=params)
    explain_to_disk(model, images[:4], *common, ["saliency"], out, batch_size=2)  # this job: read back


def test_explain_a_trained_run_and_user_images(tmp_path, digits):
    run = train(
        {"model": "mnist_cnn", "dataset": "digits", "epochs": 3, "batch_size": 32, "precision": "fp32"},
        out_dir=tmp_path,
        dataset=digits,
        progress=False,
    )
    out = explain_run(run, tmp_path / "e", methods=["integrated_gradients"], n=4)
    rows = list(csv.reader((out / "index.csv").open()))[1:]
    agree = sum(r[1] == r[2] for r in rows)
    assert len(rows) == 4 and agree >= 3  # a trained model gets most of these digits right
    png = tmp_path / "mine.png"
    Image.fromarray(digits["test"].images[0, :, :, 0].numpy()).save(png)
    out = explain_run(run.path, tmp_path / "u", methods=["gradcam"], image_files=[png])
    assert list(csv.reader((out / "index.csv").open()))[1][0] == "mine.png"


def test_cli_untrained_demo_and_unknown_method(tmp_path, capsys):
    assert (
        main(
            [
                "explain",
                "--model",
                "mnist_cnn",
                "--untrained",
                "--methods",
                "saliency,occlusion",
                "--n",
                "2",
                "--out",
                str(tmp_path / "demo"),
            ]
        )
        == 0
    )
    assert (tmp_path / "demo" / "panels" / "1.png").is_file()
    assert (
        main(
            ["explain", "--model", "mnist_cnn", "--untrained", "--methods", "gradcan", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "Did you mean 'gradcam'" in capsys.readouterr().err
    assert main(["explain", "--out", str(tmp_path)]) == 2
