"""The command line: each command on real bundled data, and clear errors instead of tracebacks."""

from __future__ import annotations

import csv
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from xailab import api, load_dataset
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


def test_train_help_gives_the_recipe_defaults(capsys):
    # the dataclass defaults (Adam 1e-3) hold only without a recipe: the help must not present them as the
    # default a user gets on CIFAR-10
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--lr LR base (peak, for onecycle) learning rate (default: by the data's recipe: digits 0.003, "
        in text
    )
    assert "natural 0.1, xray 0.001; without one: 0.001)" in text
    assert "natural sgd" in text


def test_xailab_warnings_print_as_one_line(capsys, tmp_path):
    # a warning of xailab's own (here: a rate 200x from the recipe's) reads like its errors: one line, no
    # Python source location or code line under it
    code = main(
        [
            "train",
            "--model",
            "mnist_cnn",
            "--dataset",
            "mnist",
            "--lr",
            "0.6",
            "--epochs",
            "0",
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("xailab: warning: train.lr=0.6 is 200x above the digits recipe's rate")
    assert lines[1] == "xailab: error: train.epochs: 0 is out of range; valid: in [1, 100000]"
    assert len(lines) == 2


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


# ------------------------------------------------------------------- every bad value is one clear line
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch mnist_cnn run on 128 bundled digits (a few seconds), shared by the error tests."""
    out = tmp_path_factory.mktemp("cli_runs")
    assert main(["train", "--model", "mnist_cnn", "--dataset", "digits", "--epochs", "1", "--train-limit",
                 "128", "--precision", "fp32", "--out", str(out), "--name", "r"]) == 0  # fmt: skip
    return out / "r"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels over a tiny compressed body."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


TRAIN = ["train", "--model", "mnist_cnn", "--dataset", "digits", "--epochs", "1", "--train-limit", "64"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "1"], "train.image_size: 1 is out of range"),
        (["--image-size", "0"], "train.image_size: 0 is out of range"),
        (["--eval-batch-size", "0"], "train.eval_batch_size: 0 is out of range"),
        (["--weight-decay", "-1"], "train.weight_decay: -1.0 is out of range; valid: >= 0"),
        (["--momentum", "-0.5"], "train.momentum: -0.5 is out of range"),
        (["--device", "banana"], "device 'banana' is not a device"),
        (["--model-option", "dropout=abc"], "option dropout: expected float, got 'abc'"),
        (["--dataset-option", "foo=1"], "dataset 'digits' has no option 'foo'"),
        (["--dataset-option", "downlaod=true"], "Did you mean 'download'"),
        (["--name", "../../escaped"], "'../../escaped' cannot be a folder name"),
    ],
)
def test_bad_training_values_are_one_clear_line_and_leave_no_run(flags, message, tmp_path, capsys):
    assert main([*TRAIN, "--out", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("config.json"))  # nothing that blocks a rerun (or escapes --out)


def test_cuda_on_a_machine_without_it_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # CI runs on CPUs, where this is the case tested
    assert main([*TRAIN, "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'cuda' is not available on this machine" in err and "valid here: auto, cpu" in err


@pytest.mark.parametrize("value", ["²", "٣", "1_0", "nan", "inf"])
def test_numbers_are_parsed_strictly(value, tmp_path, capsys):
    """``"²".isdigit()`` is True and ``int("٣")`` is 3 in Python; only ASCII numbers are numbers here."""
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN, "--out", str(tmp_path), "--lr" if value in ("nan", "inf") else "--epochs", value])
    assert exit_info.value.code == 2
    assert "expected a" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "{run}", "{bomb}"], "refused as a decompression bomb"),
        (["predict", "{run}", "{big}"], "36,000,000 pixels, over the limit"),
        (["predict", "{run}", "{digit}", "--top-k", "-3"], "predict.top_k: -3 is out of range"),
        (["predict", "{run}", "{digit}", "--top-k", "0"], "predict.top_k: 0 is out of range"),
        (["evaluate", "{run}", "--split", "foo"], "has no split 'foo'; valid splits: test, train"),
        (["explain", "{run}", "--batch-size", "0"], "explain.batch_size: 0 is out of range"),
        (["explain", "{run}", "--n", "0"], "explain.n: 0 is out of range"),
        (["explain", "{run}", "--split", "foo", "--n", "2"], "has no split 'foo'"),
        (["explain", "{run}", "--methods", "saliency", "--method-option", "n_steps=4"], "none of the chosen"),
        (
            ["explain", "{run}", "--methods", "integrated_gradients", "--method-option", "n_step=4"],
            "Did you mean 'n_steps'",
        ),
        (
            ["explain", "{run}", "--methods", "integrated_gradients", "--method-option", "n_steps=abc"],
            "n_steps: int = 50 cannot take 'abc'",
        ),
        (["explain", "{run}", "--method-option", "noequals"], "expects [METHOD.]KEY=VALUE"),
        (["assess", "{run}", "--n", "0"], "assess --n: 0 is out of range"),
        (
            ["assess", "{run}", "--metric-precision", "fast"],
            "assess --metric-precision: 'fast' is not valid; choose one of 'fp32', 'bf16', 'auto'",
        ),
        (["assess", "{run}", "--methods", "saliency", "--method-option", "gradcam.x=1"], "not among"),
    ],
)
def test_bad_values_of_the_other_commands_are_one_clear_line(argv, message, tiny_run, tmp_path, capsys):
    test = load_dataset("digits")["test"]
    files = {"bomb": bomb_png(100_000, 100_000), "big": bomb_png(6_000, 6_000)}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    Image.fromarray(test.images[0, :, :, 0].numpy()).save(tmp_path / "digit.png")
    paths = {k: str(tmp_path / f"{k}.png") for k in ("bomb", "big", "digit")}
    argv = [a.format(run=tiny_run, **paths) for a in argv]
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("explain", "assess") else []
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_method_options_reach_the_methods(tiny_run, tmp_path):
    """``--method-option`` values are the method's parameters: the saved maps equal the API's with them."""
    from safetensors.torch import load_file

    from xailab.data import sample_indices

    argv = ["explain", str(tiny_run), "--n", "3", "--methods", "integrated_gradients,saliency"]
    options = ["--method-option", "integrated_gradients.method=riemann_left", "--method-option", "n_steps=4"]
    assert main([*argv, *options, "--out", str(tmp_path / "ex")]) == 0
    saved = load_file(str(next((tmp_path / "ex" / "attributions").glob("*.safetensors"))))
    run = api.load_run(tiny_run)
    test = load_dataset("digits", image_size=run.image_size)["test"]
    images = test.images[sample_indices(test.labels, 3)]  # the default sample: the classes in turn
    expected = api.explain_images(
        run, images, "integrated_gradients", params={"n_steps": 4, "method": "riemann_left"}
    )
    key = next(k for k in saved if "integrated_gradients" in k)
    torch.testing.assert_close(saved[key].reshape(expected.shape).float(), expected, rtol=1e-4, atol=1e-6)


def test_a_study_named_to_escape_its_folder_is_refused(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: ../../escaped_study\ndatasets: [digits]\nmodels: [mnist_cnn]\nmethods: [saliency]\n"
        "train: {epochs: 1}\n"
    )
    out = tmp_path / "a" / "b" / "runs"
    assert main(["run", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "name: '../../escaped_study' cannot be a folder name" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "escaped_study").exists() and not list(tmp_path.rglob("study.json"))


def test_a_misspelt_study_dataset_option_is_refused(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: s\ndatasets: [csv_folder]\nmodels: [mnist_cnn]\nmethods: [saliency]\n"
        "dataset_options: {csv_folder: {test_fracton: 0.3}}\n"
    )
    assert main(["run", str(study), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "dataset_options.csv_folder: dataset 'csv_folder' has no option 'test_fracton'" in err
    assert "Did you mean 'test_fraction'" in err


def test_explain_and_assess_folders_are_locked_and_never_mixed(tiny_run, tmp_path, capsys):
    """A folder another process writes is refused (one line naming it, exit 2), for ``explain`` and ``assess``;
    ``explain`` into a folder of other explanations is refused instead of mixing (or silently reusing) them,
    and the same explanations again reuse the folder."""
    from xailab.io import folder_lock

    out = tmp_path / "e"
    first = ["explain", str(tiny_run), "--methods", "saliency", "--n", "4", "--out", str(out)]
    assert main(first) == 0
    again = [[*first[:-2], "--split", "train", "--out", str(out)], [*first[:3], "gradcam", *first[4:]]]
    for argv in again:  # other images; another method
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"the output folder {out} (out_dir, --out) already holds explanations" in err
        assert "Traceback" not in err
    assert main(first) == 0  # the same job: its parts are read back
    for command, kind in (("explain", "explanation folder"), ("assess", "assessment folder")):
        busy = tmp_path / f"busy-{command}"
        with folder_lock(busy, "held by a test"):
            code = main([command, str(tiny_run), "--methods", "saliency", "--n", "2", "--out", str(busy)])
        err = capsys.readouterr().err
        assert code == 2 and f"the {kind} {busy} is in use by another xailab process" in err
        assert "Traceback" not in err and not (busy / "index.csv").exists()


def test_explain_and_assess_take_a_balanced_sample_unless_told_first(tiny_run, tmp_path, capsys):
    """``--sample`` (default balanced: the classes in turn) decides which test images are explained and
    assessed; index.csv names them by their index in the split; a bad value is one line."""
    from xailab.data import sample_indices

    labels = load_dataset("digits")["test"].labels
    for how in ("balanced", "first"):
        out = tmp_path / how
        flags = [] if how == "balanced" else ["--sample", "first"]
        assert (
            main(["explain", str(tiny_run), "--methods", "saliency", "--n", "5", *flags, "--out", str(out)])
            == 0
        )
        names = [r[0] for r in list(csv.reader((out / "index.csv").open()))[1:]]
        assert names == [f"test-{i}" for i in sample_indices(labels, 5, how).tolist()]
    assert names == [f"test-{i}" for i in range(5)]  # the last: first
    balanced = [r[1] for r in list(csv.reader((tmp_path / "balanced" / "index.csv").open()))[1:]]
    assert len(set(balanced)) == 5  # five images, five classes
    assessed = tmp_path / "assessed"
    assert main(["assess", str(tiny_run), "--methods", "saliency", "--metrics", "sparseness", "--n", "3",
                 "--out", str(assessed)]) == 0  # fmt: skip
    rows = list(csv.DictReader((assessed / "per_image.csv").open()))
    assert [int(r["image"]) for r in rows] == sample_indices(labels, 3).tolist()  # named by test index
    assert (
        json.loads((assessed / "scores.json").read_text())["image_ids"] == sample_indices(labels, 3).tolist()
    )
    assert main(["assess", str(tiny_run), "--methods", "saliency", "--metrics", "sparseness", "--n", "3",
                 "--sample", "random", "--out", str(tmp_path / "a")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "assess --sample: 'random' is not valid; choose one of 'balanced', 'first'" in err
    assert "Traceback" not in err


def test_mnist_error_names_the_real_download_option(tmp_path, capsys):
    argv = ["train", "--model", "mnist_cnn", "--dataset", "mnist", "--out", str(tmp_path / "runs")]
    assert main([*argv, "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "--dataset-option download=true" in err and "run with --download" not in err


def test_a_bad_metric_precision_is_one_line_naming_the_flag_before_any_work(tiny_run, tmp_path, capsys):
    assert main(["assess", str(tiny_run), "--metric-precision", "bf32", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "xailab: error: assess --metric-precision: 'bf32' is not valid; choose one of 'fp32', 'bf16', 'auto'"
    )
    assert not (tmp_path / "a").exists()


def test_metric_precision_reaches_the_assessment_and_auto_without_autotuning_is_exact(
    tiny_run, tmp_path, monkeypatch
):
    """``--metric-precision`` is the ``precision`` of ``xailab.metrics.assess``; with the autotuner off,
    ``auto`` follows the fixed rule (bf16 only on a CPU with native bf16), so its numbers equal those of that
    precision named explicitly -- fp32, the default's, on an AVX2 machine; bf16 on an AVX-512 BF16 one."""
    import xailab.api
    from xailab.device import bf16_is_fast

    seen: list[str] = []
    real = xailab.api.assess

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(xailab.api, "assess", spy)
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")
    argv = [
        "assess",
        str(tiny_run),
        "--n",
        "4",
        "--methods",
        "saliency",
        "--metrics",
        "deletion_auc,sparseness",
    ]
    rule = "bf16" if bf16_is_fast(torch.device("cpu")) else "fp32"
    scores = {}
    for flags in ([], ["--metric-precision", "auto"], ["--metric-precision", rule]):
        out = tmp_path / ("-".join(flags) or "default")
        assert main([*argv, *flags, "--out", str(out)]) == 0
        scores[out.name] = json.loads((out / "scores.json").read_text())["per_image"]
    assert seen == ["fp32", "auto", rule]
    assert scores["--metric-precision-auto"] == scores[f"--metric-precision-{rule}"]
    assert (scores["--metric-precision-auto"] == scores["default"]) == (rule == "fp32")
    assert len(scores["default"]["saliency"]["deletion_auc"]) == 4


def test_lrp_z_box_bounds_of_an_assessment_are_the_datasets_unless_given(tiny_run, tmp_path, monkeypatch):
    """An assessment of a run with a z-B composite bounds the input layer by the dataset's normalised data
    range (``box_bounds(mean, std)``): its maps are those of an explicit call with those bounds; bounds the
    user gives win."""
    import xailab.api
    from xailab.data.transforms import sample_indices, to_model_input
    from xailab.explain.lrp import box_bounds

    calls: list[tuple[dict, dict]] = []
    real = xailab.api.assess

    def spy(*args, **kwargs):
        record = real(*args, **kwargs)
        calls.append((kwargs["method_params"], dict(record.maps)))
        return record

    monkeypatch.setattr(xailab.api, "assess", spy)
    run = api.load_run(tiny_run)
    low, high = box_bounds(run.mean, run.std)
    common = {"methods": ["lrp"], "metrics": ["sparseness"], "n": 3}
    api.assess_run(
        tiny_run, tmp_path / "a", method_params={"lrp": {"composite": "epsilon_gamma_box"}}, **common
    )
    params, maps = calls[-1]
    assert params["lrp"]["low"] == pytest.approx(low.tolist()) and params["lrp"]["high"] == pytest.approx(
        high.tolist()
    )
    test = load_dataset("digits", image_size=run.image_size)["test"]
    x = to_model_input(test.images[sample_indices(test.labels, 3)], run.mean, run.std)
    expected = api.explain(run.model, x, "lrp", composite="epsilon_gamma_box", low=low, high=high)
    torch.testing.assert_close(maps["lrp"], expected, rtol=1e-5, atol=1e-7)
    mine = {"composite": "epsilon_gamma_box", "low": -5.0, "high": 5.0}
    api.assess_run(tiny_run, tmp_path / "b", method_params={"lrp": mine}, **common)
    assert (calls[-1][0]["lrp"]["low"], calls[-1][0]["lrp"]["high"]) == (-5.0, 5.0)
