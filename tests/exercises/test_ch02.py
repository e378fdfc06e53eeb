"""Chapter 2: the graders reject plausible wrong versions, with a message that names the mistake.

Also: solutions/ch02_attention.py agrees with the library (minillava.attention, torch's fused
attention, and minillava.vit.EncoderBlock for the block), so text, notebook and library agree.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minillava import attention
from minillava.vit import EncoderBlock
from solutions import ch02_attention as solution
from solutions.ch02_attention import merge_heads, split_heads

# --- causal_mask ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), ["see itself", "diagonal"]),
        (lambda T: torch.ones(T, T, dtype=torch.bool).triu(), ["upper triangle", "future"]),
        (lambda T: ~torch.ones(T, T, dtype=torch.bool).tril(), ["inverted", "forbidden"]),
        (lambda T: torch.ones(T, T).tril(), ["dtype torch.float32, expected torch.bool"]),
    ],
    ids=["off_by_one", "future", "inverted", "float"],
)
def test_causal_mask_rejects(rejects, wrong, mentions):
    wrong.__name__ = "causal_mask"
    rejects(
        "ch02.causal_mask",
        wrong,
        mentions=mentions,
        hint_mentions=["lower triangle", "diagonal included", "booleans"],
    )


# --- scaled_dot_product_attention -----------------------------------------------------------


def make_attention(scale="sqrt", softmax_dim=-1, mask_mode="fill"):
    def scaled_dot_product_attention(q, k, v, mask=None):
        d = q.size(-1)
        scores = q @ k.transpose(-2, -1)
        scores = scores / {"sqrt": math.sqrt(d), "none": 1.0, "d": d}[scale]
        if mask is not None and mask_mode == "fill":
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None and mask_mode == "inverted":
            scores = scores.masked_fill(mask, float("-inf"))
        elif mask is not None and mask_mode == "zero":
            scores = scores.masked_fill(~mask, 0.0)
        weights = scores.softmax(dim=softmax_dim)
        if mask is not None and mask_mode == "after":
            weights = weights * mask
        return weights @ v, weights

    return scaled_dot_product_attention


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (
            make_attention(scale="none"),
            ["attention weights", "not divided by the square root", "saturate"],
        ),
        (make_attention(scale="d"), ["by D, not by the square root of D", "too flat"]),
        (make_attention(softmax_dim=-2), ["softmax ran over the queries", "sum to 1"]),
    ],
    ids=["no_scaling", "scale_by_d", "softmax_wrong_axis"],
)
def test_attention_rejects(rejects, wrong, mentions):
    rejects(
        "ch02.attention",
        wrong,
        mentions=mentions,
        hint_mentions=["square root of the head size", "over the keys, the last dimension"],
    )


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (make_attention(mask_mode="ignore"), ["not applied", "still get weight"]),
        (make_attention(mask_mode="inverted"), ["mask is inverted", "keys the mask hides"]),
        (make_attention(mask_mode="zero"), ["to 0 rather than to minus infinity"]),
        (make_attention(mask_mode="after"), ["zeroed the weights after the softmax", "sum to 1"]),
    ],
    ids=["mask_ignored", "mask_inverted", "fill_zero", "mask_after_softmax"],
)
def test_attention_masks_rejects(rejects, wrong, mentions):
    rejects(
        "ch02.attention_masks",
        wrong,
        mentions=mentions,
        hint_mentions=["masked scores become minus infinity"],
    )
    # ... and the unmasked check does not blame the learner for the mask.
    assert solution_like(wrong)


def solution_like(fn) -> bool:
    from minillava import grading

    return grading.run_check("ch02.attention", fn).passed


def only_output(q, k, v, mask=None):
    return solution.scaled_dot_product_attention(q, k, v, mask)[0]


def four_dims_only(q, k, v, mask=None):
    scores = q @ k.transpose(2, 3) / math.sqrt(q.size(-1))  # fails on (B, T, D) inputs
    weights = scores.softmax(-1)
    return weights @ v, weights


def detached(q, k, v, mask=None):
    out, weights = solution.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), mask)
    return out, weights


def test_attention_rejects_other_mistakes(rejects):
    rejects("ch02.attention", only_output, mentions=["pair (output, weights)", "got Tensor"])
    result = rejects("ch02.attention", four_dims_only, mentions=["Your code raised"])
    assert "scores = q @ k.transpose(2, 3)" in result.message
    assert "no head dim" in result.message  # what was being checked
    rejects(
        "ch02.attention",
        detached,
        mentions=["not connected to q, k, v for autograd", "a detach"],
        hint_mentions=["differentiable"],
    )


# --- split_heads / merge_heads --------------------------------------------------------------


def split_heads_view(x, num_heads):
    B, T, C = x.shape
    return x.view(B, num_heads, T, C // num_heads)


def split_heads_no_transpose(x, num_heads):
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads)


def split_heads_interleaved(x, num_heads):
    B, T, C = x.shape
    return x.view(B, T, C // num_heads, num_heads).permute(0, 3, 1, 2)  # head h: every H-th


def merge_heads_no_transpose(x):
    B, H, T, D = x.shape
    return x.reshape(B, T, H * D)


def test_head_reshapes_reject(rejects):
    rejects(
        "ch02.split_heads",
        split_heads_view,
        mentions=["reshaped straight to (B, H, T, D)", "cuts the sequence"],
        hint_mentions=["contiguous block", "swap the time and head axes"],
    )
    rejects(
        "ch02.split_heads",
        split_heads_no_transpose,
        mentions=["shape (2, 5, 3, 4), expected (2, 3, 5, 4)", "(B, H, T, D)"],
        hint_mentions=["swap the time and head axes"],
    )
    rejects(
        "ch02.split_heads",
        split_heads_interleaved,
        mentions=["every H-th channel", "contiguous block"],
    )
    rejects(
        "ch02.merge_heads",
        merge_heads_no_transpose,
        mentions=["straight to (B, T, H·D)", "mixes tokens of different heads"],
        hint_mentions=["time axis back in front of the heads"],
    )


# --- MultiHeadAttention ---------------------------------------------------------------------


def _qkv(self, x):
    return (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))


class NoOutProj(solution.MultiHeadAttention):
    def forward(self, x, mask=None):
        q, k, v = _qkv(self, x)
        return merge_heads(solution.scaled_dot_product_attention(q, k, v, mask)[0])


class ScrambledHeads(solution.MultiHeadAttention):
    def forward(self, x, mask=None):
        B, T, C = x.shape
        q, k, v = (
            p(x).reshape(B, self.num_heads, T, -1) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(merge_heads(solution.scaled_dot_product_attention(q, k, v, mask)[0]))


class OneHead(solution.MultiHeadAttention):
    def forward(self, x, mask=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(solution.scaled_dot_product_attention(q, k, v, mask)[0])


class IgnoresMask(solution.MultiHeadAttention):
    def forward(self, x, mask=None):
        return super().forward(x, None)


class QueriesAsKeys(solution.MultiHeadAttention):
    def forward(self, x, mask=None):
        q = split_heads(self.q_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        return self.out_proj(merge_heads(solution.scaled_dot_product_attention(q, q, v, mask)[0]))


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (NoOutProj, ["skip the output projection"]),
        (ScrambledHeads, ["reshaped straight to (B, H, T, D)", "mixes tokens"]),
        (OneHead, ["one big head"]),
        (IgnoresMask, ["causal mask", "mask was not passed on"]),
        (QueriesAsKeys, ["MultiHeadAttention(16, 4)", "is wrong"]),
    ],
    ids=["no_out_proj", "scrambled_heads", "one_head", "ignores_mask", "queries_as_keys"],
)
def test_multi_head_attention_rejects(rejects, wrong, mentions):
    wrong.__name__ = "MultiHeadAttention"
    rejects(
        "ch02.multi_head_attention",
        wrong,
        mentions=mentions,
        hint_mentions=["split each into heads", "output projection"],
    )


# --- PreNormBlock ---------------------------------------------------------------------------


class PostNorm(solution.PreNormBlock):
    def forward(self, x, mask=None):
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class NoResidual(solution.PreNormBlock):
    def forward(self, x, mask=None):
        x = self.attn(self.norm1(x), mask)
        return self.mlp(self.norm2(x))


class NormedResidual(solution.PreNormBlock):
    def forward(self, x, mask=None):
        x = self.norm1(x)
        x = x + self.attn(x, mask)
        return x + self.mlp(self.norm2(x))


class WrongNorm(solution.PreNormBlock):
    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm1(x))


class DropsMask(solution.PreNormBlock):
    def forward(self, x, mask=None):
        return super().forward(x, None)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (PostNorm, ["post-norm", "after the residual add"]),
        (NoResidual, ["residual additions are missing"]),
        (NormedResidual, ["carries the normalised x", "un-normalised x"]),
        (WrongNorm, ["used norm1", "norm2"]),
        (DropsMask, ["mask was not passed on"]),
    ],
    ids=["post_norm", "no_residual", "normed_residual", "wrong_norm", "drops_mask"],
)
def test_pre_norm_block_rejects(rejects, wrong, mentions):
    wrong.__name__ = "PreNormBlock"
    rejects(
        "ch02.pre_norm_block",
        wrong,
        mentions=mentions,
        hint_mentions=["two residual branches", "first norm", "second norm"],
    )


# --- the solutions agree with the library ---------------------------------------------------


def test_solutions_agree_with_the_library():
    torch.manual_seed(0)
    for T in (1, 5):
        assert torch.equal(solution.causal_mask(T), attention.causal_mask(T))
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    for mask in (None, attention.causal_mask(5)):
        out, weights = solution.scaled_dot_product_attention(q, k, v, mask)
        ref_out, ref_weights = attention.manual_attention(q, k, v, mask=mask)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(weights, ref_weights)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch.testing.assert_close(out, attention.attention(q, k, v, mask=mask))


def test_solution_block_is_the_library_encoder_block():
    """Same parameter names as minillava.vit.EncoderBlock, and the same function."""
    torch.manual_seed(0)
    ours = solution.PreNormBlock(16, 4, 32)
    theirs = EncoderBlock(16, 4, 32, act="gelu")
    theirs.load_state_dict(ours.state_dict())  # strict: every name matches
    x = torch.randn(2, 6, 16)
    for mask in (None, attention.causal_mask(6)):
        torch.testing.assert_close(ours(x, mask), theirs(x, mask))
    torch.testing.assert_close(
        ours.attn(x),
        theirs.attn(x)[0],  # the attention alone: vit.SelfAttention
    )


# --- grouped_query_attention (stretch) -------------------------------------------------------


def tiled_heads(q, k, v, mask=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)  # kv heads taking turns
    return solution.scaled_dot_product_attention(q, k, v, mask)[0]


def mask_dropped(q, k, v, mask=None):
    return solution.grouped_query_attention(q, k, v)


def never_checks(q, k, v, mask=None):
    group = max(1, q.shape[1] // k.shape[1])
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return solution.scaled_dot_product_attention(q[:, : k.shape[1]], k, v, mask)[0]


def test_grouped_query_attention_rejects(rejects):
    rejects(
        "ch02.grouped_query_attention",
        tiled_heads,
        mentions=["next to each other", "take turns"],
        hint_mentions=["groups of consecutive heads"],
    )
    rejects("ch02.grouped_query_attention", mask_dropped, mentions=["mask was not applied"])
    rejects(
        "ch02.grouped_query_attention",
        never_checks,
        mentions=["cannot be grouped", "no ValueError"],
        hint_mentions=["multiple"],
    )


def test_the_decoders_gqa_agrees_with_the_solution():
    from minillava.attention import attention, causal_mask
    from minillava.decoder import repeat_kv

    q, k, v = torch.randn(2, 8, 6, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    ours = attention(q, repeat_kv(k, 4), repeat_kv(v, 4), causal_mask(6))
    torch.testing.assert_close(solution.grouped_query_attention(q, k, v, causal_mask(6)), ours)
