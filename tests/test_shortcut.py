"""Planted shortcuts: masks match the pixels the marker changed byte for byte, the control leaves the data
untouched, options are validated, a tiny model trained on a fully correlated marker relies on it and its
gradients concentrate on it, and the bundled ``shortcut`` study kind runs end to end on a tiny setting."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from xailab.data import load_dataset
from xailab.data.base import Dataset, ImageSet
from xailab.data.shortcut import (
    MarkedImageSet,
    ShortcutConfig,
    marker_pixels,
    plant_shortcut,
    plant_where,
)
from xailab.data.transforms import to_model_input
from xailab.errors import ConfigError, UnknownNameError
from xailab.explain import explain
from xailab.metrics.localisation import relevance_mass_accuracy

pytestmark = pytest.mark.usefixtures("single_thread")


def noise_dataset(n: int = 40, size: int = 12, channels: int = 1, classes: int = 2, seed: int = 0) -> Dataset:
    """Uniform noise in 0..254 (never the marker's 255, so every written pixel changes), labels cycling."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for i, split in enumerate(("train", "test")):
        images = torch.randint(0, 255, (n, size, size, channels), generator=g, dtype=torch.uint8)
        splits[split] = ImageSet(images, (torch.arange(n) + i) % classes)
    return Dataset(
        "noise", splits, tuple(str(c) for c in range(classes)), (0.5,) * channels, (0.29,) * channels
    )


@pytest.mark.parametrize(
    ("marker", "position", "channels"),
    [("tag", "corner", 1), ("square", "random", 3), ("patch", "random", 1), ("tag", "random", 3)],
)
def test_masks_match_the_pixels_changed_byte_for_byte(marker, position, channels):
    ds = noise_dataset(channels=channels)
    config = ShortcutConfig(classes=["1"], marker=marker, size=5, position=position, splits=["train"], seed=3)
    planted = plant_shortcut(ds, config)
    train = planted["train"]
    assert isinstance(train, MarkedImageSet) and train.masks.shape == (40, 1, 12, 12)
    changed = (train.images != ds["train"].images).any(-1)  # [N, H, W]
    if marker == "patch":  # a random texture may repeat a pixel's own value: written, not changed
        assert (changed <= train.masks[:, 0]).all()
        written = train.images[train.masks[:, 0]]
        assert written.shape[0] == int(train.masks.sum())
    else:
        assert torch.equal(changed, train.masks[:, 0])
        colour = torch.full((channels,), 255, dtype=torch.uint8)
        assert (train.images[train.masks[:, 0]] == colour).all()
    assert torch.equal(train.marked, ds["train"].labels == 1)  # strength 1: every image of class 1, no other
    assert torch.equal(train.masks.flatten(1).any(1), train.marked)
    untouched = planted["test"]
    assert torch.equal(untouched.images, ds["test"].images) and not untouched.masks.any()
    if position == "random":  # a different place per image, always whole inside the image
        rows = train.masks[train.marked].any(-1).float().argmax(-1).flatten()
        assert rows.unique().numel() > 1


def test_the_tag_is_an_L_and_the_corner_is_where_asked():
    config = ShortcutConfig(classes=[0], size=7, corner="bottom_right", margin=2)
    _, mask = marker_pixels(config, 1)
    assert mask.shape == (7, 5) and mask[:, 0].all() and mask[-1].all() and int(mask.sum()) == 11
    ds = noise_dataset()
    train = plant_shortcut(ds, config)["train"]
    m = train.masks[train.marked][0, 0]
    rows, cols = m.nonzero().unbind(1)
    assert int(rows.max()) == 12 - 1 - 2 and int(cols.max()) == 12 - 1 - 2


def test_strength_zero_leaves_the_data_untouched_and_strength_picks_that_share():
    ds = noise_dataset(n=60, classes=3)
    control = plant_shortcut(ds, ShortcutConfig(classes=["0", "2"], strength=0.0, splits=["train", "test"]))
    for split in ("train", "test"):
        assert control[split].images is ds[split].images  # not even copied
        assert not control[split].masks.any() and not control[split].marked.any()
    assert control.mean == ds.mean and control.std == ds.std
    half = plant_shortcut(ds, ShortcutConfig(classes=["0", "2"], strength=0.5, seed=1))["train"]
    for c in (0, 2):
        assert int(half.marked[ds["train"].labels == c].sum()) == 10  # half of the 20 images of each class
    assert not half.marked[ds["train"].labels == 1].any()
    again = plant_shortcut(ds, ShortcutConfig(classes=["0", "2"], strength=0.5, seed=1))["train"]
    assert torch.equal(again.images, half.images)  # seeded
    sub = half.subset(torch.tensor([0, 5, 7]))
    assert isinstance(sub, MarkedImageSet) and torch.equal(sub.masks, half.masks[[0, 5, 7]])


def test_bad_options_raise_clear_errors():
    ds = noise_dataset()
    with pytest.raises(ConfigError, match=r"larger than the 12x12 images"):
        plant_shortcut(ds, ShortcutConfig(classes=["1"], marker="square", size=12))
    with pytest.raises(ConfigError, match=r"classes: '7' is not a class.*valid: 0, 1"):
        plant_shortcut(ds, ShortcutConfig(classes=["7"]))
    with pytest.raises(ConfigError, match=r"strength=1.5"):
        ShortcutConfig(classes=["1"], strength=1.5)
    with pytest.raises(ConfigError, match=r"a tag needs at least 5 pixels"):
        ShortcutConfig(classes=["1"], size=3)
    with pytest.raises(UnknownNameError, match="square"):
        ShortcutConfig(classes=["1"], marker="squares")
    with pytest.raises(ConfigError, match=r"unknown key 'strenght'.*Did you mean 'strength'"):
        ShortcutConfig.from_options({"classes": ["1"], "strenght": 1.0})
    with pytest.raises(ConfigError, match=r"no split 'val'"):
        plant_shortcut(ds, ShortcutConfig(classes=["1"], splits=["val"]))
    with pytest.raises(ConfigError, match="base=<dataset name>"):
        load_dataset("shortcut", classes=["1"])


@pytest.mark.parametrize(
    ("colour", "channels", "expected"),
    [([255, 0, 0], 3, [255, 0, 0]), ([0, 255, 128], 3, [0, 255, 128]), ([255, 0, 0], 1, [76])],
)
def test_a_coloured_square_writes_its_colour_and_its_mask_is_the_changed_pixels(colour, channels, expected):
    """Per-channel colours on RGB images, and an RGB colour on a grey image as its BT.601 luma
    (0.299 * 255 = 76.2): the mask is exactly the pixels whose bytes changed, every one holding the colour."""
    g = torch.Generator().manual_seed(7)
    # noise in 1..254, never the colour's first value (0 or 255) nor the luma: every written pixel changes
    images = torch.randint(1, 255, (30, 12, 12, channels), generator=g, dtype=torch.uint8)
    images[images == 76] = 77
    ds = Dataset(
        "noise",
        {"train": ImageSet(images, torch.arange(30) % 2)},
        ("0", "1"),
        (0.5,) * channels,
        (0.29,) * channels,
    )
    config = ShortcutConfig(classes=[1], marker="square", size=4, colour=colour, position="random", seed=2)
    train = plant_shortcut(ds, config)["train"]
    changed = (train.images != images).any(-1)
    assert torch.equal(changed, train.masks[:, 0]) and int(train.masks.sum()) == 15 * 16
    written = train.images[train.masks[:, 0]]  # [pixels, C]
    assert (written == torch.tensor(expected, dtype=torch.uint8)).all()
    outside = ~train.masks[:, 0]
    assert torch.equal(train.images[outside], images[outside])  # nothing else moved


@pytest.mark.parametrize(
    ("options", "fits"),
    [
        ({"marker": "square", "size": 13, "margin": 0}, False),  # larger than the 12x12 image
        ({"marker": "tag", "size": 13, "margin": 0}, False),  # a 13x9 tag: too tall
        ({"marker": "patch", "size": 11, "margin": 1}, False),  # fits only without its margin
        ({"marker": "square", "size": 11, "margin": 1, "position": "random"}, False),
        ({"marker": "square", "size": 12, "margin": 0}, True),  # exactly the image
        ({"marker": "square", "size": 10, "margin": 1, "position": "random"}, True),  # exactly with margin
    ],
)
def test_a_marker_larger_than_the_image_is_a_clear_error_and_one_that_fits_is_not(options, fits):
    ds = noise_dataset(n=8)
    config = ShortcutConfig(classes=["1"], **options)
    if fits:
        train = plant_shortcut(ds, config)["train"]
        assert torch.equal(train.masks.flatten(1).sum(1), train.marked.long() * options["size"] ** 2)
        return
    with pytest.raises(
        ConfigError,
        match=rf"the {options['marker']} marker \(\d+x\d+ pixels, margin "
        rf"{options['margin']}\) is larger than the 12x12 images; choose a smaller",
    ):
        plant_shortcut(ds, config)


def test_a_colour_with_the_wrong_number_of_channels_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"colour=\[1, 2\] has 2 values for 3-channel images"):
        plant_shortcut(noise_dataset(channels=3), ShortcutConfig(classes=["1"], colour=[1, 2]))
    with pytest.raises(ConfigError, match=r"colour=\[300\] must be 0..255"):
        ShortcutConfig(classes=["1"], colour=[300])


