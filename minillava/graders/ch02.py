"""Chapter 2 graders: attention and the Transformer block (exercises/ch02_attention.py).

References: `torch.nn.functional.scaled_dot_product_attention` and minillava.attention for the
attention itself, einops for the head reshapes, minillava.vit.EncoderBlock for the block.
Besides values, the checks compare gradients and test invariants: rows of weights sum to 1,
masked keys get exactly 0 weight, and with a causal mask the past never depends on the future.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minillava import attention as ref
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_tensor,
    diagnose,
    grader,
    step,
)
from minillava.vit import EncoderBlock

TITLE = "Attention"
MODULE = "ch02_attention"


@grader("causal_mask", points=1)
def check_causal_mask(causal_mask):
    """T = 1, 4 and 7 against the lower triangle (diagonal included), dtype bool."""
    for T in (4, 1, 7):
        step(f"calling causal_mask({T})")
        got = causal_mask(T)
        expected = ref.causal_mask(T)
        diagnosis = diagnose(
            got.to(torch.bool) if isinstance(got, torch.Tensor) else got,
            {
                "Your diagonal is False, but each token must see itself: query i may attend to "
                "key i.": expected.tril(-1),
                "You built the upper triangle, the future: True must mean 'may attend', which "
                "is on and below the diagonal, the past.": expected.T,
                "Your mask is inverted: it is True exactly where attention is forbidden, and "
                "True must mean 'may attend'.": ~expected,
            },
        )
        assert_equal(
            got,
            expected,
            f"causal_mask({T})",
            diagnosis=diagnosis,
            hint="Row i is query i, column j is key j. A query may attend to its own position "
            "and every earlier one: the lower triangle, diagonal included, as booleans.",
            why_shape="one row per query and one column per key",
        )


def _reference(q, k, v, mask=None):
    """(output, weights) by the library, and the output by PyTorch's fused kernel."""
    out, weights = ref.manual_attention(q, k, v, mask=mask)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out, weights, fused


def _unpack(result, what: str):
    if not (isinstance(result, tuple) and len(result) == 2):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise GradingFailure(
            f"{what} should return a pair (output, weights), got {got}.",
            "Return both: the output first, then the weights it was averaged with.",
        )
    out, weights = result
    return assert_tensor(out, f"{what}[0] (output)"), assert_tensor(weights, f"{what}[1] (weights)")


def _weights_mistakes(q, k, mask=None) -> dict:
    """What common mistakes give for the weights, so the hint can name the mistake."""
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1)

    def masked(s):
        return s if mask is None else s.masked_fill(~mask, float("-inf"))

    mistakes = {
        "It looks like the scores were not divided by the square root of the head size D: "
        "large dot products then saturate the softmax, and one key takes almost all the "
        "weight.": masked(scores).softmax(-1),
        "It looks like you divided the scores by D, not by the square root of D: the weights "
        "come out too flat.": masked(scores / d).softmax(-1),
        "It looks like the softmax ran over the queries: each query's weights, one row over "
        "the keys, must sum to 1.": masked(scores / math.sqrt(d)).softmax(-2),
    }
    if mask is not None:
        plain = (scores / math.sqrt(d)).softmax(-1)
        mistakes.update(
            {
                "The mask is not applied: masked keys still get weight.": plain,
                "The mask is inverted: True means 'may attend', and your weights go to exactly "
                "the keys the mask hides.": (scores / math.sqrt(d))
                .masked_fill(mask, float("-inf"))
                .softmax(-1),
                "It looks like you set masked scores to 0 rather than to minus infinity: the "
                "exponential of 0 is 1, so masked keys still get weight.": (
                    (scores / math.sqrt(d)).masked_fill(~mask, 0.0).softmax(-1)
                ),
                "It looks like you zeroed the weights after the softmax: masked keys get 0, but "
                "the rows no longer sum to 1.": plain * mask,
            }
        )
    return mistakes


