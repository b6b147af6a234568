"""Method parameters are part of the contract: every declared parameter of every method reaches the method
through the public ``explain`` (none collides with ``explain``'s own arguments), ``validate_method_params``
names bad ones before any work, and ``captum:<Name>`` resolves like any other method."""

from __future__ import annotations

import pytest
import torch

from conftest import TinyCNN
from xailab.errors import ConfigError, UnknownNameError
from xailab.explain import METHODS, applicable_methods, explain, resolve_method, validate_method_params
from xailab.explain.base import CONTRACT_ARGS
from xailab.explain.gradients import integrated_gradients
from xailab.metrics import evaluate_explanations
from xailab.study import spec_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cnn() -> TinyCNN:
    """The tests' tiny CNN (conftest.py) for 3x8x8 inputs, 4 classes, from seed 0, in eval mode."""
    torch.manual_seed(0)
    return TinyCNN(3, 4).eval()


# Values that keep each call cheap; every other declared parameter is passed explicitly at its default
CHEAP = {
    "n_steps": 4,
    "n_samples": 8,
    "n_masks": 8,
    "segments": "grid",
    "grid": 2,
    "window": 4,
    "stride": 4,
}


def test_no_method_parameter_collides_with_the_contract():
    for name in METHODS.names():
        assert not (set(METHODS.get(name).params) & (CONTRACT_ARGS - {"method"})), name


@pytest.mark.parametrize("method", applicable_methods(tiny_cnn()))
def test_every_declared_parameter_reaches_the_method_through_explain(method):
    model, x = tiny_cnn(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = METHODS.get(method)
    params = {name: CHEAP.get(name, p.default) for name, p in spec.params.items()}
    maps = explain(model, x, method, 1, **params)  # a collision would be a TypeError
    assert maps.shape == (2, 1, 8, 8) and torch.isfinite(maps).all()
    if "seed" in params:  # the parameter arrives: another seed gives another map
        other = explain(model, x, method, 1, **{**params, "seed": params["seed"] + 1})
        assert not torch.equal(maps, other)


def test_integration_rule_of_integrated_gradients_is_a_parameter_of_explain():
    model, x = tiny_cnn(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 3])
    left = explain(model, x, "integrated_gradients", target=target, method="riemann_left", n_steps=6)
    inner = integrated_gradients(model, x, target, method="riemann_left", n_steps=6).sum(1, keepdim=True)
    torch.testing.assert_close(left, inner)
    default = explain(model, x, "integrated_gradients", target=target, n_steps=6)
    assert not torch.allclose(left, default)
    # the same through the metrics and through Captum's class, whose riemann_left has the same points
    scores = evaluate_explanations(
        model, x, target, method="integrated_gradients", metrics=["sparseness"],
        method_params={"method": "riemann_left", "n_steps": 6},
    )  # fmt: skip
    direct = evaluate_explanations(model, x, target, left, metrics=["sparseness"])
    torch.testing.assert_close(scores["sparseness"], direct["sparseness"])
    captum = explain(model, x, "captum:IntegratedGradients", target=target, method="riemann_left", n_steps=6)
    torch.testing.assert_close(captum, left, atol=1e-5, rtol=1e-4)


def test_validate_method_params_coerces_text_and_names_bad_parameters():
    got = validate_method_params(
        "integrated_gradients", {"n_steps": "8", "baseline": "0.5", "method": "riemann_left"}
    )
    assert got == {"n_steps": 8, "baseline": 0.5, "method": "riemann_left"}
    assert validate_method_params("saliency", {"abs": "false"}) == {"abs": False}
    assert validate_method_params("gradcam", {"layer": "none"}) == {"layer": None}
    assert validate_method_params("occlusion", {"window": [2, 3]}) == {"window": (2, 3)}
    with pytest.raises(
        ConfigError, match=r"'integrated_gradients' has no parameter 'n_step'\. Did you mean 'n_steps'"
    ):
        validate_method_params("integrated_gradients", {"n_step": 8})
    with pytest.raises(ConfigError, match="Valid: baseline, n_steps, method"):
        validate_method_params("integrated_gradients", {"steps": 8})
    with pytest.raises(ConfigError, match=r"n_steps: int = 50 cannot take 'abc'"):
        validate_method_params("integrated_gradients", {"n_steps": "abc"})
    with pytest.raises(ConfigError, match="'simpson'"):
        validate_method_params("integrated_gradients", {"method": "simpson"})
    with pytest.raises(ConfigError, match="cannot take True"):
        validate_method_params("rise", {"n_masks": True})  # a bool is no count
    # SmoothGrad passes its base's parameters on, and only those
    assert validate_method_params("smoothgrad", {"base": "integrated_gradients", "n_steps": "4"}) == {
        "base": "integrated_gradients",
        "n_steps": 4,
    }
    with pytest.raises(ConfigError, match="no parameter 'n_steps'"):
        validate_method_params("smoothgrad", {"n_steps": 4})  # its default base, saliency, has none
    with pytest.raises(ConfigError, match="no parameter 'n_step'"):
        explain(tiny_cnn(), torch.randn(1, 3, 8, 8), "integrated_gradients", n_step=4)