def test_the_registered_dataset_plants_into_a_real_loader():
    ds = load_dataset("shortcut", base="digits", classes=["3"], size=5, image_size=16)
    base = load_dataset("digits", image_size=16)
    assert ds.image_size == (16, 16) and ds.class_names == base.class_names
    train = ds["train"]
    assert torch.equal(train.marked, base["train"].labels == 3)
    changed = (train.images != base["train"].images).any(-1)
    assert (changed <= train.masks[:, 0]).all() and changed.any()
    assert torch.equal(ds["test"].images, base["test"].images)  # the training splits only, by default
    assert any("planted shortcut" in note for note in ds.notes)


# ---------------------------------------------------------------------------------------------------------
# A tiny model on a fully correlated marker relies on it, and its gradients find it
# ---------------------------------------------------------------------------------------------------------


def test_a_model_trained_on_a_fully_correlated_marker_relies_on_it():
    torch.manual_seed(0)
    ds = noise_dataset(n=256, size=12, seed=5)  # pure noise: the marker is the only signal
    config = ShortcutConfig(
        classes=["1"], marker="square", size=3, corner="top_right", splits=["train", "test"]
    )
    planted = plant_shortcut(ds, config)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    x = to_model_input(planted["train"].images, planted.mean, planted.std)
    y = planted["train"].labels
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    test = planted["test"]
    clean = ds["test"]

    def accuracy(images) -> float:
        with torch.no_grad():
            return float(
                (model(to_model_input(images, planted.mean, planted.std)).argmax(1) == clean.labels)
                .float()
                .mean()
            )

    moved = plant_where(clean, clean.labels == 0, config)  # the marker on the other class only
    assert accuracy(test.images) > 0.95  # marker present where it was learnt
    assert accuracy(moved.images) < 0.1  # moved: the model follows the marker, not the class
    # Gradients concentrate on the marker: most of the saliency mass of the marked images lies in 9 of 144 pixels.
    idx = test.marked.nonzero().flatten()[:16]
    xm = to_model_input(test.images[idx], planted.mean, planted.std)
    maps = explain(model, xm, "saliency", target=test.labels[idx])
    mass = relevance_mass_accuracy(model, xm, None, maps, mask=test.masks[idx])
    assert float(mass.mean()) > 5 * 9 / 144


