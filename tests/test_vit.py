"""Tests of minillava.vit: shapes, conv-as-linear, the attention paths, position embeddings."""

import pytest
import torch
import torch.nn.functional as F

from minillava.vit import (
    EncoderBlock,
    PatchEmbedding,
    VisionTransformer,
    ViTClassifier,
    ViTConfig,
    patchify,
    unpatchify,
)


def tiny_config(**overrides) -> ViTConfig:
    settings = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
    )
    settings.update(overrides)
    return ViTConfig(**settings)


def test_output_shapes_and_dtypes():
    torch.manual_seed(0)
    config = tiny_config()
    model = VisionTransformer(config).eval()
    out = model(torch.randn(3, 3, 16, 16))
    tokens = 1 + config.num_patches  # [CLS] + 16 patches
    assert config.num_patches == 16
    assert out.last_hidden_state.shape == (3, tokens, 32)
    assert out.pooled_output.shape == (3, 32)
    assert len(out.hidden_states) == config.num_layers + 1
    assert all(h.shape == (3, tokens, 32) for h in out.hidden_states)
    assert out.last_hidden_state.dtype == torch.float32
    assert out.attentions is None
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_hidden_states_follow_hf_clip_convention():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    # [0] = embeddings after pre_layernorm, [i] = block i applied to [i - 1]
    torch.testing.assert_close(out.hidden_states[0], model.pre_layernorm(model.embeddings(x)))
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(out.hidden_states[i + 1], block(out.hidden_states[i]))
    # pooled = post_layernorm of the [CLS] token only
    torch.testing.assert_close(out.pooled_output, model.post_layernorm(out.last_hidden_state[:, 0]))
    # LLaVA's features: penultimate layer, [CLS] dropped
    torch.testing.assert_close(model.patch_features(x), out.hidden_states[-2][:, 1:])


def test_patch_features_runs_only_the_blocks_that_layer_needs():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(num_layers=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    hidden_states = model(x).hidden_states
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    for layer, blocks_run in [(-2, [0, 1]), (-1, [0, 1, 2]), (0, []), (1, [0]), (-4, [])]:
        calls.clear()
        features = model.patch_features(x, layer=layer)
        assert calls == blocks_run, f"layer={layer}"
        torch.testing.assert_close(features, hidden_states[layer][:, 1:], atol=0, rtol=0)
    for bad in (4, -5):
        with pytest.raises(ValueError, match="hidden states"):
            model.patch_features(x, layer=bad)


def test_parameter_names_match_the_contract():
    names = set(VisionTransformer(tiny_config(num_layers=1)).state_dict())
    expected = {
        "embeddings.patch_embedding.weight",  # no bias
        "embeddings.class_embedding",
        "embeddings.position_embedding.weight",
        "pre_layernorm.weight",
        "pre_layernorm.bias",
        "post_layernorm.weight",
        "post_layernorm.bias",
    }
    for part in ("norm1", "norm2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"):
        expected |= {f"blocks.0.{part}.weight", f"blocks.0.{part}.bias"}
    expected |= {f"blocks.0.mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    assert names == expected


def test_attentions_are_probabilities():
    torch.manual_seed(0)
    config = tiny_config()
    out = VisionTransformer(config).eval()(torch.randn(2, 3, 16, 16), output_attentions=True)
    assert len(out.attentions) == config.num_layers
    for weights in out.attentions:
        assert weights.shape == (2, config.num_heads, 17, 17)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, config.num_heads, 17))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_manual_attention_equals_sdpa(act):
    torch.manual_seed(0)
    fast = VisionTransformer(tiny_config(use_sdpa=True, hidden_act=act)).eval()
    slow = VisionTransformer(tiny_config(use_sdpa=False, hidden_act=act)).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 16, 16)
    out_fast, out_slow = fast(x), slow(x)
    out_with_weights = fast(x, output_attentions=True)  # the manual path, whatever use_sdpa says
    for a, b, c in zip(
        out_fast.hidden_states, out_slow.hidden_states, out_with_weights.hidden_states, strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_patchify_layout():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 4 * 4 * 3)
    # patch 1 is the top-right 4x4 square; its vector lists pixels row by row, channels innermost
    top_right = images[0, :, :4, 4:]  # (C, p, p)
    assert torch.equal(patches[0, 1], top_right.permute(1, 2, 0).reshape(-1))
    # patch 2 starts the second row of patches
    assert torch.equal(patches[1, 2], images[1, :, 4:, :4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, num_channels=3), images)


