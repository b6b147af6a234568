"""Layer-wise relevance propagation: conservation on every zoo model, canonisation that changes no output,
parity with Captum's LRP, a hand-computed two-layer example per rule, batching, bf16 and clear errors."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from xailab.errors import ConfigError
from xailab.explain import explain
from xailab.explain.lrp import (
    COMPOSITES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    WSquare,
    ZBox,
    Zero,
    ZPlus,
    box_bounds,
    canonize,
    lrp,
)
from xailab.models import MODELS, create_model, list_models, model_input_size

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 5
SIZE = 32  # every zoo model at 32x32 (the ImageNet backbones too: they pool down to 1x1)


def conv_models() -> list:
    """The zoo's convolutional models (the ViT has no LRP rules; see test_unsupported_layers_are_named); the
    ImageNet backbones (a few seconds each on a CPU) are marked slow."""
    return [
        pytest.param(name, marks=pytest.mark.slow) if model_input_size(name)[0] > 64 else name
        for name in list_models()
        if not name.startswith("vit")
    ]


def build(name: str, randomise_norms: bool = True) -> nn.Module:
    """A random-init zoo model for 3-channel 32x32 inputs, in eval mode, with batch-norm statistics that are
    not the identity (so merging them is exercised)."""
    options = {}
    parameters = inspect.signature(MODELS.get(name).factory).parameters
    if "pretrained" in parameters:
        options["pretrained"] = False
    if "image_size" in parameters:
        options["image_size"] = SIZE
    torch.manual_seed(0)
    model = create_model(name, 3, NUM_CLASSES, **options).eval()
    if randomise_norms:
        generator = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.data.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
    return model


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def strip_biases(model: nn.Module) -> nn.Module:
    """The model made bias-free (every conv/linear bias and batch-norm shift zero), hence positively
    homogeneous up to ReLU6's clipping: LRP-0 must conserve its logits exactly."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.bias.zero_()
    return model


@pytest.mark.parametrize("name", conv_models())
def test_canonised_copy_gives_the_same_logits_and_leaves_the_model_alone(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    twin = canonize(model, x)
    merged = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) - sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in twin.modules()
    )
    with torch.no_grad():
        expected, got = model(x), twin(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()))
    if name != "keras_cnn":  # keras' BN follows a ReLU: nothing to merge
        assert merged > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", conv_models())
def test_lrp_0_conserves_the_target_logit_on_bias_free_models(name):
    model = strip_biases(build(name))
    x = images()
    target = torch.tensor([0, 3])
    relevance = explain(model, x, "lrp", target, reduce=None, composite="zero")
    with torch.no_grad():
        logits = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), logits, rtol=1e-4, atol=1e-5)
    # a tiny epsilon barely absorbs anything
    eps = explain(model, x, "lrp", target, reduce=None, composite="epsilon", epsilon=1e-9)
    torch.testing.assert_close(eps.sum(dim=(1, 2, 3)), logits, rtol=1e-3, atol=1e-5)


