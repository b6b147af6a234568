"""The transformer methods (attention rollout, transformer attribution, LeGrad) and the class activation maps on
a ViT's token grid: known answers on forced attention maps, parity with torchcam's LeGrad and with a
hand-written token reshape + Grad-CAM, hook hygiene, and the refusals of a method asked of the wrong model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchcam.methods import LeGrad

from conftest import TinyCNN, hooks_left
from xailab.errors import ConfigError
from xailab.explain import METHODS, applicable_methods, explain, model_capabilities
from xailab.explain.base import MethodSpec, check_applicable
from xailab.explain.tokens import TokenGrid
from xailab.explain.transformer import discard_lowest, patch_map, rollout
from xailab.models import create_model
from xailab.models.vit import ViT

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 5
TRANSFORMER_METHODS = ("attention_rollout", "transformer_attribution", "legrad")
CAM_METHODS = ("gradcam", "gradcam_plus_plus", "score_cam")


def small_vit(**options) -> ViT:
    """A 3-block, 48-wide ViT (patch 4 at 16x16: a 4x4 grid, 17 tokens), random weights from seed 0."""
    torch.manual_seed(0)
    defaults = {"image_size": 16, "depth": 3, "width": 48, "heads": 3}
    return create_model("vit_tiny", 3, NUM_CLASSES, **{**defaults, **options}).eval()


def images(batch: int = 2, size: int = 16, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class forced_attention:
    """Replace every block's attention map by ``maps(b, heads, t) -> [B, heads, T, T]`` (hooks at the
    declared ``attention_layers``); removed on leaving the block."""

    def __init__(self, model: ViT, maps) -> None:
        self.model, self.maps, self.handles = model, maps, []

    def __enter__(self):
        for path in self.model.attention_layers:
            self.handles.append(
                self.model.get_submodule(path).register_forward_hook(
                    lambda _m, _i, out: self.maps(*out.shape[:3]).to(out) + 0 * out
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


# ---- rollout: known answers of the pure function ----


def test_rollout_of_identity_attention_keeps_each_token_on_itself_and_patches_uniform() -> None:
    eye = torch.eye(5).expand(2, 5, 5)
    for residual in (True, False):
        result = rollout([eye, eye, eye], residual=residual)
        torch.testing.assert_close(result, eye)
    # the class token's relevance on the patches is uniform (all zero: it only attends to itself)
    assert torch.equal(result[:, 0, 1:], torch.zeros(2, 4))


def test_rollout_of_uniform_attention_is_uniform_over_patches() -> None:
    uniform = torch.full((1, 5, 5), 0.2)
    result = rollout([uniform] * 4)
    patches = result[0, 0, 1:]
    torch.testing.assert_close(patches, patches.mean().expand(4))
    torch.testing.assert_close(result.sum(-1), torch.ones(1, 5))  # rows stay distributions


def test_rollout_follows_a_one_hot_attention_chain() -> None:
    # layer 1: token 2 attends to token 3 (every other token to itself); layer 2: the class token attends to 2
    first = torch.eye(4)
    first[2] = torch.tensor([0.0, 0, 0, 1])
    second = torch.eye(4)
    second[0] = torch.tensor([0.0, 0, 1, 0])
    without = rollout([first[None], second[None]], residual=False)
    torch.testing.assert_close(without[0, 0], torch.tensor([0.0, 0, 0, 1]))  # 0 -> 2 -> 3
    # with the residual (A + I) / 2: row 0 of layer 2 is (e0 + e2) / 2, row 2 of layer 1 (e2 + e3) / 2
    with_residual = rollout([first[None], second[None]])
    torch.testing.assert_close(with_residual[0, 0], torch.tensor([0.5, 0, 0.25, 0.25]))


def test_discard_drops_the_lowest_weights_but_never_the_class_token_on_itself() -> None:
    attention = torch.tensor([[[0.01, 0.5, 0.49], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]])
    kept = discard_lowest(attention, 0.34)  # int(9 * 0.34) = 3 lowest: 0.01 (protected), 0.1, 0.2
    expected = torch.tensor([[[0.01, 0.5, 0.49], [0.0, 0.3, 0.5], [0.6, 0.0, 0.3]]])
    assert torch.equal(kept, expected)


# ---- the methods on a ViT with forced attention ----


def class_token_on_patch(patch: int):
    """Every token attends to itself, except the class token which attends only to patch ``patch``."""

    def maps(b: int, heads: int, t: int) -> Tensor:
        attention = torch.eye(t).repeat(b, heads, 1, 1)
        attention[:, :, 0] = 0
        attention[:, :, 0, 1 + patch] = 1
        return attention

    return maps


@pytest.mark.parametrize("patch", [0, 6, 15])
def test_rollout_of_a_vit_whose_class_token_attends_to_one_patch_gives_that_patch(patch: int) -> None:
    model = small_vit()
    x = images()
    grid = TokenGrid(1, 4, 4)
    one_hot = F.one_hot(torch.tensor([patch, patch]), 16).float()
    with forced_attention(model, class_token_on_patch(patch)):
        maps = explain(model, x, "attention_rollout")
    # per layer row 0 is (e0 + e_patch) / 2 and row patch stays e_patch: after 3 layers 1 - 1/8 on the patch
    torch.testing.assert_close(maps, patch_map(one_hot * (1 - 0.5**3), grid, (16, 16)))
    with forced_attention(model, lambda b, heads, t: torch.eye(t).repeat(b, heads, 1, 1)):
        flat = explain(model, x, "attention_rollout")
    assert torch.equal(flat, torch.zeros_like(flat))  # identity attention: uniform (zero) on every patch


@pytest.mark.parametrize("target", [0, 3])
def test_transformer_attribution_of_forced_attention_lies_on_that_patch(target: int) -> None:
    model = small_vit()
    x = images()
    patch = 9
    unit = patch_map(F.one_hot(torch.tensor([patch, patch]), 16).float(), TokenGrid(1, 4, 4), (16, 16))
    with forced_attention(model, class_token_on_patch(patch)):
        maps = explain(model, x, "transformer_attribution", target=target)
    # (dA * A)^+ is zero wherever A is: only the class token's entry on the patch can carry relevance
    scale = (maps * unit).flatten(1).sum(1) / (unit * unit).flatten(1).sum(1)
    torch.testing.assert_close(maps, scale.view(-1, 1, 1, 1) * unit)
    assert (scale >= 0).all() and scale.sum() > 0


def test_transformer_attribution_is_target_dependent_and_rollout_is_not() -> None:
    model = small_vit()
    x = images()
    assert not torch.allclose(
        explain(model, x, "transformer_attribution", target=0),
        explain(model, x, "transformer_attribution", target=1),
    )
    assert torch.equal(
        explain(model, x, "attention_rollout", target=0), explain(model, x, "attention_rollout", target=1)
    )


def test_rollout_head_fusions_differ_and_discard_changes_the_map() -> None:
    model = small_vit()
    x = images()
    by_fusion = {h: explain(model, x, "attention_rollout", head_fusion=h) for h in ("mean", "max", "min")}
    assert not torch.allclose(by_fusion["mean"], by_fusion["max"])
    assert not torch.allclose(by_fusion["mean"], by_fusion["min"])
    assert not torch.allclose(by_fusion["mean"], explain(model, x, "attention_rollout", discard_ratio=0.9))


# ---- LeGrad: parity with torchcam 0.5.0 ----


class MHABlock(nn.Module):
    """``xailab.models.vit.Block``'s function rebuilt around ``nn.MultiheadAttention`` (exposed as
    ``self_attention``, what torchcam's LeGrad hooks), sharing the block's weights."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        width = block.attn.qkv.in_features
        self.self_attention = nn.MultiheadAttention(width, block.attn.heads, batch_first=True)
        with torch.no_grad():
            # xailab's qkv rows are [q; k; v], each split head-major: the layout of in_proj_weight
            self.self_attention.in_proj_weight.copy_(block.attn.qkv.weight)
            self.self_attention.in_proj_bias.copy_(block.attn.qkv.bias)
            self.self_attention.out_proj.weight.copy_(block.attn.proj.weight)
            self.self_attention.out_proj.bias.copy_(block.attn.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TorchcamViT(nn.Module):
    """The same ViT, with blocks torchcam's LeGrad understands."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit
        self.layers = nn.ModuleList(MHABlock(block) for block in vit.blocks)

    def forward(self, x: Tensor) -> Tensor:
        grid = (x.shape[-2] // 4, x.shape[-1] // 4)
        tokens = self.vit.tokens(self.vit.patch_embed(x), grid)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.vit.forward_head(tokens)


@pytest.mark.parametrize(("layers", "size"), [(None, 16), (2, 16), (1, 24)])
def test_legrad_equals_torchcam(layers: int | None, size: int) -> None:
    model = small_vit(image_size=size)
    twin = TorchcamViT(model).eval()
    x = images(3, size)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)  # the same function
    target = torch.tensor([0, 2, 4])
    ours = explain(model, x, "legrad", target=target, layers=layers)
    blocks = list(twin.layers) if layers is None else list(twin.layers)[-layers:]
    with LeGrad(twin, blocks, score_projection=lambda t: model.forward_head(t, "mean")) as extractor:
        scores = twin(x)
        reference = extractor(class_idx=target.tolist(), scores=scores)[0]
    assert reference.shape == (3, size // 4, size // 4)
    expected = F.interpolate(reference[:, None], size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert hooks_left(twin) == [] and hooks_left(model) == []


def test_legrad_rejects_a_layer_count_beyond_the_depth() -> None:
    with pytest.raises(ConfigError, match="between 1 and the model's depth 3"):
        explain(small_vit(), images(), "legrad", layers=4)


# ---- class activation maps on the token grid ----


def hand_written_gradcam(model: ViT, x: Tensor, target: Tensor, layer: str) -> Tensor:
    """Grad-CAM of a ViT layer with the token reshape written out: tokens ``[B, 1 + 16, D]`` -> ``[B, D, 4, 4]``."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    tokens = captured[0]
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), tokens)
    b, _, d = tokens.shape
    activation = tokens[:, 1:].transpose(1, 2).reshape(b, d, 4, 4)
    weights = grad[:, 1:].transpose(1, 2).reshape(b, d, 4, 4).mean(dim=(2, 3))
    cam = F.relu((weights[:, :, None, None] * activation).sum(1, keepdim=True))
    return F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False).detach()


