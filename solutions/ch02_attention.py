"""Chapter 2 reference solutions: attention. Same names and signatures as exercises/."""

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn


def causal_mask(T: int) -> Tensor:
    """(T, T) bool, True on and below the diagonal: query i sees keys 0..i."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ / sqrt(D) + M) v -> (output (..., Tq, Dv), weights (..., Tq, Tk))."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # over the keys: each query's weights sum to 1
    return weights @ v, weights


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, C) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: H heads attend in parallel, each in its own D-dim slice."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        q = split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        out, _ = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T, D)
        return self.out_proj(merge_heads(out))  # (B, T, C)


class PreNormBlock(nn.Module):
    """A pre-norm Transformer block: attention, then an MLP, each in a residual branch."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = MultiHeadAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(hidden_size, intermediate_size),
                act=nn.GELU(),
                fc2=nn.Linear(intermediate_size, hidden_size),
            )
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.norm1(x), mask)
        x = x + self.mlp(self.norm2(x))
        return x


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, H, T, D) queries, (B, H_kv, T, D) keys and values -> (B, H, T, D)."""
    H, H_kv = q.shape[1], k.shape[1]
    if H % H_kv != 0 or v.shape[1] != H_kv:
        raise ValueError(
            f"{H} query heads cannot be grouped over {H_kv} key heads and {v.shape[1]} value "
            "heads: the key/value heads must be equal in number and divide the query heads"
        )
    group = H // H_kv
    # Copies of one key/value head side by side: heads 0..g-1 read kv head 0, and so on.
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(group, dim=1)
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    return out