def test_lrp_0_with_biases_absorbs_exactly_the_biases_share():
    """Conservation with biases: each layer keeps ``sum_j b_j c_j`` (its bias's share ``b_j / z_j R_j``), so
    the input relevance is the logit minus those shares, read from the gradients at every layer output."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([0, 2])
    relevance = explain(model, x, "lrp", target, reduce=None, composite="zero").sum(dim=(1, 2, 3))
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, key=k: outputs.__setitem__(key, o))
        for k, m in enumerate(model)
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    logits = model(x)
    for hook in hooks:
        hook.remove()
    score = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, list(outputs.values()))
    absorbed = sum(
        (g * model[k].bias.view(1, -1, *([1] * (g.ndim - 2)))).flatten(1).sum(1)
        for k, g in zip(outputs, grads, strict=True)
    )
    expected = logits.gather(1, target[:, None]).squeeze(1) - absorbed
    torch.testing.assert_close(relevance, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", conv_models())
def test_lrp_0_with_biases_absorbs_exactly_the_biases_share_on_every_zoo_model(name):
    """The documented absorption on the zoo models as they are (biases, batch norms merged into them or kept
    as diagonal layers, residual additions, concatenations, ReLU6): every layer with LRP-0 keeps
    ``sum_j b_j c_j`` of the relevance reaching it, nothing else does, so the input relevance is the target
    logit minus those shares, read from the rule-carrying copy's gradients at every layer output."""
    from xailab.explain.lrp import RuleLayer, RuleParams, lrp_model
    from xailab.explain.lrp.rules import AFFINE_TYPES, affine_params

    model = build(name)
    x = images()
    target = torch.tensor([0, 3])
    relevance = explain(model, x, "lrp", target, reduce=None, composite="zero").sum(dim=(1, 2, 3))
    twin, _ = lrp_model(model, x, "zero", RuleParams())
    outputs: list[tuple[nn.Module, torch.Tensor]] = []
    layers = [m for m in twin.modules() if isinstance(m, RuleLayer) and isinstance(m.module, AFFINE_TYPES)]
    assert layers
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append((m.module, o))) for m in layers]
    try:
        xg = x.clone().requires_grad_(True)
        logits = twin(xg)
    finally:
        for handle in handles:
            handle.remove()
    logit = logits.gather(1, target[:, None]).squeeze(1)
    grads = torch.autograd.grad(logit.sum(), [xg, *(o for _, o in outputs)], allow_unused=True)
    absorbed = torch.zeros(2, dtype=torch.float64)
    for (layer, _), grad in zip(outputs, grads[1:], strict=True):
        bias = affine_params(layer)[1]
        if grad is None or bias is None:
            continue
        absorbed += (grad * bias.view(1, -1, *([1] * (grad.ndim - 2)))).flatten(1).sum(1).double()
    scale = 1 + logit.abs().max().item()
    assert absorbed.abs().max() > 1e-3 * scale  # the biases do hold a share: the check below can fail
    expected = logit.detach().double() - absorbed
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close((xg * grads[0]).sum(dim=(1, 2, 3)), relevance, rtol=1e-5, atol=1e-6 * scale)


# ---- a hand-computed two-layer example per rule ----------------------------------------------------------

W1 = np.array([[1.0, -2.0, 0.5, 1.5], [-1.0, 0.5, 2.0, -0.5], [0.5, 1.0, -1.0, 1.0]])
B1 = np.array([0.1, -0.2, 0.3])
W2 = np.array([[1.5, -1.0, 2.0], [-0.5, 1.0, 0.5]])
B2 = np.array([0.2, -0.1])
X = np.array([0.8, -0.3, 0.6, 0.4])
LOW, HIGH = -1.0, 1.0


def dense(
    rule: str, x: np.ndarray, w: np.ndarray, b: np.ndarray, r: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """The paper's formula for one dense layer, written out neuron by neuron (x: inputs, r: output relevance)."""
    out = np.zeros_like(x)
    for j in range(w.shape[0]):
        contrib = x * w[j]
        if rule == "zero":
            parts, z = contrib, contrib.sum() + b[j]
        elif rule == "epsilon":
            parts, z = contrib, contrib.sum() + b[j]
            z = z + eps * (1 if z >= 0 else -1)
        elif rule == "gamma":  # favour contributions of the output's sign: w + gamma w+ on x+ where z > 0 ...
            up, down = w[j] + 0.25 * np.clip(w[j], 0, None), w[j] + 0.25 * np.clip(w[j], None, 0)
            xp, xn = np.clip(x, 0, None), np.clip(x, None, 0)
            if contrib.sum() + b[j] >= 0:
                parts, bias = xp * up + xn * down, b[j] + 0.25 * max(b[j], 0)
            else:
                parts, bias = xp * down + xn * up, b[j] + 0.25 * min(b[j], 0)
            z = parts.sum() + bias
        elif rule == "z_plus":
            parts = np.clip(x, 0, None) * np.clip(w[j], 0, None) + np.clip(x, None, 0) * np.clip(
                w[j], None, 0
            )
            z = parts.sum()
        elif rule.startswith("alpha"):
            alpha, beta = (1.0, 0.0) if rule == "alpha1_beta0" else (2.0, 1.0)
            pos, neg = np.clip(contrib, 0, None), np.clip(contrib, None, 0)
            zp, zn = pos.sum() + max(b[j], 0), neg.sum() + min(b[j], 0)
            out += (
                alpha * pos / (zp + 1e-6) - beta * (neg / (zn - 1e-6) if neg.any() or b[j] < 0 else 0)
            ) * r[j]
            continue
        elif rule == "flat":
            parts = np.ones_like(x)
            z = parts.sum()
        elif rule == "w_square":
            parts = w[j] ** 2
            z = parts.sum()
        elif rule == "z_box":
            parts = x * w[j] - LOW * np.clip(w[j], 0, None) - HIGH * np.clip(w[j], None, 0)
            z = parts.sum()
        out += parts / z * r[j]
    return out


def two_layer() -> nn.Module:
    """The dense layer ``W1`` as a 2x2 convolution over a 2x2 one-channel image (so the model is a
    convolutional one, which LRP is offered for), ReLU, then the dense layer ``W2``."""
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(W1).view(3, 1, 2, 2))
        model[0].bias.copy_(torch.from_numpy(B1))
        model[3].weight.copy_(torch.from_numpy(W2))
        model[3].bias.copy_(torch.from_numpy(B2))
    return model.float().eval()