@pytest.mark.parametrize("layer", [None, "blocks.1", "blocks.2.norm1"])
def test_gradcam_on_tokens_equals_a_hand_written_reshape(layer: str | None) -> None:
    model = small_vit()
    x = images()
    target = torch.tensor([1, 3])
    expected = hand_written_gradcam(model, x, target, layer or model.cam_layer)
    assert expected.abs().sum() > 0
    maps = explain(model, x, "gradcam", target=target, **({"layer": layer} if layer else {}))
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    assert model.cam_layer == "blocks.2.norm1"


class GridNorm(nn.Module):
    """A LayerNorm whose output passes through ``grid`` (an identity) as a ``[B, D, 4, 4]`` map: the reshape
    written into the model, the way a CNN layer offers its map, for the CNN code path of every CAM."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm, self.grid = norm, nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(x)
        b, _, d = tokens.shape
        grid = self.grid(tokens[:, 1:].transpose(1, 2).reshape(b, d, 4, 4))
        return torch.cat([tokens[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("method", [m for m in METHODS.names() if "cam" in m])
def test_every_cam_on_tokens_equals_the_same_cam_on_a_map_written_into_the_model(method: str) -> None:
    model = small_vit()
    x = images()
    target = torch.tensor([2, 0])
    expected = explain(model, x, method, target=target)
    assert (expected.flatten(1).abs().sum(1) > 0).all()
    # the same weights, with the last block's norm1 offering its tokens as a map at "blocks.2.norm1.grid"
    mapped = small_vit()
    mapped.blocks[2].norm1 = GridNorm(mapped.blocks[2].norm1)
    mapped.capabilities = frozenset({"attention"})  # no token declaration: the plain CNN path
    maps = explain(mapped, x, method, target=target, layer="blocks.2.norm1.grid")
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_cams_on_tokens_change_with_the_chosen_block_and_leave_no_hook(method: str) -> None:
    model = small_vit()
    x = images()
    first = explain(model, x, method, target=0, layer="blocks.0")
    default = explain(model, x, method, target=0)
    assert first.shape == default.shape == (2, 1, 16, 16)
    assert not torch.allclose(first, default)
    assert hooks_left(model) == []


def test_cam_of_a_layer_that_is_not_a_token_sequence_is_refused() -> None:
    with pytest.raises(ConfigError, match="head"):
        explain(small_vit(), images(), "gradcam", layer="head")


# ---- applicability, fused attention, hooks ----


def test_the_vit_declares_attention_and_tokens_and_no_convolution() -> None:
    model = small_vit()
    assert model_capabilities(model) == {"attention", "tokens"}
    applicable = set(applicable_methods(model))
    assert set(TRANSFORMER_METHODS) | set(CAM_METHODS) | {"saliency", "integrated_gradients"} <= applicable


@pytest.mark.parametrize("method", TRANSFORMER_METHODS)
def test_a_transformer_method_asked_of_a_cnn_says_what_would_work(method: str) -> None:
    with pytest.raises(ConfigError) as error:
        explain(TinyCNN(3, NUM_CLASSES), images(), method)
    message = str(error.value)
    assert f"{method!r} needs a model with attention, tokens" in message
    assert "this model offers: conv" in message
    listed = message.split("methods that apply to it: ")[1].split(", ")
    assert "gradcam" in listed and not set(TRANSFORMER_METHODS) & set(listed)


def test_lrp_asked_of_a_vit_says_what_would_work() -> None:
    # LRP's rules are for convolutional networks; the ViT has no convolution (its patch embedding is linear)
    with pytest.raises(ConfigError) as error:
        explain(small_vit(), images(), "lrp")
    message = str(error.value)
    assert "'lrp' needs a model with conv (this model offers: attention, tokens)" in message
    listed = message.split("methods that apply to it: ")[1].split(", ")
    assert set(TRANSFORMER_METHODS) | set(CAM_METHODS) <= set(listed) and "lrp" not in listed


def test_a_cnn_only_method_asked_of_a_vit_says_what_would_work() -> None:
    cnn_only = MethodSpec("conv_rule", lambda *a: None, "none", needs=frozenset({"conv"}))
    with pytest.raises(ConfigError) as error:
        check_applicable(cnn_only, small_vit())
    message = str(error.value)
    assert "'conv_rule' needs a model with conv (this model offers: attention, tokens)" in message
    assert "attention_rollout" in message and "legrad" in message
    check_applicable(METHODS.get("legrad"), small_vit())  # no error where it applies


@pytest.mark.parametrize("method", TRANSFORMER_METHODS + CAM_METHODS)
def test_fused_attention_gives_the_same_logits_and_maps(method: str) -> None:
    explicit = small_vit()
    fused = small_vit(fused_attention=True)
    x = images()
    torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        explain(fused, x, method, target=1), explain(explicit, x, method, target=1), rtol=1e-4, atol=1e-5
    )


class ExplodingViT(ViT):
    """Raises after the blocks ran (their hooks fired)."""

    def forward_head(self, tokens: Tensor, pool: str = "cls") -> Tensor:
        raise RuntimeError("exploded in the head")


@pytest.mark.parametrize("method", TRANSFORMER_METHODS + CAM_METHODS)
def test_hooks_never_outlive_a_call_also_when_the_model_raises(method: str) -> None:
    model = small_vit()
    x = images()
    explain(model, x, method)
    assert hooks_left(model) == []
    exploding = ExplodingViT(model.config)
    exploding.train()
    with pytest.raises(RuntimeError, match="exploded in the head"):
        explain(exploding, x, method, target=0)
    assert hooks_left(exploding) == []
    assert exploding.training and all(m.training for m in exploding.modules())


@pytest.mark.parametrize("method", TRANSFORMER_METHODS)
def test_maps_are_batched_image_by_image(method: str) -> None:
    model = small_vit()
    x = images(3)
    target = torch.tensor([0, 1, 2])
    together = explain(model, x, method, target=target)
    alone = torch.cat([explain(model, x[i : i + 1], method, target=target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