def test_captum_names_resolve_with_their_parameters():
    spec = resolve_method("captum:IntegratedGradients")
    assert spec.name == "captum:IntegratedGradients" and {"n_steps", "method"} <= set(spec.params)
    assert "target" not in spec.params and "layer" in resolve_method("captum:LayerGradCam").params
    with pytest.raises(ConfigError, match="Did you mean 'n_steps'"):
        validate_method_params("captum:IntegratedGradients", {"n_stepz": 3})
    with pytest.raises(UnknownNameError, match="Did you mean 'DeepLift'"):
        resolve_method("captum:DeepLyft")
    with pytest.raises(UnknownNameError, match="'saliency'"):
        resolve_method("salency")


def test_a_study_with_a_misspelt_method_parameter_fails_when_read():
    study = {
        "name": "s",
        "datasets": ["digits"],
        "models": ["mnist_cnn"],
        "methods": ["integrated_gradients", "captum:Saliency"],
        "method_params": {"integrated_gradients": {"n_step": 8}},
    }
    with pytest.raises(ConfigError, match=r"method_params\.integrated_gradients: .*'n_step'.*'n_steps'"):
        spec_from_dict(study)
    study["method_params"] = {"integrated_gradients": {"n_steps": "8", "method": "riemann_left"}}
    spec = spec_from_dict(study)
    assert spec.method_params["integrated_gradients"] == {"n_steps": 8, "method": "riemann_left"}


def test_precision_is_an_option_of_every_method():
    assert validate_method_params("gradcam", {"precision": "bf16"}) == {"precision": "bf16"}
    with pytest.raises(ConfigError, match="precision"):
        validate_method_params("gradcam", {"precision": "fp16"})


def test_every_numeric_parameter_of_every_method_is_bounded():
    """No int / float parameter reaches a method unbounded: each one a method declares has a range in
    ``PARAM_BOUNDS`` (a new method's new parameter must add one)."""
    from xailab.explain.base import PARAM_BOUNDS

    for name in METHODS.names():
        for param in resolve_method(name).params.values():
            members = param.members()
            if any(m in (int, float) for m in members):
                assert param.bounds is not None and param.bounds == PARAM_BOUNDS[param.name], (name, param)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("integrated_gradients", {"n_steps": 0}, r"n_steps=0 is out of range; valid: in \[1, 1000000\]"),
        ("integrated_gradients", {"n_steps": "-3"}, r"n_steps='-3' is out of range"),
        ("lime", {"n_samples": 10**9}, r"'lime': parameter n_samples=1000000000 is out of range"),
        ("rise", {"p": 0.0}, r"p=0.0 is out of range; valid: in \(0, 1\]"),
        ("attention_rollout", {"discard_ratio": 1}, r"discard_ratio=1 is out of range; valid: in \[0, 1\)"),
        ("occlusion", {"window": [4, 0]}, r"window=\[4, 0\] is out of range"),
        ("occlusion", {"baseline": "nan"}, r"baseline='nan' is out of range; valid: a finite number"),
        ("lrp", {"epsilon": -1e-9}, r"epsilon=-1e-09 is out of range; valid: >= 0"),
        ("smoothgrad", {"noise_level": -0.1}, r"noise_level=-0.1 is out of range"),
    ],
)
def test_out_of_range_values_are_refused_naming_parameter_value_and_range(method, params, message):
    with pytest.raises(ConfigError, match=message):
        validate_method_params(method, params)


def test_values_at_the_bounds_pass():
    assert validate_method_params("integrated_gradients", {"n_steps": "1"}) == {"n_steps": 1}
    assert validate_method_params("rise", {"p": 1}) == {"p": 1.0}
    assert validate_method_params("attention_rollout", {"discard_ratio": 0}) == {"discard_ratio": 0.0}
    assert validate_method_params("lrp", {"epsilon": 0}) == {"epsilon": 0.0}
    assert validate_method_params("occlusion", {"window": [1, 4096]}) == {"window": (1, 4096)}


def test_every_default_is_inside_its_bounds():
    for name in METHODS.names():
        for param in resolve_method(name).params.values():
            if param.bounds is not None and param.default is not None and not isinstance(param.default, str):
                assert param.bounds.contains(param.default), (name, param)