# ---------------------------------------------------------------------------------------------------------
# The study kind "shortcut", end to end on a tiny setting
# ---------------------------------------------------------------------------------------------------------


def tiny_shortcut_spec(**changes) -> dict:
    """Two keras_cnn trainings (shortcut + control) on 256 16x16 digits, a tag planted into the 3s."""
    spec = {
        "name": "tiny-shortcut",
        "kind": "shortcut",
        "datasets": ["shortcut"],
        "dataset_options": {"shortcut": {"base": "digits", "classes": ["3"], "marker": "tag", "size": 5}},
        "models": ["keras_cnn"],
        "model_options": {"keras_cnn": {"image_size": 16}},
        "train": {"epochs": 2, "batch_size": 64, "image_size": 16, "train_limit": 256, "lr": 0.003,
                  "precision": "fp32", "deterministic": True},
        "methods": ["saliency", "gradcam"],
        "metrics": ["sparseness"],
        "n_explain": 4,
        "n_gallery": 2,
        "n_misclassified": 0,
        "sanity_method": "gradcam",
        "sanity_images": 1,
    }  # fmt: skip
    spec.update(changes)
    return spec


def test_the_shortcut_study_trains_both_models_scores_the_marker_and_reports_it(tmp_path):
    from xailab.metrics.localisation import LOCALISATION_METRICS
    from xailab.study import run_study, spec_from_dict

    spec = spec_from_dict(tiny_shortcut_spec(n_misclassified=2))
    report = run_study(spec, out=tmp_path, progress=False)
    cell = tmp_path / "tiny-shortcut" / "keras_cnn__shortcut"
    record = json.loads((cell / "record.json").read_text())
    section = record["shortcut"]
    control = json.loads((cell / "control" / "config.json").read_text())
    assert control["train"]["dataset_options"]["strength"] == 0.0  # the control: nothing planted
    assert section["classes"] == ["3"] and section["n_marked"] == 4 and section["marker_pixels"] == 8
    for model in ("shortcut", "control"):
        assert set(section["reliance"][model]) == {"present", "removed", "moved"}
        for method in ("saliency", "gradcam"):
            scores = section["localisation"][model][method]
            assert set(scores) == set(LOCALISATION_METRICS)
            assert all(s["n"] == 4 and 0 <= s["mean"] <= 1 for s in scores.values())
        assert (cell / section["gallery"][model][0]["maps"]["gradcam"]).is_file()
    assert set(section["difference"]["saliency"]) == {"mass_shift", "spearman"}
    assert section["focus"] == {"shortcut": None, "control": None}  # keras_cnn's head is sized for 16x16
    # The shortcut model follows the marker: moved onto other digits, it pulls them to "3"; the control not.
    moved = {m: section["reliance"][m]["moved"]["to_marked_class"] for m in ("shortcut", "control")}
    assert moved["shortcut"] > moved["control"] + 0.2
    # The usual assessment speaks about the marked images (all of class 3); mistakes are searched for in
    # the whole test split the model was evaluated on.
    assert all(row["label"] == "3" for row in record["gallery"])
    wrong, test = record["misclassified"], record["test"]
    assert wrong["searched"] == test["n"] > section["n_marked"]
    assert wrong["total"] == round((1 - test["accuracy"]) * test["n"]) and len(wrong["items"]) == min(
        2, wrong["total"]
    )
    html = report.read_text()
    assert f"{wrong['total']} of {test['n']} test images wrong" in html
    for text in (
        "Which explanation finds the shortcut?",
        "Which explanation to trust",
        "relevance_rank_accuracy",
    ):
        assert text in html
    again = run_study(spec, out=tmp_path, progress=False)
    assert (
        again == report and json.loads((cell / "record.json").read_text())["cell_key"] == record["cell_key"]
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"datasets": ["digits"], "dataset_options": {}}, r"datasets: \[shortcut\]"),
        ({"dataset_options": {"shortcut": {"classes": ["3"]}}}, "base"),
        (
            {"dataset_options": {"shortcut": {"base": "digits", "classes": ["3"], "strength": 0}}},
            "nothing to find",
        ),
        (
            {"dataset_options": {"shortcut": {"base": "digits", "classes": ["3"], "sise": 5}}},
            "Did you mean 'size'",
        ),
        ({"kind": "shortcuts"}, "shortcut"),
    ],
)
def test_bad_shortcut_study_specs_name_the_key(changes, expected):
    from xailab.study import spec_from_dict

    with pytest.raises(ConfigError, match=expected):
        spec_from_dict(tiny_shortcut_spec(**changes))


