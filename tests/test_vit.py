"""The Vision Transformer of the zoo: sizes counted by hand, the patch embedding against a convolution, position
embeddings at the learned and at other sizes, explicit vs fused attention, clear errors for sizes the patch does
not divide, a few seconds of training that localise, and the metrics (incl. the cascading sanity check) on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from test_models import vit_params
from xailab.errors import ConfigError
from xailab.explain import explain
from xailab.metrics import evaluate_explanations
from xailab.metrics.randomisation import model_randomisation, randomisable_layers
from xailab.models import count_macs, count_parameters, create_model, list_models, model_input_size
from xailab.models.vit import ViT

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**options) -> ViT:
    torch.manual_seed(0)
    return create_model(
        "vit_tiny", 3, 4, **{"image_size": 16, "depth": 2, "width": 32, "heads": 2, **options}
    )


def test_vit_tiny_is_registered_for_32x32_and_counts_deit_tiny_parameters() -> None:
    assert "vit_tiny" in list_models() and model_input_size("vit_tiny") == (32, 32)
    assert count_parameters(create_model("vit_tiny", 3, 10)) == vit_params(3, 10, 192, 12, 4, 32) == 5_362_762
    assert count_parameters(create_model("vit_tiny", 1, 7, size="small")) == vit_params(1, 7, 384, 12, 4, 32)
    model = create_model("vit_tiny", 3, 10, patch_size=8, depth=6, width=96, heads=4, image_size=64)
    assert count_parameters(model) == vit_params(3, 10, 96, 6, 8, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_vit_tiny_macs_by_hand() -> None:
    # patch projection on N = 64 patches; per block on T = 65 tokens: qkv, q k^T and A v (T x T x D each),
    # output projection, MLP 4x; head on the class token. (With fused_attention=True torch's FlopCounterMode
    # does not see the CPU kernel of scaled_dot_product_attention: 2 T^2 D per block fewer.)
    n, t, d, c, k = 64, 65, 192, 3, 10
    per_block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * 4 * d
    expected = n * c * 16 * d + 12 * per_block + d * k
    assert count_macs(create_model("vit_tiny", c, k), (32, 32), c) == expected == 365_107_584


def test_declares_what_explanation_methods_need() -> None:
    model = create_model("vit_tiny", depth=4)
    assert model.capabilities == {"attention", "tokens"} and model.num_prefix_tokens == 1
    assert model.patch_size == (4, 4) and model.cam_layer == "blocks.3.norm1"
    assert model.block_layers == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    assert model.attention_layers[-1] == "blocks.3.attn.attend"
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())


def test_patch_embedding_is_a_strided_convolution() -> None:
    model = tiny()
    proj = model.patch_embed.proj
    conv = nn.Conv2d(3, 32, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(proj.weight.view(32, 3, 4, 4))
        conv.bias.copy_(proj.bias)
    x = torch.randn(2, 3, 16, 24)
    expected = conv(x).flatten(2).transpose(1, 2)  # [B, D, 4, 6] -> [B, 24, D], row-major patches
    torch.testing.assert_close(model.patch_embed(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_maps_are_readable_at_attend() -> None:
    model = tiny().eval()
    maps = []
    handle = model.get_submodule("blocks.1.attn.attend").register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    handle.remove()
    assert maps[0].shape == (3, 2, 17, 17)  # [B, heads, 1 + 4 * 4, 1 + 4 * 4]
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 17))


def test_fused_attention_computes_the_same_function() -> None:
    explicit, fused = tiny(), tiny(fused_attention=True)
    x = torch.randn(2, 3, 16, 16)
    for mode in (False, True):
        explicit.train(mode), fused.train(mode)
        torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_kept_at_the_learned_size_and_interpolated_elsewhere() -> None:
    model = tiny().eval()
    tokens = model.tokens
    assert tokens.positions((4, 4)) is tokens.pos_embed  # unchanged size: the learned embeddings exactly
    # the interpolation itself is the identity at the learned size (so skipping it changes nothing)
    patch_pos = tokens.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    same = F.interpolate(patch_pos, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, patch_pos, rtol=0, atol=1e-6)
    # a constant embedding stays constant on a larger, non-square grid; the class token's is untouched
    with torch.no_grad():
        tokens.pos_embed[:, 1:] = 0.5
    wider = tokens.positions((6, 8))
    assert wider.shape == (1, 1 + 48, 32)
    torch.testing.assert_close(wider[:, 1:], torch.full((1, 48, 32), 0.5))
    assert torch.equal(wider[:, :1], tokens.pos_embed[:, :1])
    assert torch.isfinite(model(torch.randn(2, 3, 24, 32))).all()


def test_a_model_built_for_another_size_reads_its_own_grid() -> None:
    model = tiny(image_size=32).eval()
    assert model.tokens.pos_embed.shape == (1, 1 + 64, 32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("size", [30, 17])
def test_an_image_size_the_patch_does_not_divide_is_refused_with_what_would_work(size: int) -> None:
    with pytest.raises(ConfigError, match=f"image_size {size} is not divisible by patch_size 4"):
        create_model("vit_tiny", image_size=size)
    model = tiny()
    with pytest.raises(
        ConfigError, match=rf"{size}x16, not divisible by the patch size 4; resize the images"
    ):
        model(torch.randn(1, 3, size, 16))
    for method in ("gradcam", "legrad"):
        with pytest.raises(ConfigError, match="not divisible by the patch size 4"):
            explain(model, torch.randn(1, 3, size, 16), method)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 30, "heads": 4}, "width 30 is not divisible by heads 4"),
        ({"size": "huge"}, "'huge'.*tiny.*small"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"stride": 2}, "options are: size, image_size, patch_size"),
    ],
)
def test_bad_options_name_themselves(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("vit_tiny", **options)


def patch_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Noise images 16x16 with one marked 4x4 patch (at a random place of the 4x4 patch grid): class ``k < 3``
    brightens channel ``k`` there, class 3 darkens every channel. Returns images, classes and the patch mask."""
    x = 0.2 * torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    where = torch.randint(0, 16, (n,), generator=generator)
    mask = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        r, c = int(where[i] // 4) * 4, int(where[i] % 4) * 4
        mask[i, :, r : r + 4, c : c + 4] = 1
    shift = torch.cat([2 * torch.eye(3), torch.full((1, 3), -2.0)])[y]  # [n, 3]
    return x + shift[:, :, None, None] * mask, y, mask


def test_a_tiny_vit_trains_in_seconds_and_its_explanations_find_the_evidence() -> None:
    model = tiny()
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for _ in range(60):
        x, y, _ = patch_data(32, generator)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    x, y, mask = patch_data(64, generator)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9
    # the maps' mass gathers on the marked patch, 1/16 of the image (0.06 by chance; measured 0.25-0.44 over
    # two seeds). Grad-CAM of the last block's input is not asked to: its share is 0.03, the known weakness
    # of CAMs on ViTs
    for method in ("attention_rollout", "transformer_attribution", "legrad"):
        maps = explain(model, x, method, target=y).clamp_min(0)
        share = (maps * mask).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
        assert share.mean() > 0.15, (method, float(share.mean()))


def test_every_parameter_is_randomised_by_the_cascading_sanity_check() -> None:
    model = tiny()
    covered = {id(p) for _, m in randomisable_layers(model) for p in m.parameters(recurse=False)}
    assert covered == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("method", ["legrad", "gradcam", "saliency"])
def test_the_cascading_sanity_check_runs_on_a_vit(method: str) -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    result = model_randomisation(model, x, torch.tensor([0, 1]), method=method)
    layers = [name for name, _ in randomisable_layers(model)]
    assert result.layers == layers[::-1] and result.layers[0] == "head" and "tokens" in result.layers
    assert result.spearman.shape == (len(layers), 2) and torch.isfinite(result.spearman).all()
    # once every layer is random, the maps no longer resemble the trained model's
    assert result.spearman[-1].abs().mean() < 0.9


@pytest.mark.parametrize("method", ["attention_rollout", "legrad", "integrated_gradients"])
def test_the_default_metrics_score_vit_explanations(method: str) -> None:
    model = tiny().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    scores = evaluate_explanations(model, x, None, method=method)
    assert scores and all(s.shape == (3,) and torch.isfinite(s).all() for s in scores.values())
