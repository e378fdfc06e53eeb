"""Chapter 7, the Bridge: reference solutions (same names and signatures as exercises/)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_projector(image_features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(B, P, C_v) features, weight (C_t, C_v), bias (C_t,) -> (B, P, C_t)."""
    return image_features @ weight.T + bias


def mlp_projector(
    image_features: Tensor, weight_1: Tensor, bias_1: Tensor, weight_2: Tensor, bias_2: Tensor
) -> Tensor:
    """LLaVA-1.5's mlp2x_gelu: Linear(C_v -> C_t), GELU, Linear(C_t -> C_t)."""
    hidden = F.gelu(linear_projector(image_features, weight_1, bias_1))  # (B, P, C_t)
    return linear_projector(hidden, weight_2, bias_2)  # (B, P, C_t)


def projector_num_parameters(kind: str, vision_dim: int, text_dim: int) -> int:
    """Trainable numbers in build_projector(kind, vision_dim, text_dim), by formula."""
    first = vision_dim * text_dim + text_dim  # weight (C_t, C_v) + bias (C_t,)
    if kind == "linear":
        return first
    if kind == "mlp2x_gelu":
        return first + text_dim * text_dim + text_dim  # + the second layer (C_t, C_t) + (C_t,)
    raise ValueError(f"unknown projector kind {kind!r}")


def nearest_text_tokens(projected: Tensor, token_embeddings: Tensor, k: int = 5) -> tuple:
    """(N, C) vectors, (V, C) embedding table -> (cosines (N, k), token ids (N, k)), best first."""
    cosines = F.normalize(projected, dim=-1) @ F.normalize(token_embeddings, dim=-1).T  # (N, V)
    values, ids = cosines.topk(k, dim=-1)
    return values, ids