HAND_RULES = {
    "zero": Zero(),
    "epsilon": Epsilon(1e-6),
    "gamma": Gamma(gamma=0.25, stabilizer=0.0),
    "z_plus": ZPlus(stabilizer=0.0),
    "alpha1_beta0": AlphaBeta(alpha=1.0, beta=0.0),
    "alpha2_beta1": AlphaBeta(alpha=2.0, beta=1.0),
}
INPUT_RULES = {
    "flat": Flat(stabilizer=0.0),
    "w_square": WSquare(stabilizer=0.0),
    "z_box": ZBox(stabilizer=0.0, low=LOW, high=HIGH),
}


@pytest.mark.parametrize("rule", [*HAND_RULES, *INPUT_RULES])
def test_two_layer_example_matches_the_formula_by_hand(rule):
    model = two_layer()
    x = torch.tensor(X, dtype=torch.float32).view(1, 1, 2, 2)
    if rule in INPUT_RULES:  # an input rule at the first layer, LRP-0 above it
        mapping, first_rule, top_rule = {"0": INPUT_RULES[rule], "3": Zero()}, rule, "zero"
    else:
        mapping, first_rule, top_rule = {"0": HAND_RULES[rule], "3": HAND_RULES[rule]}, rule, rule
    hidden = np.maximum(W1 @ X + B1, 0)
    logit = W2[0] @ hidden + B2[0]
    r_hidden = dense(top_rule, hidden, W2, B2, np.array([logit, 0.0]))
    expected = dense(first_rule, X, W1, B1, r_hidden * (hidden > 0))
    got = explain(model, x, "lrp", target=0, reduce=None, composite=mapping)
    np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_a_user_composite_picks_the_most_specific_key():
    """A user composite maps module paths, ``"first"``, layer types (or their names) and categories to rules;
    the most specific key wins, in that order: each mapping gives exactly the map of the rule it should pick
    for the first layer (LRP-0 on the dense layer throughout)."""
    model = two_layer()
    x = torch.tensor(X, dtype=torch.float32).view(1, 1, 2, 2)

    def run(mapping: dict) -> torch.Tensor:
        return explain(model, x, "lrp", target=0, reduce=None, composite={"linear": Zero(), **mapping})

    expected = {name: run({"0": rule}) for name, rule in {**HAND_RULES, **INPUT_RULES}.items()}
    chosen = ("epsilon", "z_plus", "flat", "w_square")
    for i, a in enumerate(chosen):  # the four maps differ, so a wrong pick shows
        assert all(not torch.allclose(expected[a], expected[b], atol=1e-4) for b in chosen[i + 1 :]), a
    picks = [
        ({"conv": Epsilon(1e-6)}, "epsilon"),
        ({"conv": Epsilon(1e-6), "Conv2d": ZPlus(stabilizer=0.0)}, "z_plus"),
        ({"conv": Epsilon(1e-6), nn.Conv2d: ZPlus(stabilizer=0.0)}, "z_plus"),
        ({"Conv2d": ZPlus(stabilizer=0.0), "first": Flat(stabilizer=0.0)}, "flat"),
        ({"first": Flat(stabilizer=0.0), "0": WSquare(stabilizer=0.0)}, "w_square"),
        ({"conv": "z_plus"}, "z_plus"),  # a rule by name, built with the call's parameters
    ]
    for mapping, rule in picks:
        torch.testing.assert_close(run(mapping), expected[rule], msg=f"{mapping} should pick {rule}")