def _check_attention_call(fn, q, k, v, mask, label: str) -> None:
    out_ref, weights_ref, fused = _reference(q, k, v, mask)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    what = f"scaled_dot_product_attention({label})"
    step(f"calling {what}")
    out, weights = _unpack(fn(qg, kg, vg, mask), what)
    mistakes = _weights_mistakes(q, k, mask)
    assert_close(
        weights,
        weights_ref,
        f"The attention weights of {what}",
        why_shape="one weight per (query, key) pair: (..., Tq, Tk)",
        diagnosis=diagnose(weights, mistakes),
        hint="The scores are the dot products of each query with each key, divided by the "
        "square root of the head size; masked scores become minus infinity; a softmax over the "
        "keys, the last dimension, turns each row into weights.",
    )
    assert_close(
        out,
        fused,
        f"The output of {what} (compared with F.scaled_dot_product_attention)",
        why_shape="one output per query, as wide as the values: (..., Tq, Dv)",
        hint="Each query's output is the average of the values, weighted by that query's row "
        "of weights: one matrix product of the weights with v.",
    )
    step(f"back-propagating through {what}")
    grad_out = torch.randn_like(out_ref)
    if not out.requires_grad:
        raise GradingFailure(
            f"The output of {what} is not connected to q, k, v for autograd: no gradient can "
            "flow. Something in the computation left autograd: a detach, a trip through numpy "
            "or a Python number, or a no-grad block.",
            "Build the output from differentiable torch operations on q, k and v themselves.",
        )
    (out * grad_out).sum().backward()
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    (ref.manual_attention(q2, k2, v2, mask=mask)[0] * grad_out).sum().backward()
    for name, mine, theirs in (("q", qg, q2), ("k", kg, k2), ("v", vg, v2)):
        if mine.grad is None:
            raise GradingFailure(f"No gradient reached {name}: is it used in the computation?")
        assert_close(
            mine.grad,
            theirs.grad,
            f"The gradient of the output with respect to {name} in {what}",
            hint="Build the output from differentiable torch operations only.",
        )


