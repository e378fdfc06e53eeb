"""Tests of minillava.resampler: shapes, the parameter formula, what the bridges can see."""

import pytest
import torch

from minillava.decoder import count_parameters
from minillava.resampler import (
    PerceiverResampler,
    QFormerBridge,
    ResamplerConfig,
    qformer_num_parameters,
)

BRIDGES = [PerceiverResampler, QFormerBridge]


def tiny_config(**overrides) -> ResamplerConfig:
    settings = dict(
        vision_dim=24, text_dim=40, hidden_size=32, num_latents=5, num_layers=3, num_heads=4,
        intermediate_size=48,
    )  # fmt: skip
    settings.update(overrides)
    return ResamplerConfig(**settings)


@pytest.mark.parametrize("bridge_cls", BRIDGES)
def test_output_has_num_latents_tokens_whatever_the_number_of_patches(bridge_cls):
    torch.manual_seed(0)
    bridge = bridge_cls(tiny_config())
    for num_patches in (4, 36, 49):
        out = bridge(torch.randn(2, num_patches, 24))
        assert out.shape == (2, 5, 40)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("bridge_cls", BRIDGES)
def test_each_image_gets_its_own_tokens_and_batching_changes_nothing(bridge_cls):
    torch.manual_seed(0)
    bridge = bridge_cls(tiny_config()).eval()
    features = torch.randn(3, 16, 24)
    out = bridge(features)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # different images, different tokens
    torch.testing.assert_close(bridge(features[1:2]), out[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bridge_cls", BRIDGES)
def test_bridge_ignores_the_order_of_the_patches(bridge_cls):
    """Attention is a weighted sum over the patches: without position information in the features
    (the ViT adds it), the latents cannot tell where a patch was."""
    torch.manual_seed(0)
    bridge = bridge_cls(tiny_config()).eval()
    features = torch.randn(2, 16, 24)
    shuffled = features[:, torch.randperm(16)]
    torch.testing.assert_close(bridge(shuffled), bridge(features), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bridge_cls", BRIDGES)
def test_gradients_reach_the_learned_queries_and_the_input(bridge_cls):
    torch.manual_seed(0)
    bridge = bridge_cls(tiny_config())
    features = torch.randn(2, 9, 24, requires_grad=True)
    bridge(features).square().mean().backward()
    queries = bridge.latents if bridge_cls is PerceiverResampler else bridge.query_tokens
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_layers": 1},
        {"num_layers": 4, "cross_attention_every": 1},
        {"num_layers": 5, "cross_attention_every": 3},
        {"vision_dim": 32, "text_dim": 32},
    ],
)
def test_qformer_formula_matches_the_module(overrides):
    config = tiny_config(**overrides)
    expected = count_parameters(QFormerBridge(config))
    got = qformer_num_parameters(
        config.vision_dim,
        config.text_dim,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_queries=config.num_latents,
        intermediate_size=config.intermediate_size,
        cross_attention_every=config.cross_attention_every,
    )
    assert got == expected


def test_qformer_cross_attention_only_every_kth_layer():
    bridge = QFormerBridge(tiny_config(num_layers=5, cross_attention_every=2))
    assert [layer.cross_attn is not None for layer in bridge.layers] == [1, 0, 1, 0, 1]


def test_blip2_sized_qformer_query_path_is_about_107m():
    """BLIP-2 reports 188M for its Q-Former; the query path is the part without BERT's word
    embeddings (30522 x 768) and the 12 text-only FFNs."""
    query_path = qformer_num_parameters(vision_dim=1408, text_dim=2560)
    assert 105e6 < query_path < 109e6
    word_embeddings = 30522 * 768 + 512 * 768 + 2 * 768  # + position embeddings + LayerNorm
    text_ffns = 12 * (2 * 768 * 3072 + 3072 + 768 + 2 * 768)
    assert abs(query_path + word_embeddings + text_ffns - 188e6) < 3e6


def test_count_parameters_trainable_only():
    bridge = PerceiverResampler(tiny_config())
    total = count_parameters(bridge)
    assert total == sum(p.numel() for p in bridge.parameters())
    bridge.input_proj.requires_grad_(False)
    frozen = bridge.input_proj.weight.numel() + bridge.input_proj.bias.numel()
    assert count_parameters(bridge, trainable_only=True) == total - frozen


def test_bad_inputs_have_clear_errors():
    bridge = PerceiverResampler(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, P, 24\)"):
        bridge(torch.randn(2, 9, 23))
    with pytest.raises(ValueError, match="patch_features"):
        bridge(torch.randn(9, 24))
    with pytest.raises(ValueError, match="num_heads"):
        ResamplerConfig(hidden_size=30, num_heads=4)