def test_z_b_bounds_are_the_normalised_data_range():
    """``box_bounds(mean, std)``: [0, 1] images normalised per channel span ``[-mean / std, (1 - mean) / std]``;
    per-channel bounds enter the z-B formula channel by channel (checked by hand on a 3-channel layer), and
    without bounds z-B takes each channel's minimum and maximum over the batch."""
    low, high = box_bounds((0.5, 0.25, 0.0), (0.25, 0.5, 1.0))
    torch.testing.assert_close(low, torch.tensor([-2.0, -0.5, 0.0]))
    torch.testing.assert_close(high, torch.tensor([2.0, 1.5, 1.0]))

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model[1](model[0](x)).flatten()
        logit = model(x)[0, 1]
    w1 = model[0].weight.detach().flatten(1).double().numpy()  # [4, 12], inputs in C, H, W order
    w2, b2 = model[3].weight.detach().double().numpy(), model[3].bias.detach().double().numpy()
    h = hidden.double().numpy()
    r_hidden = dense("zero", h, w2, b2, np.array([0.0, float(logit)])) * (h > 0)
    lo, hi = np.repeat(low.double().numpy(), 4), np.repeat(high.double().numpy(), 4)  # per input element
    xs = x.flatten().double().numpy()
    expected = np.zeros(12)
    for j in range(4):
        parts = xs * w1[j] - lo * np.clip(w1[j], 0, None) - hi * np.clip(w1[j], None, 0)
        expected += parts / parts.sum() * r_hidden[j]
    got = explain(
        model, x, "lrp", target=1, reduce=None, composite={"0": "z_box", "3": "zero"}, low=low, high=high
    )
    np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=1e-4, atol=1e-6)

    big = build("mnist_cnn")
    xb, target = images(), torch.tensor([0, 1])

    def zb(**bounds) -> torch.Tensor:
        return explain(big, xb, "lrp", target, reduce=None, composite="epsilon_gamma_box", **bounds)

    torch.testing.assert_close(zb(), zb(low=xb.amin(dim=(0, 2, 3)), high=xb.amax(dim=(0, 2, 3))))
    assert not torch.allclose(zb(), zb(low=-5.0, high=5.0))  # so the bounds matter


def test_a_residual_addition_splits_relevance_in_proportion_to_its_terms():
    """``s = conv_a(h) + h``: the relevance of ``s`` goes to the branch and the skip in proportion to their
    values, ``R_a = a / s R_s`` and ``R_skip = h / s R_s``; with z+ on the branch (so the split matters for
    the result) the input relevance equals the hand-computed one."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 3, 1)
            self.conv_a = nn.Conv2d(3, 3, 1, bias=False)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv1(x))
            return self.fc((self.conv_a(h) + h).flatten(1))

    torch.manual_seed(5)
    model = Residual().eval()
    with torch.no_grad():
        model.conv1.bias.add_(2.0)  # every hidden unit on, so every division below is by a non-zero sum
    x = torch.tensor(X, dtype=torch.float32).view(1, 4, 1, 1)
    w1, b1 = (
        model.conv1.weight.detach().double().flatten(1).numpy(),
        model.conv1.bias.detach().double().numpy(),
    )
    wa = model.conv_a.weight.detach().double().flatten(1).numpy()
    w2, b2 = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    z1 = w1 @ X + b1
    h = np.maximum(z1, 0)
    a = wa @ h
    total = a + h
    r_s = dense("zero", total, w2, b2, np.array([0.0, w2[1] @ total + b2[1]]))
    r_h = h / total * r_s + dense("z_plus", h, wa, np.zeros(3), a / total * r_s)
    expected = dense("zero", X, w1, b1, r_h * (z1 > 0))
    composite = {"conv1": Zero(), "conv_a": ZPlus(stabilizer=0.0), "fc": Zero()}
    got = explain(model, x, "lrp", target=1, reduce=None, composite=composite)
    np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=1e-4, atol=1e-6)
    lrp_0 = explain(model, x, "lrp", target=1, reduce=None, composite={"conv": Zero(), "linear": Zero()})
    assert not np.allclose(lrp_0.flatten().numpy(), expected, atol=1e-4)  # z+ on the branch changed it


# ---- parity with Captum ----------------------------------------------------------------------------------


def captum_twin(model: nn.Module) -> nn.Module:
    """The same network as modules Captum's LRP understands: the VGG-style CNNs' functional global mean as
    ``AdaptiveAvgPool2d`` + ``Flatten`` (Captum's plain gradient would spread it uniformly, not by value)."""
    if hasattr(model, "features") and hasattr(model, "classifier") and not hasattr(model, "block1"):
        return nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier)
    return model


