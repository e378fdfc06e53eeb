"""Chapter 5, The Eyes: reference solutions. Same names and signatures as exercises/ch05_eyes.py.

The library versions live in minillava/vit.py (patchify, VisionEmbeddings, SelfAttention) and
minillava/attention.py (manual_attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches row by row, each patch's pixels as (p1, p2, c)."""
    return rearrange(
        images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch_size, p2=patch_size
    )


def add_cls_and_positions(
    patch_tokens: Tensor, cls_token: Tensor, position_embeddings: Tensor
) -> Tensor:
    """[CLS, patch_1, ..., patch_N] + positions: (B, N, C), (C,), (N + 1, C) -> (B, N + 1, C)."""
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)  # (B, 1, C): the same vector per image
    tokens = torch.cat([cls, patch_tokens], dim=1)  # (B, N + 1, C), CLS first
    return tokens + position_embeddings  # slot 0 is CLS's position, slot i patch i's


def attention_head(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor]:
    """One head of self-attention: x (B, T, C), w_* (D, C) -> (out (B, T, D), weights (B, T, T))."""
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T  # (B, T, D) each
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, T_query, T_key)
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v, weights


def position_similarity(position_embeddings: Tensor) -> Tensor:
    """Cosine similarity of every pair of position embeddings: (N, C) -> (N, N)."""
    unit = F.normalize(position_embeddings, dim=-1)  # each row to length 1
    return unit @ unit.T
