"""Scaled dot-product attention, written out by hand, and its fast twin.

Every transformer in the course (the ViT, the CLIP text encoder, the decoder) calls `attention`
below. It computes

    Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d) + M) V

where M is 0 where a query may look at a key and -inf where it may not. `use_sdpa=True` hands the
same computation to `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
kernel (FlashAttention on recent GPUs); the tests check that both paths agree. With
`minillava train --parts exercises`, your chapter 2 `scaled_dot_product_attention` replaces both
(minillava/parts.py).

Shapes: q is (B, H, Tq, D); k and v are (B, H, Tk, D); the output is (B, H, Tq, D).
A boolean mask broadcastable to (B, H, Tq, Tk) is True where attention is *allowed*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minillava import parts


def causal_mask(t_q: int, t_k: int | None = None, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True on and below the diagonal: query i sees keys 0..i.

    When Tk > Tq (decoding with a KV cache: Tk - Tq keys are already cached), the queries are the
    *last* Tq positions, so the diagonal is shifted right by Tk - Tq.
    """
    t_k = t_q if t_k is None else t_k
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Tk) 1/0 padding mask -> boolean (B, 1, 1, Tk), broadcastable over heads and queries."""
    return attention_mask.bool()[:, None, None, :]


def manual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by hand. Returns (output (B, H, Tq, D), weights (B, H, Tq, Tk))."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    # A query whose keys are all masked (a padding row) gets NaN from softmax(-inf...): zero it.
    weights = torch.nan_to_num(weights, nan=0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    use_sdpa: bool = True,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(QKᵀ/√d + M)V, through PyTorch's fused kernel (`use_sdpa`) or by hand.

    `is_causal=True` (with `mask=None`) means "plain causal, no padding": SDPA can then pick
    FlashAttention on a GPU, which it cannot do with an explicit boolean mask.
    """
    if is_causal and mask is not None:
        raise ValueError("pass either mask or is_causal=True, not both")
    yours = parts.get("scaled_dot_product_attention")  # a learner's, if chosen (parts.py)
    if yours is not None and dropout_p == 0.0:  # (the exercise has no dropout)
        if is_causal:
            mask = causal_mask(q.size(-2), k.size(-2), device=q.device)
        return yours(q, k, v, mask)
    if is_causal and not use_sdpa:
        mask = causal_mask(q.size(-2), k.size(-2), device=q.device)
    if use_sdpa:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
        if mask is not None:
            # SDPA returns NaN for fully masked query rows; match the manual path (zeros).
            out = torch.nan_to_num(out, nan=0.0)
        return out
    return manual_attention(q, k, v, mask=mask, dropout_p=dropout_p)[0]