@grader("attention", points=3, uses="scaled_dot_product_attention")
def check_attention(scaled_dot_product_attention):
    """No mask: (B, H, T, D) and (B, T, D) inputs, Tq != Tk, Dv != D; values and gradients."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    _check_attention_call(
        scaled_dot_product_attention,
        q,
        k,
        v,
        None,
        "q (2, 3, 5, 8), k (2, 3, 7, 8), v (2, 3, 7, 6)",
    )
    q, k, v = 3 * torch.randn(4, 6, 16), 3 * torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    _check_attention_call(
        scaled_dot_product_attention, q, k, v, None, "q, k, v of shape (4, 6, 16), no head dim"
    )


@grader("attention_masks", points=2, uses="scaled_dot_product_attention")
def check_attention_masks(scaled_dot_product_attention):
    """A causal mask and a padding mask; masked keys get weight 0; the past ignores the future."""
    B, H, T, D = 2, 2, 5, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    causal = ref.causal_mask(T)
    _check_attention_call(scaled_dot_product_attention, q, k, v, causal, "..., mask=causal (5, 5)")
    step("checking that masked keys get exactly zero weight")
    _, weights = scaled_dot_product_attention(q, k, v, causal)
    future = weights.detach()[..., ~causal]
    if future.abs().max() > 0:
        raise GradingFailure(
            "With a causal mask, query i must give weight 0 to every key j > i, but a future "
            f"key got weight {future.abs().max().item():.3g}.",
            "Masked scores must be minus infinity before the softmax: the exponential of "
            "minus infinity is exactly 0.",
        )
    step("changing only the last token's key and value under a causal mask")
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :] += 5.0
    v2[..., -1, :] -= 5.0
    out1, _ = scaled_dot_product_attention(q, k, v, causal)
    out2, _ = scaled_dot_product_attention(q, k2, v2, causal)
    changed = (out1 - out2)[..., :-1, :].abs().amax(dim=(0, 1, 3))  # per earlier position
    if changed.max() > 1e-5:
        first = int((changed > 1e-5).nonzero()[0])
        raise GradingFailure(
            f"With a causal mask, the output at position {first} changed when only the key and "
            f"value of the last position ({T - 1}) changed: the future leaks into the past.",
            "Apply the mask to the scores, before the softmax, where it is False: then no "
            "query reads a later key or value.",
        )
    lengths = torch.tensor([5, 3])  # the second sequence has 2 padding tokens at the end
    padding = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) 1 = real token
    _check_attention_call(
        scaled_dot_product_attention,
        q,
        k,
        v,
        ref.padding_mask(padding),
        "..., mask=padding (2, 1, 1, 5) hiding the last 2 keys of the second sequence",
    )


@grader("split_heads", points=1)
def check_split_heads(split_heads):
    """(2, 5, 12) into 3 heads: out[b, h, t] must be x[b, t, 4h:4h+4]."""
    x = torch.randn(2, 5, 12)
    step("calling split_heads(x, num_heads=3) with x of shape (2, 5, 12)")
    got = split_heads(x, 3)
    expected = rearrange(x, "b t (h d) -> b h t d", h=3)
    interleaved = rearrange(x, "b t (d h) -> b h t d", h=3)  # head h: channels h, h + H, ...
    assert_close(
        got,
        expected,
        "split_heads(x (2, 5, 12), num_heads=3)",
        why_shape="(B, H, T, D) = (2, 3, 5, 4) with D = C / H = 12 / 3",
        diagnosis=diagnose(
            got,
            {
                "It looks like you reshaped straight to (B, H, T, D): that cuts the sequence, "
                "not the channels, so each head mixes pieces of different tokens.": x.reshape(
                    2, 3, 5, 4
                ),
                "Your heads take every H-th channel: head h must take the h-th contiguous block "
                "of D channels of each token.": interleaved,
            },
        ),
        hint="Head h takes the h-th contiguous block of D channels of every token. Cut each "
        "token's channels into H blocks of D first, giving (B, T, H, D), then swap the time "
        "and head axes.",
    )


@grader("merge_heads", points=1)
def check_merge_heads(merge_heads):
    """(2, 3, 5, 4) back to (2, 5, 12), the exact inverse of splitting into heads."""
    x = torch.randn(2, 3, 5, 4)
    step("calling merge_heads(x) with x of shape (2, 3, 5, 4)")
    got = merge_heads(x)
    assert_close(
        got,
        rearrange(x, "b h t d -> b t (h d)"),
        "merge_heads(x (2, 3, 5, 4))",
        why_shape="(B, T, H * D) = (2, 5, 12)",
        diagnosis=diagnose(
            got,
            {
                "It looks like you reshaped (B, H, T, D) straight to (B, T, H·D): that mixes "
                "tokens of different heads, because the heads still come before time in "
                "memory.": x.reshape(2, 5, 12),
            },
        ),
        hint="Undo the split in reverse order: bring the time axis back in front of the heads, "
        "giving (B, T, H, D), then join each token's H blocks of D channels into one row.",
    )
    step("merging heads that were split by the reference")
    y = torch.randn(3, 4, 16)
    assert_close(
        merge_heads(rearrange(y, "b t (h d) -> b h t d", h=4)),
        y,
        "merge_heads(split(y)) (should give y back)",
        hint="Merging must exactly undo the split: head h's D channels go back to the h-th "
        "block of each token.",
    )


def _reference_mha(module: nn.Module, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Multi-head attention computed from `module`'s own weights by the library."""
    h = module.num_heads
    q, k, v = (
        rearrange(proj(x), "b t (h d) -> b h t d", h=h)
        for proj in (module.q_proj, module.k_proj, module.v_proj)
    )
    out = ref.manual_attention(q, k, v, mask=mask)[0]
    return module.out_proj(rearrange(out, "b h t d -> b t (h d)"))


def _mha_mistakes(module: nn.Module, x: torch.Tensor, mask=None) -> dict:
    h = module.num_heads
    q, k, v = (p(x) for p in (module.q_proj, module.k_proj, module.v_proj))
    scrambled = [t.reshape(t.shape[0], h, t.shape[1], -1) for t in (q, k, v)]
    heads = rearrange(ref.manual_attention(*scrambled, mask=mask)[0], "b h t d -> b t (h d)")
    single = ref.manual_attention(q, k, v, mask=mask)[0]
    return {
        "The merged heads skip the output projection: the result must go through out_proj "
        "after the heads are merged.": rearrange(
            ref.manual_attention(
                *(rearrange(t, "b t (h d) -> b h t d", h=h) for t in (q, k, v)), mask=mask
            )[0],
            "b h t d -> b t (h d)",
        ),
        "It looks like q, k and v were reshaped straight to (B, H, T, D): that mixes "
        "tokens, where splitting into heads cuts each token's channels.": module.out_proj(heads),
        "It looks like q, k and v were not split into heads: this is one big head, not "
        "num_heads small ones.": module.out_proj(single),
        "The mask was not passed on to the attention: positions see what the mask hides.": (
            _reference_mha(module, x, None)
        )
        if mask is not None
        else None,
    }


