"""minillava.attention: masks, the hand-written path against PyTorch's fused SDPA."""

import math

import pytest
import torch

from minillava.attention import attention, causal_mask, manual_attention, padding_mask


def qkv(B=2, H=3, Tq=5, Tk=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Tq, D, generator=g),
        torch.randn(B, H, Tk, D, generator=g),
        torch.randn(B, H, Tk, D, generator=g),
    )


def reference_attention(q, k, v, mask=None):
    """softmax(QKᵀ/√d) V one query at a time, with plain Python loops over the keys allowed."""
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, v.shape[-1])
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                allowed = [
                    j
                    for j in range(k.shape[2])
                    if mask is None or bool(mask.expand(B, H, Tq, -1)[b, h, i, j])
                ]
                if not allowed:
                    continue  # fully masked query: zeros
                scores = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in allowed])
                weights = scores.softmax(0)
                out[b, h, i] = sum(w * v[b, h, j] for w, j in zip(weights, allowed, strict=True))
    return out


def test_causal_mask_square():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)


def test_causal_mask_with_cache_offset():
    # 3 keys cached, 2 new queries: they are positions 3 and 4, so they see keys 0..3 and 0..4.
    m = causal_mask(2, 5)
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    # One query (a decoding step) sees every cached key.
    assert causal_mask(1, 7).all()


def test_padding_mask_shape_and_values():
    am = torch.tensor([[0, 1, 1], [1, 1, 0]])
    pm = padding_mask(am)
    assert pm.shape == (2, 1, 1, 3) and pm.dtype == torch.bool
    assert torch.equal(pm[:, 0, 0], am.bool())


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_attention_matches_loop_reference(use_sdpa):
    q, k, v = qkv()
    mask = causal_mask(5)
    got = attention(q, k, v, mask=mask, use_sdpa=use_sdpa)
    torch.testing.assert_close(got, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "padding", "causal_and_padding", "random", "cache_offset"]
)
def test_manual_equals_sdpa(mask_kind):
    Tq, Tk = (3, 6) if mask_kind == "cache_offset" else (6, 6)
    q, k, v = qkv(Tq=Tq, Tk=Tk, seed=1)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    masks = {
        "none": None,
        "causal": causal_mask(Tq, Tk),
        "padding": padding_mask(am),
        "causal_and_padding": causal_mask(Tq, Tk) & padding_mask(am),
        "random": torch.rand(2, 3, Tq, Tk, generator=torch.Generator().manual_seed(2)) > 0.4,
        "cache_offset": causal_mask(Tq, Tk),
    }
    mask = masks[mask_kind]
    manual = attention(q, k, v, mask=mask, use_sdpa=False)
    fused = attention(q, k, v, mask=mask, use_sdpa=True)
    torch.testing.assert_close(manual, fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(use_sdpa):
    q, k, v = qkv(B=1, H=2, Tq=4, Tk=4)
    mask = causal_mask(4)[None, None].clone().expand(1, 2, 4, 4).clone()
    mask[:, :, 1] = False  # query 1 may look at nothing
    out = attention(q, k, v, mask=mask, use_sdpa=use_sdpa)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    # The other rows are untouched by the empty one.
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_manual_attention_weights():
    q, k, v = qkv()
    mask = causal_mask(5)
    out, weights = manual_attention(q, k, v, mask=mask)
    assert weights.shape == (2, 3, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    assert (weights[..., ~mask] == 0).all(), "masked keys must get exactly zero weight"
    torch.testing.assert_close(out, weights @ v)


def test_attention_gradients_match_between_paths():
    q, k, v = qkv(seed=3)
    grads = []
    for use_sdpa in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, mask=causal_mask(5), use_sdpa=use_sdpa).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g_manual, g_sdpa in zip(*grads, strict=True):
        torch.testing.assert_close(g_manual, g_sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_is_causal_equals_an_explicit_causal_mask(use_sdpa):
    """The flag the decoder uses for unpadded training (FlashAttention on GPU) is the same math."""
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    explicit = attention(q, k, v, mask=causal_mask(6), use_sdpa=use_sdpa)
    flagged = attention(q, k, v, is_causal=True, use_sdpa=use_sdpa)
    torch.testing.assert_close(flagged, explicit)
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, mask=causal_mask(6), is_causal=True)