@pytest.mark.slow
def test_the_bundled_shortcut_study_runs_on_real_mnist_cut_to_seconds(shared_data_dir, tmp_path):
    """The bundled study's own planting options on the real MNIST, with the budget cut to seconds (keras_cnn,
    7x fewer operations than mnist_cnn: the 10,000 test images are predicted by two models several times)."""
    import dataclasses

    from xailab.study import load_study, run_study

    bundled = load_study("shortcut")
    spec = dataclasses.replace(
        bundled,
        name="shortcut-cut",
        models=["keras_cnn"],
        train={**bundled.train, "epochs": 1, "train_limit": 512},
        methods=["saliency", "gradcam"],
        method_params={},
        metrics=["sparseness"],
        n_explain=8,
        n_gallery=2,
        sanity_images=1,
    )
    report = run_study(spec, out=tmp_path, progress=False, data_dir=str(shared_data_dir))
    record = json.loads((report.parent / "keras_cnn__shortcut" / "record.json").read_text())
    section = record["shortcut"]
    assert section["classes"] == ["7"] and section["n_marked"] == 8 and section["marker_pixels"] == 11
    assert record["test"]["n"] == 10_000 and "Which explanation finds the shortcut?" in report.read_text()


def test_focus_scores_every_method_on_mosaics_and_skips_a_fixed_size_model():
    from xailab.study import spec_from_dict
    from xailab.study.shortcut import focus_scores

    spec = spec_from_dict(tiny_shortcut_spec(n_explain=6))
    ds = noise_dataset(n=30, size=8, classes=3)
    test = ds["test"]
    torch.manual_seed(0)
    pooled = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    found = focus_scores(spec, pooled, ds.mean, ds.std, test.images, test.labels)
    assert set(found) == {"saliency", "gradcam"}
    assert all(s["n"] == 6 and 0 <= s["mean"] <= 1 for s in found.values())
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # takes 8x8 images only
    assert focus_scores(spec, fixed, ds.mean, ds.std, test.images, test.labels) is None


