"""The command line: each command on real bundled data, and clear errors instead of tracebacks."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from xailab import load_dataset
from xailab.cli import main


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("mobilenetv2", "efficient_cnn", "resnet18", "mnist_cnn", "transfer_ensemble"):
        assert name in out
    assert "11,173,962" in out  # resnet18


def test_datasets_table(capsys, tmp_path):
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "mnist" in out


def test_train_runs_evaluate_predict(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("model: mnist_cnn\ndataset: digits\nepochs: 2\nbatch_size: 64\nprecision: fp32\n")
    out = tmp_path / "runs"
    assert main(["train", "--config", str(cfg), "--lr", "0.003", "--out", str(out), "--name", "d"]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text
    meta = json.loads((out / "d" / "config.json").read_text())
    assert meta["train"]["lr"] == 0.003 and meta["train"]["epochs"] == 2 and meta["status"] == "finished"

    assert main(["runs", "--out", str(out)]) == 0
    assert "mnist_cnn" in capsys.readouterr().out

    assert main(["evaluate", str(out / "d")]) == 0
    assert "accuracy" in capsys.readouterr().out

    test = load_dataset("digits")["test"]
    png = tmp_path / "digit.png"
    Image.fromarray(test.images[0, :, :, 0].numpy()).save(png)
    assert main(["predict", str(out / "d"), str(png)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(str(png)) and line.count(" 0.") + line.count(" 1.0") == 3

    # Resume a finished run with more epochs: it continues from epoch 2.
    assert main(["train", "--resume", str(out / "d"), "--epochs", "3"]) == 0
    assert len(json.loads((out / "d" / "history.json").read_text())) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "resnet81", "--dataset", "digits"], "Did you mean 'resnet18'"),
        (["train", "--model", "resnet18", "--dataset", "mnits"], "Did you mean 'mnist'"),
        (["train", "--model", "resnet18"], "--dataset is required"),
        (["train", "--model", "keras_cnn", "--dataset", "digits", "--model-option", "stride=7"], "stride"),
        (["evaluate", "no/such/run"], "not a run folder"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_config_file_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('model = "mnist_cnn"\ndataset = "digits"\nlearning_rate = 0.1\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_predict_rejects_a_non_image_with_a_clear_error(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "mnist_cnn",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--train-limit",
                "128",
                "--out",
                str(tmp_path),
                "--name",
                "r",
            ]
        )
        == 0
    )
    bogus = tmp_path / "x.png"
    bogus.write_bytes(b"not an image")
    assert main(["predict", str(tmp_path / "r"), str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "x.png: not a readable image" in err and "Traceback" not in err
