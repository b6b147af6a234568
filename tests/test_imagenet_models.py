"""The ImageNet backbones match torchvision's state_dicts key for key, load its checkpoint files (including
the old DenseNet key names), and the transfer ensemble keeps its backbones frozen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xailab.errors import CheckpointError, ConfigError
from xailab.models import count_parameters, create_model

Shapes = dict[str, tuple[int, ...]]


pytestmark = pytest.mark.usefixtures("single_thread")


def bn(prefix: str, c: int) -> Shapes:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_mobilenet_v2(num_classes: int = 1000) -> Shapes:
    """torchvision's ``mobilenet_v2()`` state_dict: Conv2dNormActivation ``.0`` conv / ``.1`` BN, and in each
    InvertedResidual ``conv = [expand (t != 1), depthwise, projection conv, BN]``."""
    keys = {"features.0.0.weight": (32, 3, 3, 3), **bn("features.0.1", 32)}
    cin, index = 32, 1
    for t, c, n, _ in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for _ in range(n):
            hidden, prefix, j = cin * t, f"features.{index}.conv", 0
            if t != 1:
                keys |= {f"{prefix}.0.0.weight": (hidden, cin, 1, 1), **bn(f"{prefix}.0.1", hidden)}
                j = 1
            keys |= {f"{prefix}.{j}.0.weight": (hidden, 1, 3, 3), **bn(f"{prefix}.{j}.1", hidden)}
            keys |= {f"{prefix}.{j + 1}.weight": (c, hidden, 1, 1), **bn(f"{prefix}.{j + 2}", c)}
            cin, index = c, index + 1
    keys |= {"features.18.0.weight": (1280, 320, 1, 1), **bn("features.18.1", 1280)}
    return keys | {"classifier.1.weight": (num_classes, 1280), "classifier.1.bias": (num_classes,)}


def torchvision_densenet169(num_classes: int = 1000) -> Shapes:
    """torchvision's ``densenet169()`` state_dict: growth 32, blocks 6/12/32/32, bn_size 4, 64 init features."""
    keys = {"features.conv0.weight": (64, 3, 7, 7), **bn("features.norm0", 64)}
    c = 64
    for b, layers in enumerate([6, 12, 32, 32], start=1):
        for i in range(layers):
            prefix = f"features.denseblock{b}.denselayer{i + 1}"
            cin = c + i * 32
            keys |= {**bn(f"{prefix}.norm1", cin), f"{prefix}.conv1.weight": (128, cin, 1, 1)}
            keys |= {**bn(f"{prefix}.norm2", 128), f"{prefix}.conv2.weight": (32, 128, 3, 3)}
        c += layers * 32
        if b < 4:
            keys |= {
                **bn(f"features.transition{b}.norm", c),
                f"features.transition{b}.conv.weight": (c // 2, c, 1, 1),
            }
            c //= 2
    keys |= bn("features.norm5", c)
    return keys | {"classifier.weight": (num_classes, c), "classifier.bias": (num_classes,)}


REFERENCE = {"mobilenetv2_imagenet": torchvision_mobilenet_v2, "densenet169": torchvision_densenet169}

# literal names and shapes read off torchvision's published state_dicts
SPOT_CHECKS = {
    "mobilenetv2_imagenet": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.num_batches_tracked": (),
        "features.14.conv.0.0.weight": (576, 96, 1, 1),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "densenet169": {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.norm0.running_mean": (64,),
        "features.denseblock1.denselayer1.norm1.weight": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.denseblock1.denselayer1.conv2.weight": (32, 128, 3, 3),
        "features.denseblock1.denselayer6.conv1.weight": (128, 224, 1, 1),
        "features.transition1.norm.weight": (256,),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.denseblock2.denselayer12.norm1.weight": (480,),
        "features.transition2.conv.weight": (256, 512, 1, 1),
        "features.denseblock3.denselayer32.conv1.weight": (128, 1248, 1, 1),
        "features.transition3.conv.weight": (640, 1280, 1, 1),
        "features.denseblock4.denselayer32.norm1.weight": (1632,),
        "features.norm5.weight": (1664,),
        "classifier.weight": (1000, 1664),
    },
}

PARAMS_AT_1000_CLASSES = {"mobilenetv2_imagenet": 3_504_872, "densenet169": 14_149_480}


@pytest.fixture(scope="module")
def imagenet_models() -> dict:
    torch.manual_seed(0)
    return {name: create_model(name, 3, 1000, pretrained=False) for name in REFERENCE}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_state_dict_matches_torchvision(imagenet_models, name: str) -> None:
    model = imagenet_models[name]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == REFERENCE[name]()
    for key, shape in SPOT_CHECKS[name].items():
        assert shapes[key] == shape, key
    assert count_parameters(model) == PARAMS_AT_1000_CLASSES[name]
    assert model.weights_source == "random"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_forward_features_and_gray_input(imagenet_models, name: str) -> None:
    rgb_model = imagenet_models[name].eval()
    gray_model = create_model(name, 1, 1000, pretrained=False).eval()
    gray_model.load_state_dict(rgb_model.state_dict())
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        features = rgb_model.forward_features(x.repeat(1, 3, 1, 1))
        assert features.shape == (1, {"mobilenetv2_imagenet": 1280, "densenet169": 1664}[name])
        torch.testing.assert_close(gray_model(x), rgb_model(x.repeat(1, 3, 1, 1)))


def old_densenet_names(state: dict) -> dict:
    """Rename keys the way torchvision's 2017 DenseNet files spell them (``norm.1``) and drop the
    ``num_batches_tracked`` buffers those files predate."""
    return {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "classifier.") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if not key.startswith(skip) and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, sb[key]), key


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_pth_round_trip(imagenet_models, tmp_path: Path, name: str) -> None:
    source = imagenet_models[name]
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model(name, 3, 1000, pretrained=str(path))
    assert_same_weights(source, loaded, skip="-")
    assert loaded.weights_source == f"imagenet:{path}"
    # with another number of classes the ImageNet classifier is left out, the backbone still loads strictly
    five = create_model(name, 3, 5, pretrained=path)
    assert_same_weights(source, five)
    with torch.no_grad():
        assert five.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_old_densenet_key_names_load(imagenet_models, tmp_path: Path) -> None:
    source = imagenet_models["densenet169"]
    old = old_densenet_names(source.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet169-old.pth"
    torch.save(old, path)
    assert_same_weights(source, create_model("densenet169", 3, 10, pretrained=path))


def test_safetensors_and_hub_cache(imagenet_models, tmp_path: Path, monkeypatch) -> None:
    source = imagenet_models["mobilenetv2_imagenet"]
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert_same_weights(source, create_model("mobilenetv2_imagenet", 3, 2, pretrained=path))
    # pretrained=True looks for torchvision's file name in $TORCH_HOME/hub/checkpoints
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    model = create_model("mobilenetv2_imagenet", 3, 2)
    assert_same_weights(source, model)
    assert model.weights_source == f"imagenet:{cached}"


@pytest.mark.parametrize(
    "name, url",
    [
        ("mobilenetv2_imagenet", "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
        ("densenet169", "https://download.pytorch.org/models/densenet169-b2777c0a.pth"),
    ],
)
def test_missing_weights_explain_what_to_do(tmp_path: Path, monkeypatch, name: str, url: str) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError) as error:
        create_model(name)
    message = str(error.value)
    assert url in message and "pretrained=False" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    with pytest.raises(CheckpointError, match="pretrained=False"):
        create_model(name, pretrained=tmp_path / "absent.pth")


def test_mismatched_weights_are_rejected(imagenet_models, tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(imagenet_models["mobilenetv2_imagenet"].state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit"):
        create_model("densenet169", pretrained=path)
    state = imagenet_models["densenet169"].state_dict()
    state["features.conv0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        create_model("densenet169", pretrained=path)


def test_in_channels_must_be_gray_or_rgb() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("mobilenetv2_imagenet", 4, pretrained=False)


# ---- transfer ensemble ----


def test_ensemble_sigmoid_head_is_one_unit() -> None:
    torch.manual_seed(0)
    model = create_model("transfer_ensemble", 3, 2, head="sigmoid", pretrained=False).eval()
    assert model.head[-1].out_features == 1
    captured = []
    model.head[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64))
    z = captured[0][:, 0]
    assert logits.shape == (2, 2) and torch.equal(logits[:, 0], torch.zeros(2))
    torch.testing.assert_close(logits.softmax(dim=1)[:, 1], torch.sigmoid(z))


@pytest.mark.parametrize("options", [{"head": "sigmoid", "num_classes": 3}, {"head": "tanh"}])
def test_ensemble_rejects_bad_heads(options: dict) -> None:
    with pytest.raises(ConfigError, match="head"):
        create_model("transfer_ensemble", **{"num_classes": 2, "pretrained": False, **options})


def test_ensemble_trains_random_backbones_end_to_end_by_default() -> None:
    # Frozen random features would make the ensemble a linear probe on noise: offline (no ImageNet weights)
    # the default trains the backbones; with weights (or freeze=True) they stay frozen, as tested below.
    model = create_model("transfer_ensemble", 1, 3, pretrained=False).train()
    assert not model.frozen
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_ensemble_backbones_stay_frozen_in_train_mode() -> None:
    model = create_model("transfer_ensemble", 1, 3, pretrained=False, freeze=True).train()
    backbones = [model.mobilenet, model.densenet]
    assert model.training and model.head.training
    assert not any(m.training for b in backbones for m in b.modules())
    assert not any(p.requires_grad for b in backbones for p in b.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head)
    stats = {k: v.clone() for k, v in model.densenet.state_dict().items()}
    model(torch.rand(2, 1, 32, 32)).sum().backward()
    assert all(torch.equal(v, model.densenet.state_dict()[k]) for k, v in stats.items())
    assert model.weights_source == "mobilenetv2_imagenet=random; densenet169=random"


def test_ensemble_loads_both_backbones_from_a_folder(imagenet_models, tmp_path: Path) -> None:
    torch.save(imagenet_models["mobilenetv2_imagenet"].state_dict(), tmp_path / "mobilenet_v2-b0353104.pth")
    torch.save(
        old_densenet_names(imagenet_models["densenet169"].state_dict()), tmp_path / "densenet169-b2777c0a.pth"
    )
    model = create_model("transfer_ensemble", 3, 2, pretrained=tmp_path)
    assert_same_weights(imagenet_models["mobilenetv2_imagenet"], model.mobilenet)
    assert_same_weights(imagenet_models["densenet169"], model.densenet)
    assert model.weights_source == (
        f"mobilenetv2_imagenet=imagenet:{tmp_path / 'mobilenet_v2-b0353104.pth'}; "
        f"densenet169=imagenet:{tmp_path / 'densenet169-b2777c0a.pth'}"
    )