def test_a_shortcut_cell_explains_only_the_methods_of_its_model_and_the_trust_table_says_why(
    tmp_path, monkeypatch
):
    """A method that needs what the cell's model lacks (attention_rollout on a CNN) is skipped in the
    shortcut section as in the usual assessment, and reads "n/a — needs ..." in "Which explanation to
    trust"; the study's ``metric_precision`` reaches the assessment."""
    import xailab.study.runner
    from xailab.report.shortcut import trust_table
    from xailab.study import expand_cells, spec_from_dict
    from xailab.study.runner import CellTask
    from xailab.study.shortcut import run_shortcut_cell

    precisions: list[str] = []
    real = xailab.study.runner.assess

    def spy(*args, **kwargs):
        precisions.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(xailab.study.runner, "assess", spy)
    monkeypatch.setenv("XAILAB_AUTOTUNE", "0")
    spec = spec_from_dict(
        tiny_shortcut_spec(
            methods=["saliency", "attention_rollout"], sanity_method="saliency", metric_precision="auto"
        )
    )
    (cell,) = expand_cells(spec)
    record = run_shortcut_cell(CellTask(spec, cell, str(tmp_path), False))
    assert precisions == ["auto"]
    assert record["explain"]["methods"] == ["saliency"]
    assert record["skipped_methods"]["attention_rollout"]["needs"] == ["attention", "tokens"]
    section = record["shortcut"]
    for model in ("shortcut", "control"):
        assert list(section["localisation"][model]) == ["saliency"]
        assert set(section["gallery"][model][0]["maps"]) == {"saliency"}
    assert list(section["difference"]) == ["saliency"]
    (table,) = trust_table([record], spec.metrics, record["metric_info"], 0.5)["cells"]
    rows = {row["method"]: row for row in table["rows"]}
    assert rows["saliency"]["na"] is None and rows["saliency"]["localisation"]
    assert rows["attention_rollout"]["na"] == "n/a — needs attention, tokens"


def test_sanity_verdict_reads_the_metric_then_the_per_method_check_then_the_cells():
    from xailab.report.shortcut import sanity_verdict

    curves = {"method": "lrp", "layers": ["a", "b"], "mean_spearman": [0.8, 0.6], "mean_ssim": [0.5, 0.4]}
    rec = {
        "quality": {"saliency": {"model_randomisation": {"mean": 0.24}}},
        "sanity_by_method": {"lrp": curves},
        "sanity": {**curves, "method": "gradcam", "mean_spearman": [0.3, 0.05]},
    }
    assert sanity_verdict(rec, "saliency", 0.5) == {
        "passes": True,
        "late": False,
        "text": "0.24",
        "how": "mean over layers",
    }
    assert sanity_verdict(rec, "lrp", 0.5) == {
        "passes": False,
        "late": False,
        "text": "0.60",
        "how": "all layers random",
    }
    assert sanity_verdict(rec, "gradcam", 0.5) == {
        "passes": True,
        "late": False,
        "text": "0.05",
        "how": "all layers random",
    }
    assert sanity_verdict(rec, "occlusion", 0.5)["text"] == "not checked"
    rec["sanity_by_method"]["rollout"] = {
        **curves,
        "method": "rollout",
        "mean_spearman": [1.0, 0.95, 0.9, 0.4],
    }
    assert sanity_verdict(rec, "rollout", 0.5) == {
        "passes": True,
        "late": True,
        "text": "0.40; 0.81 mean over layers",
        "how": "all layers random",
    }


@pytest.mark.parametrize(
    ("curve", "passes", "late"),
    [
        ([0.3, 0.1, 0.05], True, False),  # the maps change with the first layers
        ([1.0, 0.99, 0.97, 0.3], True, True),  # unchanged until the last layer: ignores most of the weights
        ([0.9, 0.8, 0.6], False, False),  # never drops below the threshold
        (
            [-0.9, -0.8, -0.3],
            True,
            True,
        ),  # an anti-correlated map is as dependent on the weights as a correlated one
        ([0.2, float("nan")], False, False),  # no final value: not a pass
        ([], False, False),
    ],
)
def test_cascade_verdict_flags_maps_that_change_only_at_the_end(curve, passes, late):
    from xailab.report.shortcut import cascade_verdict

    verdict = cascade_verdict(curve, 0.5)
    assert (verdict["passes"], verdict["late"]) == (passes, late)
