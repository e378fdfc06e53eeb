"""Tests of minillava.gated_cross_attention: Flamingo's gated block starts as the identity."""

import pytest
import torch

from minillava.decoder import count_parameters
from minillava.gated_cross_attention import (
    GatedCrossAttentionBlock,
    flamingo_layers_num_parameters,
)


def test_a_new_block_leaves_the_frozen_llms_hidden_states_unchanged():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(text_dim=32, vision_dim=24, num_heads=4)
    text, image = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    assert torch.equal(block(text, image), text)  # tanh(0) = 0: exactly, not approximately


def test_opened_gates_let_the_image_change_every_text_position():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(text_dim=32, vision_dim=24, num_heads=4)
    with torch.no_grad():
        block.alpha_attn.fill_(0.5)
        block.alpha_dense.fill_(0.5)
    text = torch.randn(2, 7, 32)
    out_a = block(text, torch.randn(2, 5, 24))
    out_b = block(text, torch.randn(2, 5, 24))
    assert out_a.shape == (2, 7, 32)
    assert ((out_a - out_b).abs().amax(dim=-1) > 1e-4).all()  # each position read the image


def test_the_gates_get_gradients_at_zero():
    # tanh'(0) = 1: closed gates still learn to open (a ReLU gate at 0 would be stuck).
    block = GatedCrossAttentionBlock(text_dim=16, vision_dim=8, num_heads=2)
    block(torch.randn(1, 3, 16), torch.randn(1, 4, 8)).sum().backward()
    assert block.alpha_attn.grad.abs() > 0 and block.alpha_dense.grad.abs() > 0


def test_parameter_count_on_the_meta_device_equals_the_real_blocks():
    real = count_parameters(GatedCrossAttentionBlock(text_dim=32, vision_dim=24, num_heads=4))
    assert flamingo_layers_num_parameters(32, 24, llm_layers=8, every=4, num_heads=4) == 2 * real
    # At Vicuna-7B's width, every 4th of 32 layers (Flamingo-9B's spacing): over a billion.
    assert flamingo_layers_num_parameters(4096, 1024, llm_layers=32, every=4) > 1e9


def test_mismatched_shapes_are_named():
    block = GatedCrossAttentionBlock(text_dim=16, vision_dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, T, C_text\)"):
        block(torch.randn(3, 16), torch.randn(1, 4, 8))