PARITY = {  # rule on convolutions -> (ours, Captum's); Captum's LRP-0 is its epsilon rule at (almost) 0
    "zero": (lambda: Zero(), "EpsilonRule"),
    "epsilon": (lambda: Epsilon(1e-9), "EpsilonRule"),
    "gamma": (lambda: Gamma(gamma=0.25, stabilizer=1e-9, zero_bias=True), "GammaRule"),
    "alpha1_beta0": (
        lambda: AlphaBeta(alpha=1.0, beta=0.0, stabilizer=1e-9, zero_bias=True),
        "Alpha1_Beta0_Rule",
    ),
}


@pytest.mark.parametrize(
    ("name", "rule"),
    [(name, rule) for name in ("mnist_cnn", "simple_cnn", "keras_cnn") for rule in PARITY],
)
def test_parity_with_captum_lrp(name, rule):
    """Epsilon on the first layer, dense layers and batch norms, ``rule`` on the other convolutions.

    Captum applies gamma and alpha1-beta0 to inputs of either sign as if they were positive; ours follow the
    papers (and Zennit) there, so those two are compared where every convolution above the first sees
    non-negative inputs: the canonised VGG-style CNNs (conv -> ReLU -> pool), and keras_cnn with its first
    batch norm (ReLU -> BN -> pool -> conv) given a non-negative shift, so that it maps the ReLU's output to
    non-negative values too.
    """
    from captum.attr import LRP
    from captum.attr._utils import lrp_rules

    model = build(name)
    if name == "keras_cnn":
        with torch.no_grad():  # a x + s with a > 0 and s >= 0: block2's conv reads non-negative inputs
            model.block1.bn.running_mean.zero_()
            model.block1.bn.bias.abs_()
    channels = 3
    x = images(2)
    target = torch.tensor([1, 4])
    ours_rule, captum_rule = PARITY[rule]
    base = canonize(model, x) if name != "keras_cnn" else copy.deepcopy(model)
    mapping = {"first": Epsilon(1e-9), "conv": ours_rule(), "linear": Epsilon(1e-9), "norm": Epsilon(1e-9)}
    ours = explain(base, x, "lrp", target, reduce=None, composite=mapping, canonize=False)

    twin = captum_twin(copy.deepcopy(base))
    first = next(m for m in twin.modules() if isinstance(m, nn.Conv2d))
    for m in twin.modules():
        if isinstance(m, nn.Conv2d) and m is not first:
            m.rule = (
                lrp_rules.EpsilonRule(1e-9)
                if captum_rule == "EpsilonRule"
                else getattr(lrp_rules, captum_rule)(set_bias_to_zero=True)
            )
        elif isinstance(m, nn.Identity | nn.Flatten | nn.Conv2d | nn.Linear | nn.BatchNorm2d):
            m.rule = lrp_rules.EpsilonRule(1e-9)
    theirs = LRP(twin).attribute(x.clone().requires_grad_(True), target=target).detach()
    assert ours.shape == theirs.shape == (2, channels, SIZE, SIZE)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * scale)


# ---- every zoo model with every composite ----------------------------------------------------------------