def test_patch_embedding_conv_is_a_linear_map_on_patches():
    torch.manual_seed(0)
    embed = PatchEmbedding(num_channels=3, hidden_size=10, patch_size=4)
    images = torch.randn(2, 3, 16, 16)
    via_conv = embed(images)  # (B, N, C)
    via_linear = patchify(images, 4) @ embed.linear_weight().T  # the same weights, reshaped
    assert via_conv.shape == (2, 16, 10)
    torch.testing.assert_close(via_conv, via_linear, atol=1e-5, rtol=1e-5)
    # ... and it is nothing else: F.linear with those weights agrees as well
    torch.testing.assert_close(via_conv, F.linear(patchify(images, 4), embed.linear_weight()))


def test_without_position_embeddings_shuffling_patches_only_shuffles_outputs():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    images = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16)
    shuffled = unpatchify(patchify(images, 4)[:, perm], 4)  # the same patches, rearranged

    with torch.no_grad():
        model.embeddings.position_embedding.weight.zero_()
    out, out_shuffled = model(images), model(shuffled)
    # Attention sees a set: each patch's output moves with its patch, [CLS] is unchanged.
    torch.testing.assert_close(
        out_shuffled.last_hidden_state[:, 1:], out.last_hidden_state[:, 1:][:, perm]
    )
    torch.testing.assert_close(out_shuffled.pooled_output, out.pooled_output)

    # With position embeddings the model can tell where each patch was.
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(std=0.5)
    out, out_shuffled = model(images), model(shuffled)
    assert not torch.allclose(out_shuffled.pooled_output, out.pooled_output, atol=1e-3)


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 16, 16), (2, 3, 32, 32), (2, 3, 16, 12), (3, 16, 16)],
    ids=["wrong-channels", "wrong-size", "not-square", "no-batch-dim"],
)
def test_bad_input_shape_names_the_expected_shape(shape):
    model = VisionTransformer(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.randn(shape))


def test_integer_images_are_rejected():
    model = VisionTransformer(tiny_config())
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=18), "multiple of"),
        (dict(num_heads=5), "divisible"),
        (dict(hidden_act="relu"), "hidden_act"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_low_precision_weights_give_low_precision_outputs():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).to(torch.bfloat16).eval()
    out = model(torch.randn(2, 3, 16, 16))  # float32 pixels are cast to the weights' dtype
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.isfinite(out.pooled_output.float()).all()


def test_encoder_block_respects_a_causal_mask():
    torch.manual_seed(0)
    block = EncoderBlock(16, 2, 32).eval()
    x = torch.randn(1, 5, 16)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    changed = x.clone()
    changed[:, 3:] = torch.randn(1, 2, 16)  # change the future
    out, out_changed = block(x, mask=mask), block(changed, mask=mask)
    torch.testing.assert_close(out[:, :3], out_changed[:, :3])
    assert not torch.allclose(out[:, 3:], out_changed[:, 3:])


def test_init_matches_clip():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_layers=2)
    model = VisionTransformer(config)
    width, residual = 64, (2 * 2) ** -0.5
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    stds = {
        "position": (model.embeddings.position_embedding.weight.std(), 0.02),
        "q_proj": (attn.q_proj.weight.std(), width**-0.5),
        "out_proj": (attn.out_proj.weight.std(), width**-0.5 * residual),
        "fc1": (mlp.fc1.weight.std(), (2 * width) ** -0.5),
        "fc2": (mlp.fc2.weight.std(), width**-0.5 * residual),
    }
    for name, (got, expected) in stds.items():
        assert abs(got.item() - expected) < 0.15 * expected, f"{name}: std {got:.4f}"
    assert torch.equal(attn.q_proj.bias, torch.zeros(width))
    assert torch.equal(model.pre_layernorm.weight, torch.ones(width))


def test_classifier_learns_a_colour():
    """A tiny ViTClassifier separates red images from blue ones in a few steps."""
    torch.manual_seed(0)
    model = ViTClassifier(tiny_config(num_layers=1), num_classes=2)
    labels = torch.randint(0, 2, (32,))
    images = torch.randn(32, 3, 16, 16) * 0.3
    images[:, 0] += 1.0 - 2.0 * labels[:, None, None]  # class 0: red channel high, else low
    assert model(images).shape == (32, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(images), labels)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    assert (model(images).argmax(-1) == labels).float().mean() == 1.0
