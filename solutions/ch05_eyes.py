"""Chapter 5, The Eyes: reference solutions. Same names and signatures as exercises/ch05_eyes.py.

The library versions live in minillava/vit.py (patchify, VisionEmbeddings, SelfAttention) and
minillava/attention.py (manual_attention). The stretch, sincos_2d_positions, has no library twin:
minillava's ViT learns its positions, as CLIP does.
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


def _sincos_1d(positions: Tensor, width: int) -> Tensor:
    """(P,) positions -> (P, width): width/2 sines, then the cosines; ω_i = 10000^(-2i/width)."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) * 2 / width)
    angles = positions.double()[:, None] * omega[None]  # (P, width/2): position times frequency
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_positions(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """(grid_h * grid_w, dim): the column's 1-D code in the first half, the row's in the second."""
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 (two halves, sines and cosines), got {dim}")
    index = torch.arange(grid_h * grid_w)  # row-major, as patchify orders the patches
    rows, cols = index // grid_w, index % grid_w
    code = torch.cat([_sincos_1d(cols, dim // 2), _sincos_1d(rows, dim // 2)], dim=1)
    return code.float()  # computed in float64: float32 angles lose digits at large positions
