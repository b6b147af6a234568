"""Training engine: learning on real (bundled) data, exact resume, divergence, schedules, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import StopAfter
from xailab import TrainConfig, load_dataset, load_run, train
from xailab.errors import CheckpointError, ConfigError, TrainingDiverged
from xailab.train.loop import _epoch_order, autocast_dtype, config_hash
from xailab.train.schedules import Plateau, lr_factor


def small(**kw) -> TrainConfig:
    base = dict(model="mnist_cnn", dataset="digits", epochs=3, batch_size=64, precision="fp32", seed=0)
    return TrainConfig(**{**base, **kw})


def test_learns_digits_and_writes_the_run_folder(tmp_path, digits):
    run = train(
        small(epochs=4, schedule="onecycle", lr=3e-3), out_dir=tmp_path, dataset=digits, progress=False
    )
    files = {p.name for p in run.path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "checkpoint.safetensors",
        "history.csv",
        "history.json",
        "metrics.json",
        "predictions.csv",
    } <= files
    assert run.metrics["test"]["accuracy"] > 0.9  # 360 held-out digits
    assert len(run.history) == 4 and run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    lines = (run.path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "index,true,predicted,confidence,top3" and len(lines) == 1 + len(digits["test"])
    # The run folder reloads without pickle and gives the same predictions.
    again = load_run(run.path)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(again.model(x), run.model.eval()(x), atol=1e-5)


def test_best_weights_are_restored(tmp_path, digits):
    run = train(
        small(epochs=3, lr=3e-3, monitor="val_accuracy"), out_dir=tmp_path, dataset=digits, progress=False
    )
    best = run.metrics["best_epoch"]
    assert run.history[best - 1]["val_accuracy"] == max(r["val_accuracy"] for r in run.history)
    saved = load_file(str(run.path / "model.safetensors"))
    for k, v in run.model.state_dict().items():
        assert torch.equal(saved[k], v.contiguous()), k


@pytest.mark.parametrize("schedule", ["plateau", "onecycle"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, digits, schedule):
    cfg = small(epochs=3, train_limit=512, deterministic=True, schedule=schedule, label_smoothing=0.1)
    full = train(cfg, out_dir=tmp_path, name="full", dataset=digits, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path, name="killed", dataset=digits, progress=False, callbacks=[StopAfter(1)])
    assert len(load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))) > 0
    resumed = train(cfg, out_dir=tmp_path, name="killed", dataset=digits, progress=False, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]


def test_existing_run_is_not_overwritten(tmp_path, digits):
    train(small(epochs=1, train_limit=128), out_dir=tmp_path, name="r", dataset=digits, progress=False)
    with pytest.raises(CheckpointError, match="resume"):
        train(small(epochs=1, train_limit=128), out_dir=tmp_path, name="r", dataset=digits, progress=False)


def test_resume_refuses_another_recipe(tmp_path, digits):
    train(small(epochs=1, train_limit=128), out_dir=tmp_path, name="r", dataset=digits, progress=False)
    with pytest.raises(CheckpointError, match="another recipe"):
        train(
            small(epochs=2, train_limit=128, lr=0.1),
            out_dir=tmp_path,
            name="r",
            dataset=digits,
            progress=False,
            resume=True,
        )


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    class Poison:
        def on_train_begin(self, info):
            self.model = info["model"]

        def on_epoch_end(self, row):
            if row["epoch"] == 1:  # corrupt the live model after epoch 1 was checkpointed
                with torch.no_grad():
                    next(self.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="epoch 2"):
        train(
            small(epochs=3, train_limit=256),
            out_dir=tmp_path,
            name="nan",
            dataset=digits,
            progress=False,
            callbacks=[Poison()],
        )
    ckpt = load_file(str(tmp_path / "nan" / "checkpoint.safetensors"))
    assert all(torch.isfinite(v.float()).all() for k, v in ckpt.items() if k.startswith("model."))
    history = (tmp_path / "nan" / "history.json").read_text()
    assert '"epoch": 1' in history and '"epoch": 2' not in history


def test_class_balanced_sampler_draws_classes_equally():
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    order = _epoch_order(labels, "sampler", torch.Generator().manual_seed(0), 2)
    share = labels[order].float().mean().item()
    assert abs(share - 0.5) < 0.05
    perm = _epoch_order(labels, "none", torch.Generator().manual_seed(0), 2)
    assert torch.equal(perm.sort().values, torch.arange(1000))


def test_onecycle_matches_torch():
    total = 50
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total)
    for step in range(total):
        assert math.isclose(lr_factor("onecycle", step, total, 0), opt.param_groups[0]["lr"], rel_tol=1e-9), (
            step
        )
        opt.step()
        sched.step()


def test_cosine_warmup_and_plateau():
    assert lr_factor("cosine", 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor("cosine", 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor("cosine", 99, 100, 10) < 0.001
    p = Plateau(factor=0.5, patience=1)
    scales = [p.update(v) for v in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95)]
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*Did you mean 'epochs'"):
        TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "digits", "epoch": 3})
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "digits", "optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(model="m", dataset="d", epochs=0)
    # The hash ignores where the data lives and the epoch budget, but not the recipe.
    assert config_hash(small(epochs=1)) == config_hash(small(epochs=9, data_dir="/x"))
    assert config_hash(small(lr=0.1)) != config_hash(small())


def test_fp32_is_exact_and_auto_precision_only_uses_bf16_where_fast():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if fast else None)


def test_keras_l2_is_added_to_the_loss(tmp_path):
    rgb = load_dataset("digits", image_size=32, channels=3)

    def conv_norm(weight_decay: float) -> float:
        cfg = TrainConfig(
            model="keras_cnn",
            dataset="digits",
            epochs=1,
            precision="fp32",
            lr=1e-2,
            model_options={"weight_decay": weight_decay},
        )
        run = train(cfg, out_dir=tmp_path, name=f"wd{weight_decay}", dataset=rgb, progress=False)
        return float(
            sum(m.weight.detach().norm() ** 2 for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
        )

    # Keras' kernel_regularizer pulls the conv kernels towards zero; without it they drift freely.
    assert conv_norm(0.5) < 0.7 * conv_norm(0.0)


def test_unknown_model_suggests_the_nearest(tmp_path, digits):
    with pytest.raises(Exception, match="mnist_cnn"):
        train(small(model="mnist_cn"), out_dir=tmp_path, dataset=digits, progress=False)


def test_a_size_dependent_model_is_built_for_the_run_image_size_and_reloads(tmp_path):
    # keras_cnn's dense layer depends on the input size: a 16x16 run must build (and reload) the 16x16 model
    config = TrainConfig(model="keras_cnn", dataset="digits", image_size=16, epochs=1, batch_size=64)
    run = train(config, out_dir=tmp_path, name="k16")
    assert run.model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    reloaded = load_run(tmp_path / "k16")
    x = torch.zeros(2, 1, 16, 16)
    assert reloaded.model(x).shape == (2, 10)