def _compare_modules(mine: nn.Module, x, mask, expected, what, mistakes, hint):
    step(f"calling {what}")
    xg = x.clone().requires_grad_(True)
    got = mine(xg, mask) if mask is not None else mine(xg)
    assert_close(
        got,
        expected,
        what,
        why_shape="the output has the input's shape (B, T, C)",
        diagnosis=diagnose(got, mistakes),
        hint=hint,
        atol=1e-5,
    )
    step(f"back-propagating through {what}")
    if not got.requires_grad:
        raise GradingFailure(f"The output of {what} does not require grad: no gradient can flow.")
    return got, xg


@grader("multi_head_attention", points=3, uses="MultiHeadAttention")
def check_multi_head_attention(MultiHeadAttention):
    """Against the library with the module's own weights, with and without a causal mask."""
    step("building MultiHeadAttention(hidden_size=16, num_heads=4)")
    mha = MultiHeadAttention(16, 4)
    if not hasattr(mha, "num_heads"):
        raise GradingFailure(
            "MultiHeadAttention lost its num_heads attribute, which the given constructor sets.",
            "Keep the constructor as it was given and write only the forward pass.",
        )
    x, T = torch.randn(2, 6, 16), 6
    for mask, label in ((None, "no mask"), (ref.causal_mask(T), "a causal mask (6, 6)")):
        expected = _reference_mha(mha, x, mask)
        got, xg = _compare_modules(
            mha,
            x,
            mask,
            expected,
            f"MultiHeadAttention(16, 4) on x (2, 6, 16) with {label}",
            _mha_mistakes(mha, x, mask),
            "Project x to queries, keys and values, split each into heads, attend with the "
            "mask, merge the heads, then apply the output projection.",
        )
        grad_out = torch.randn_like(expected)
        mha.zero_grad()
        (got * grad_out).sum().backward()
        mine = {n: p.grad.clone() for n, p in mha.named_parameters() if p.grad is not None}
        mha.zero_grad()
        x2 = x.clone().requires_grad_(True)
        (_reference_mha(mha, x2, mask) * grad_out).sum().backward()
        for name, p in mha.named_parameters():
            if name not in mine:
                raise GradingFailure(f"No gradient reached {name}: is it used in forward?")
            assert_close(mine[name], p.grad, f"The gradient of {name}")
        assert_close(xg.grad, x2.grad, "The gradient with respect to the input x")