@pytest.mark.parametrize("name", conv_models())
def test_every_zoo_model_explains_with_every_composite(name):
    model = build(name)
    x = images(1)
    low, high = box_bounds((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    sums = {}
    for composite in COMPOSITES:
        maps = explain(model, x, "lrp", torch.tensor([1]), composite=composite, low=low, high=high)
        assert maps.shape == (1, 1, SIZE, SIZE)
        assert torch.isfinite(maps).all(), composite
        assert maps.abs().sum() > 0, composite
        sums[composite] = maps.sum(dim=(1, 2, 3))
    # the flat input rule only redistributes what reaches the first layers: same totals as without it
    torch.testing.assert_close(sums["epsilon_plus_flat"], sums["epsilon_plus"], rtol=1e-3, atol=1e-5)


def test_unsupported_layers_are_named():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.GELU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ConfigError, match="'act' of type GELU"):
        explain(Odd(), torch.randn(1, 3, 8, 8), "lrp")
    # a user composite can give it a rule
    maps = explain(
        Odd(),
        torch.randn(1, 3, 8, 8),
        "lrp",
        composite={"GELU": "pass", "conv": "epsilon", "linear": "epsilon"},
    )
    assert torch.isfinite(maps).all()
    for name in [name for name in list_models() if name.startswith("vit")]:
        vit = create_model(name, 3, NUM_CLASSES).eval()
        size = model_input_size(name)
        with pytest.raises(ConfigError, match="needs a model with conv"):
            explain(vit, torch.randn(1, 3, *size), "lrp")
        # called directly: the first layer without a rule, by path and type, and the keys that would give one
        with pytest.raises(
            ConfigError,
            match=r"no rule for layer 'tokens' of type TokenEmbedding; add a rule for 'TokenEmbedding' or "
            r"'tokens' to the composite",
        ):
            lrp(vit, torch.randn(1, 3, *size), torch.tensor([0]))


def test_unknown_composite_and_rule_suggest_names():
    model = build("mnist_cnn")
    with pytest.raises(ConfigError, match="epsilon_plus_flat"):
        explain(model, torch.randn(1, 3, SIZE, SIZE), "lrp", composite="epsilon_plus_flta")
    with pytest.raises(ConfigError, match="'gamma'"):
        explain(model, torch.randn(1, 3, SIZE, SIZE), "lrp", composite={"conv": "gamm", "linear": "epsilon"})


def test_chunks_and_targets_per_image_give_the_same_maps():
    model = build("mobilenetv2")
    x = images(3)
    target = torch.tensor([2, 0, 4])
    whole = explain(model, x, "lrp", target, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    chunked = explain(
        model, x, "lrp", target, composite="epsilon_gamma_box", low=-3.0, high=3.0, internal_batch_size=1
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    single = explain(model, x[1:2], "lrp", target[1:2], composite="epsilon_gamma_box", low=-3.0, high=3.0)
    torch.testing.assert_close(single, whole[1:2], rtol=1e-4, atol=1e-6)


def test_bf16_fast_mode_agrees_with_fp32():
    model = build("mnist_cnn")
    x = images(2)
    fp32 = explain(model, x, "lrp", torch.tensor([0, 1]), composite="epsilon_plus_flat")
    bf16 = explain(model, x, "lrp", torch.tensor([0, 1]), composite="epsilon_plus_flat", precision="bf16")
    assert bf16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(fp32.flatten(1), bf16.flatten(1))
    assert (cosine > 0.9).all(), cosine


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet18"])
def test_bf16_fast_mode_conserves_the_target_logit_within_bf16_rounding(name):
    """Conservation holds in the fast mode too (bias-free LRP-0): the relevance, accumulated in float32, sums
    to the target logit up to bfloat16's rounding (8 bits of mantissa: within 2 per cent here)."""
    model = strip_biases(build(name))
    x = images()
    target = torch.tensor([1, 2])
    relevance = explain(model, x, "lrp", target, reduce=None, composite="zero", precision="bf16")
    with torch.no_grad():
        logits = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(
        relevance.sum(dim=(1, 2, 3)), logits, rtol=2e-2, atol=2e-2 * logits.abs().max().item()
    )


def test_precision_auto_is_the_fast_mode_where_the_device_has_it(monkeypatch):
    """``precision="auto"`` (autotuning off, as in every test) is bf16 exactly where the device has native bf16
    and fp32 elsewhere: the maps equal those of the explicit precision, bit for bit."""
    import xailab.autotune

    model = build("mnist_cnn")
    x = images()
    target = torch.tensor([0, 4])
    maps = {
        p: explain(model, x, "lrp", target, composite="epsilon_gamma_box", precision=p)
        for p in ("fp32", "bf16")
    }
    assert not torch.equal(maps["fp32"], maps["bf16"])  # the two modes differ, so "auto" shows which ran
    for fast in (False, True):
        monkeypatch.setattr(xailab.autotune, "bf16_is_fast", lambda device, fast=fast: fast)
        auto = explain(model, x, "lrp", target, composite="epsilon_gamma_box", precision="auto")
        assert torch.equal(auto, maps["bf16" if fast else "fp32"])


def test_probe_finds_every_input_layer_and_the_norms_it_can_merge():
    """Efficient CNN's four stem branches all read the input (one through a max-pool); its stem BN follows a
    concatenation and stays. ResNet's BNs all follow their convs (shortcut projections included); a BN in
    front of a dense layer (the ensemble's head) merges into it."""
    from xailab.explain.lrp import probe

    found = probe(build("efficient_cnn"), images(1))
    assert found.first == {"stem.branch1.0", "stem.branch3.0", "stem.branch5.0", "stem.branch_pool.1.0"}
    assert "stem.norm" not in {norm for _, norm, _ in found.merges}
    assert ("blocks.0.depthwise.0", "blocks.0.depthwise.1", "after") in found.merges
    found = probe(build("resnet18"), images(1))
    assert found.first == {"stem.0"}
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1", "after") in found.merges
    assert len(found.merges) == sum(isinstance(m, nn.BatchNorm2d) for m in build("resnet18").modules())
    head = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 30 * 30), nn.Linear(4 * 30 * 30, 2)
    )
    found = probe(head.eval(), images(1))
    assert found.merges == [("4", "3", "before")]


def test_composite_z_box_bounds_come_from_the_dataset_unless_given():
    """``with_dataset_bounds`` fills lrp's ``low``/``high`` with ``box_bounds(mean, std)`` only for a composite
    that uses z-B (named or a user mapping), only when lrp is chosen, and never over the user's bounds."""
    from xailab.explain.lrp import ZBox, box_bounds
    from xailab.explain.lrp.composites import uses_rule, with_dataset_bounds

    mean, std = (0.5, 0.25), (0.5, 0.125)
    low, high = (t.tolist() for t in box_bounds(mean, std))
    assert low == [-1.0, -2.0] and high == [1.0, 6.0]
    box = {"lrp": {"composite": "epsilon_gamma_box"}}
    filled = with_dataset_bounds(box, ["lrp"], mean, std)["lrp"]
    assert filled == {"composite": "epsilon_gamma_box", "low": (-1.0, -2.0), "high": (1.0, 6.0)}
    assert box == {"lrp": {"composite": "epsilon_gamma_box"}}  # the caller's mapping is not changed
    mine = with_dataset_bounds({"lrp": {"composite": "epsilon_gamma_box", "low": -3.0}}, ["lrp"], mean, std)
    assert mine["lrp"]["low"] == -3.0 and mine["lrp"]["high"] == (1.0, 6.0)
    assert with_dataset_bounds({}, ["lrp", "saliency"], mean, std) == {}  # default epsilon_plus_flat: no z-B
    assert with_dataset_bounds(box, ["saliency"], mean, std) == box  # lrp not chosen
    user = {"first": ZBox(low=0.0, high=1.0), "conv": "gamma", "linear": "epsilon"}
    assert uses_rule(user, "z_box") and uses_rule({"first": "z_box"}, "z_box")
    assert not uses_rule("epsilon_plus_flat", "z_box") and uses_rule("epsilon_plus_flat", "flat")
    filled = with_dataset_bounds({"lrp": {"composite": user}}, ["lrp"], mean, std)["lrp"]
    assert filled["low"] == (-1.0, -2.0)


# ---- the fused rule gradient equals the unfused reference -------------------------------------------------


def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``RuleLayer.forward`` before it was fused: ``z + coef * (part - part.detach())`` per term, with
    ``part = z_k * safe_divide(z, z_k)``, so autograd sends ``coef * c * z / stab(z_k)`` into each term."""
    from xailab.explain.lrp.rules import safe_divide

    with torch.set_grad_enabled(torch.is_grad_enabled() and self.rule.reuses_output):
        z = self.module(x)
    value = z.detach()
    out = value
    for coef, z_k in self.rule.terms(self.module, x, z):
        part = z_k * safe_divide(value, z_k.detach(), self.rule.stabilizer)
        out = out + coef * (part - part.detach())
    return out


# together these give every rule of RULES some layer: zero, epsilon (dense layers, kept batch norms, and
# every layer but the first in epsilon_w_square), z+, flat, gamma, z-B, alpha-beta, w-square, and pass on
# ReLU / ReLU6
FUSION_COMPOSITES = (
    "zero",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1_flat",
    "epsilon_w_square",
)


@pytest.mark.parametrize("name", conv_models())
def test_fused_rule_gradient_equals_the_unfused_reference_on_every_zoo_model(name, monkeypatch):
    """``RuleLayer`` computes each rule's factors once in the forward pass and applies them in one custom
    autograd node (and leaves ReLU's gradient alone): the maps equal those of the unfused modified gradient
    for every rule, on every zoo model."""
    from xailab.explain.lrp import RuleLayer

    model = build(name)
    x = images(1)
    target = torch.tensor([3])
    low, high = box_bounds((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def maps() -> dict[str, torch.Tensor]:
        return {
            c: explain(model, x, "lrp", target, reduce=None, composite=c, low=low, high=high)
            for c in FUSION_COMPOSITES
        }

    fused = maps()
    monkeypatch.setattr(RuleLayer, "forward", reference_forward)
    unfused = maps()
    for composite in FUSION_COMPOSITES:
        scale = unfused[composite].abs().max().item()
        assert scale > 0, composite
        torch.testing.assert_close(
            fused[composite], unfused[composite], rtol=1e-5, atol=1e-6 * scale, msg=composite
        )


def test_fused_rule_gradient_equals_the_unfused_reference_in_bf16(monkeypatch):
    from xailab.explain.lrp import RuleLayer

    model = build("mobilenetv2")
    x, target = images(2), torch.tensor([0, 2])
    fused = explain(model, x, "lrp", target, reduce=None, composite="epsilon_gamma_box", precision="bf16")
    monkeypatch.setattr(RuleLayer, "forward", reference_forward)
    unfused = explain(model, x, "lrp", target, reduce=None, composite="epsilon_gamma_box", precision="bf16")
    torch.testing.assert_close(fused, unfused, rtol=1e-2, atol=1e-3 * unfused.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_factors_equal_safe_divide(dtype):
    """The factors the fused path computes in fewer passes are ``safe_divide``'s, float for float: zeros
    (both signs), values below epsilon and an epsilon too small for the dtype included."""
    from xailab.explain.lrp.rules import output_ratio, safe_divide, stabilized_ratio

    generator = torch.Generator().manual_seed(2)
    z = torch.randn(4000, generator=generator).to(dtype)
    z[:10], z[10:20], z[20:30], z[30:40] = 0.0, -0.0, 1e-7, -1e-7
    numerator = torch.randn(4000, generator=generator).to(dtype)
    for eps in (0.0, 1e-50, 1e-9, 1e-6, 0.25):
        assert torch.equal(output_ratio(z, eps), safe_divide(z, z, eps)), eps
        assert torch.equal(stabilized_ratio(numerator, z, eps), safe_divide(numerator, z, eps)), eps


def test_in_place_activations_after_rule_layers_give_the_same_maps():
    """The fused node hands on the layer's output itself (no copy, no view), so an in-place ReLU after a
    convolution or a dense layer works and gives the maps of the out-of-place one."""

    def net(inplace: bool) -> nn.Module:
        torch.manual_seed(6)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU6(inplace=inplace),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 5),
            nn.ReLU(inplace=inplace),
            nn.Linear(5, 3),
        ).eval()

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    for composite in ("epsilon", "epsilon_plus_flat", "epsilon_alpha2_beta1"):
        expected = explain(net(False), x, "lrp", torch.tensor([0, 2]), reduce=None, composite=composite)
        got = explain(net(True), x, "lrp", torch.tensor([0, 2]), reduce=None, composite=composite)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, msg=composite)


def test_rules_on_layers_that_return_their_input():
    """A user composite may give a rule to a pass-through layer that returns its input itself (dropout in eval
    mode, identity): the pass rule there changes nothing, so the maps equal those without it."""
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Identity(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    plain = {"conv": "epsilon", "linear": "epsilon"}
    expected = explain(model, x, "lrp", torch.tensor([0, 1]), reduce=None, composite=plain)
    for key in ("Dropout", "Identity"):
        got = explain(model, x, "lrp", torch.tensor([0, 1]), reduce=None, composite={**plain, key: "pass"})
        torch.testing.assert_close(got, expected, msg=key)


def test_the_canonical_copy_has_its_own_modules_and_shares_the_unmerged_tensors():
    """The copy is built module by module (not by deepcopy): new module objects with their own parameter,
    submodule and hook tables, the model's tensors where nothing was merged, the model untouched."""
    from xailab.explain.lrp import probe
    from xailab.explain.lrp.canonizers import canonical_copy

    model = build("resnet18")
    x = images(1)
    twin = canonical_copy(model, probe(model, x))
    ours, theirs = dict(model.named_modules()), dict(twin.named_modules())
    assert all(theirs[p] is not m for p, m in ours.items() if p in theirs)
    assert isinstance(twin.stem[1], nn.Identity) and isinstance(model.stem[1], nn.BatchNorm2d)
    assert twin.stem[0].weight is not model.stem[0].weight  # merged: a new parameter
    assert twin.fc.weight is model.fc.weight  # not merged: the model's own tensor
    twin.fc.register_forward_hook(lambda *args: None)
    assert not model.fc._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
