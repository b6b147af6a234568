"""Default recipes (user keys win, digits never flipped), the weight EMA (known answers) and flip TTA."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import StopAfter
from xailab.errors import ConfigError
from xailab.train import TrainConfig, predict_logits, train
from xailab.train.checkpoint import load_tensors
from xailab.train.ema import WeightEMA, flip_tta
from xailab.train.recipes import DATASET_KINDS, RECIPES, apply_recipe, dataset_kind, scaled_lr

# --------------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["cifar10", "fashion_mnist", "image_folder", "csv_folder", "unlisted"])
def test_natural_images_get_the_natural_recipe(dataset):
    config = apply_recipe({"model": "resnet18", "dataset": dataset})
    assert config["recipe"] == "natural"
    assert config["tta"] == "flip" and config["schedule"] == "onecycle"
    assert config["optimizer"] == "sgd" and config["lr"] == pytest.approx(0.1)
    assert config["label_smoothing"] == 0.1 and 0 < config["ema_decay"] < 1


@pytest.mark.parametrize("dataset", [d for d, kind in DATASET_KINDS.items() if kind == "digits"])
def test_digits_are_never_flipped(dataset):
    config = TrainConfig.from_dict({"model": "mnist_cnn", "dataset": dataset})
    assert config.recipe == "digits"
    assert config.tta == "none"
    assert RECIPES.get("digits").values["tta"] == "none"


def test_xrays_are_never_flipped_and_class_weighted():
    config = TrainConfig.from_dict({"model": "densenet169", "dataset": "chest_xray"})
    assert (config.recipe, config.tta, config.class_balance) == ("xray", "none", "weights")


def test_user_keys_win_over_the_recipe():
    given = {
        "model": "mnist_cnn",
        "dataset": "mnist",
        "schedule": "plateau",
        "lr": 0.0123,
        "label_smoothing": 0.0,
        "ema_decay": 0.0,
        "tta": "flip",  # explicit: the user's choice, even on digits
    }
    config = TrainConfig.from_dict(given)
    for key, value in given.items():
        assert getattr(config, key) == value
    assert config.weight_decay == RECIPES.get("digits").values["weight_decay"]  # not given: the recipe's


def test_recipe_none_keeps_the_dataclass_defaults():
    config = TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "mnist", "recipe": "none"})
    plain = TrainConfig(model="mnist_cnn", dataset="mnist")
    assert config == plain


def test_an_explicit_recipe_overrides_the_dataset_kind():
    config = TrainConfig.from_dict({"model": "resnet18", "dataset": "image_folder", "recipe": "xray"})
    assert (config.recipe, config.tta, config.class_balance) == ("xray", "none", "weights")


def test_batch_size_and_learning_rate_move_together():
    natural = RECIPES.get("natural")
    sgd = apply_recipe({"model": "resnet18", "dataset": "cifar10", "batch_size": 512})
    assert sgd["lr"] == pytest.approx(natural.lr_by_optimizer["sgd"] * 512 / natural.batch_size)  # linear
    adam = apply_recipe({"model": "resnet18", "dataset": "cifar10", "batch_size": 32, "optimizer": "adam"})
    expected = natural.lr_by_optimizer["adam"] * math.sqrt(32 / natural.batch_size)  # square root
    assert adam["lr"] == pytest.approx(expected)
    assert scaled_lr(0.1, 128, 128, "sgd") == 0.1
    # an explicit rate is never rescaled
    assert apply_recipe({"model": "m", "dataset": "cifar10", "batch_size": 512, "lr": 0.3})["lr"] == 0.3


def test_applying_a_recipe_twice_changes_nothing():
    once = TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "cifar10", "batch_size": 64})
    assert TrainConfig.from_dict(once.to_dict()) == once


def test_an_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.recipe: 'fast'.*auto, none, digits, natural, xray"):
        TrainConfig.from_dict({"model": "mnist_cnn", "dataset": "mnist", "recipe": "fast"})


def test_shortcut_takes_the_kind_of_its_base():
    assert dataset_kind("shortcut", {"base": "mnist"}) == "digits"
    assert dataset_kind("shortcut", {"base": "cifar10"}) == "natural"


# --------------------------------------------------------------------------------------------------------
# Weight EMA
# --------------------------------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))


def test_the_ema_of_constant_weights_is_constant():
    model = _net()
    ema = WeightEMA(model, decay=0.9)
    for _ in range(50):
        ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.shadow[k], v, rtol=0, atol=1e-6)


def test_ema_decay_math():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.5)  # the shadow starts as a copy of the weights: 0
    shadow = 0.0
    # warm-up: d_t = min(0.5, (1 + t) / (10 + t)) = 0.1, 2/11, 3/12, 4/13, 5/14, then 0.5 from t = 8 on
    for t, w in enumerate([1.0, 2.0, 4.0, -1.0, 3.0, 0.0, 5.0, 2.0, 7.0, 1.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        d = min(0.5, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        shadow = d * shadow + (1 - d) * w
        assert ema.shadow["weight"].item() == pytest.approx(shadow, abs=1e-6)
    assert ema.updates == 10


def test_ema_copies_integer_buffers_and_swaps_back():
    model = _net()
    ema = WeightEMA(model, decay=0.99)
    model.train()
    model(torch.randn(4, 1, 4, 4))  # num_batches_tracked 0 -> 1, running stats move
    with torch.no_grad():
        model[3].weight.add_(1.0)
    ema.update(model)
    assert int(ema.shadow["1.num_batches_tracked"]) == 1
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model) as swapped:
        torch.testing.assert_close(swapped[3].weight, ema.shadow["3.weight"])
        assert not torch.equal(swapped[3].weight, trained["3.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])


def test_ema_rejects_a_decay_outside_0_1():
    with pytest.raises(ValueError):
        WeightEMA(nn.Linear(1, 1), decay=1.0)


# --------------------------------------------------------------------------------------------------------
# Flip test-time augmentation
# --------------------------------------------------------------------------------------------------------


def test_flip_tta_is_the_mean_of_two_forwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    torch.testing.assert_close(flip_tta(model, x), expected)
    assert not torch.allclose(flip_tta(model, x), model(x))  # the mirror image does change the logits


def test_predict_logits_with_flip_tta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    images = torch.randint(0, 256, (5, 6, 6, 1), dtype=torch.uint8)
    mean, std = (0.5,), (0.25,)
    plain = predict_logits(model, images, mean, std, batch_size=2)
    mirrored = predict_logits(model, images.flip(2), mean, std, batch_size=2)  # [N, H, W, C]: W is dim 2
    torch.testing.assert_close(
        predict_logits(model, images, mean, std, batch_size=2, tta="flip"), (plain + mirrored) / 2
    )


# --------------------------------------------------------------------------------------------------------
# The loop: EMA weights kept when better, checkpointed for an exact resume
# --------------------------------------------------------------------------------------------------------


def test_ema_training_resumes_exactly(tmp_path, single_thread):
    config = TrainConfig.from_dict(
        {
            "model": "mnist_cnn",
            "dataset": "digits",
            "epochs": 2,
            "batch_size": 64,
            "train_limit": 640,
            "image_size": 16,
            "precision": "fp32",
            "deterministic": True,
        }
    )
    assert config.ema_decay > 0 and config.recipe == "digits"
    whole = train(config, out_dir=tmp_path, name="whole", progress=False)
    assert {row["weights"] for row in whole.history} <= {"raw", "ema"}
    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=tmp_path, name="cut", progress=False, callbacks=[StopAfter(1)])
    assert any(
        k.startswith("extra.shadow.") for k in load_tensors(tmp_path / "cut" / "checkpoint.safetensors")
    )
    resumed = train(config, out_dir=tmp_path, name="cut", resume=True, progress=False)
    assert resumed.history == [
        {**r, "seconds": r2["seconds"], "images_per_s": r2["images_per_s"]}
        for r, r2 in zip(whole.history, resumed.history, strict=True)
    ]
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)


def test_validation_chooses_on_plain_logits_and_only_the_test_is_flipped(
    tmp_path, single_thread, monkeypatch
):
    """Flip TTA doubles a forward pass: the per-epoch validation (raw and EMA weights) goes without it, the
    test split, evaluated once, with it."""
    loop = importlib.import_module("xailab.train.loop")  # the package exports a function named train

    flipped: list[int] = []

    def counting_flip_tta(model, x):
        flipped.append(x.shape[0])
        return flip_tta(model, x)

    monkeypatch.setattr(loop, "flip_tta", counting_flip_tta)
    config = TrainConfig.from_dict(
        {
            "model": "mnist_cnn",
            "dataset": "digits",
            "epochs": 2,
            "batch_size": 64,
            "train_limit": 320,
            "image_size": 16,
            "precision": "fp32",
            "tta": "flip",
            "eval_batch_size": 1000,
        }
    )
    assert config.ema_decay > 0
    run = train(config, out_dir=tmp_path, name="tta", progress=False)
    dataset = loop.load_dataset(config.dataset, image_size=16, channels=config.channels)
    assert flipped == [len(dataset["test"])]  # one flipped batch: the test split, after training
    # the history's validation figures are those of the plain logits of the chosen weights
    val = loop._split_train_val(dataset, config)[1]
    assert val is not None and len(val) > 0
    plain = predict_logits(run.model, val.images, run.mean, run.std)
    best = run.history[run.metrics["best_epoch"] - 1]
    assert best["val_accuracy"] == pytest.approx((plain.argmax(1) == val.labels).float().mean().item())


def test_a_rate_tuned_for_another_optimizer_is_warned_about():
    # Adam's 1e-3 on the natural recipe's SGD (0.1 at batch 128): 100x too small, the bundled cifar10-cnn
    # study's old setting
    with pytest.warns(UserWarning, match=r"train\.lr=0\.001 is 100x below the natural recipe's rate.*sgd"):
        apply_recipe({"model": "simple_cnn", "dataset": "cifar10", "lr": 0.001})
    with pytest.warns(UserWarning, match=r"200x above"):
        apply_recipe({"model": "mnist_cnn", "dataset": "mnist", "lr": 0.6})


@pytest.mark.parametrize(
    "data",
    [
        {"model": "simple_cnn", "dataset": "cifar10", "lr": 0.001, "optimizer": "adam"},  # optimiser named
        {"model": "simple_cnn", "dataset": "cifar10", "lr": 0.03},  # within 10x
        {"model": "densenet169", "dataset": "chest_xray", "lr": 1e-4},  # fine-tuning: exactly 10x below
        {"model": "simple_cnn", "dataset": "cifar10", "lr": 0.001, "recipe": "none"},  # no recipe
        {"model": "simple_cnn", "dataset": "cifar10"},  # no rate
    ],
)
def test_a_rate_near_the_recipe_or_with_its_optimizer_is_not_warned_about(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_recipe(data)


def test_every_bundled_study_trains_near_its_recipe_rate():
    # a study that names a rate without an optimiser must not hand it to an optimiser it was not tuned for
    from xailab.study import list_studies, load_study
    from xailab.study.runner import expand_cells

    for name in list_studies():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cells = expand_cells(load_study(name))
        for cell in cells:
            config = cell.config
            if config.recipe == "none":
                continue
            recipe = RECIPES.get(config.recipe)
            rate = scaled_lr(
                recipe.lr_by_optimizer[config.optimizer],
                recipe.batch_size,
                config.batch_size,
                config.optimizer,
            )
            assert rate / 10.001 <= config.lr <= rate * 10.001, (name, cell.name, config.lr, rate)