class _ReferenceAttention(nn.Module):
    """Library multi-head attention with the exercise's parameter names, to isolate the block."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.num_heads = source.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, getattr(source, name))

    def forward(self, x, mask=None):
        return _reference_mha(self, x, mask)


@grader("pre_norm_block", points=2, uses="PreNormBlock")
def check_pre_norm_block(PreNormBlock):
    """Against minillava.vit.EncoderBlock with the same weights, with and without a mask."""
    C, H, I = 16, 4, 32
    step("building PreNormBlock(hidden_size=16, num_heads=4, intermediate_size=32)")
    block = PreNormBlock(C, H, I)
    # Grade the block's wiring alone: its attention is replaced by the library's (same weights),
    # so an unfinished MultiHeadAttention does not cost these points twice.
    block.attn = _ReferenceAttention(block.attn)
    with torch.no_grad():  # non-trivial norms, so a missing or misplaced norm shows
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    reference = EncoderBlock(C, H, I, eps=block.norm1.eps, act="gelu")
    reference.load_state_dict(block.state_dict())
    x = 2 * torch.randn(2, 6, C) + 1
    for mask, label in ((None, "no mask"), (ref.causal_mask(6), "a causal mask (6, 6)")):
        with torch.no_grad():
            expected = reference(x, mask)
            n1, n2 = block.norm1, block.norm2
            attn_out = block.attn(n1(x), mask)
            mistakes = {
                "This is a post-norm block, with the norm after the residual add: pre-norm "
                "normalises only inside each branch, never the residual stream.": n2(
                    n1(x + block.attn(x, mask)) + block.mlp(n1(x + block.attn(x, mask)))
                ),
                "The residual additions are missing: each branch's output must be added to "
                "the input of that branch.": block.mlp(n2(attn_out)),
                "Your residual stream carries the normalised x: the stream must carry the "
                "un-normalised x, and only the branch sees the norm.": (
                    lambda h: h + block.mlp(n2(h))
                )(n1(x) + attn_out),
                "The MLP branch used norm1, the attention's norm: it has its own, norm2.": (
                    lambda h: h + block.mlp(n1(h))
                )(x + attn_out),
                "The mask was not passed on to the attention: positions see what the mask hides.": (
                    lambda h: h + block.mlp(n2(h))
                )(x + block.attn(n1(x), None))
                if mask is not None
                else None,
            }
        got, xg = _compare_modules(
            block,
            x,
            mask,
            expected,
            f"PreNormBlock(16, 4, 32) on x (2, 6, 16) with {label}",
            mistakes,
            "Two residual branches in turn: add to x the attention of the first norm of x "
            "(with the mask), then add to the result the MLP of its second norm.",
        )
        grad_out = torch.randn_like(expected)
        (got * grad_out).sum().backward()
        x2 = x.clone().requires_grad_(True)
        (reference(x2, mask) * grad_out).sum().backward()
        assert_close(
            xg.grad,
            x2.grad,
            f"The gradient with respect to x of the block ({label})",
            hint="Gradients flow through the residual additions: avoid changing x in place.",
        )


@grader("grouped_query_attention", points=3)
def check_grouped_query_attention(grouped_query_attention):
    """Stretch: 6 query heads over 2 and over 3 key/value heads, causal mask, against the
    decoder's own GQA (repeat_kv then attention); the grouping is told apart from tiling."""
    from minillava.decoder import repeat_kv

    for H, H_kv in ((6, 2), (6, 3), (4, 4)):
        q = torch.randn(2, H, 5, 8)
        k, v = torch.randn(2, H_kv, 5, 8), torch.randn(2, H_kv, 5, 8)
        mask = ref.causal_mask(5)
        step(f"calling grouped_query_attention with {H} query heads, {H_kv} key/value heads")
        got = grouped_query_attention(q, k, v, mask)
        group = H // H_kv
        expected = ref.attention(q, repeat_kv(k, group), repeat_kv(v, group), mask)
        tiled = ref.attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), mask)
        assert_close(
            got,
            expected,
            f"grouped_query_attention, {H} query heads over {H_kv} key/value heads",
            why_shape=f"one output per query head: (B, H, T, D) = (2, {H}, 5, 8)",
            diagnosis=diagnose(
                got,
                {
                    "Query head 1 read key/value head 1, not 0: the copies of a key/value head "
                    "must sit next to each other (the first H / H_kv query heads share key/value "
                    "head 0), and yours take turns round the key/value heads.": tiled,
                    "The mask was not applied: a position sees the future.": ref.attention(
                        q, repeat_kv(k, group), repeat_kv(v, group)
                    ),
                },
            ),
            hint="The H query heads come in H_kv groups of consecutive heads, H / H_kv in each; "
            "every query head of a group reads the same key/value head.",
        )
    step("calling it with 6 query heads over 4 key/value heads (4 does not divide 6)")
    try:
        grouped_query_attention(torch.randn(1, 6, 3, 4), torch.randn(1, 4, 3, 4),
                                torch.randn(1, 4, 3, 4))  # fmt: skip
    except ValueError:
        return
    raise GradingFailure(
        "6 query heads over 4 key/value heads cannot be grouped, and no ValueError was raised: "
        "a silent wrong answer is the worst kind.",
        "Check that H is a multiple of H_kv before anything else.",
    )
