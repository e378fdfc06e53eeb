"""Chapter 7, the Bridge: reference solutions (same names and signatures as exercises/)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: M learned latents read P patches; (B, P, C_v) -> (B, M, C_t).

    Its parameters, names included, are those of minillava.resampler.PerceiverResampler.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        hidden_size: int = 128,
        num_latents: int = 16,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 512,
        eps: float = 1e-5,
    ):
        super().__init__()
        d = hidden_size
        self.num_heads = num_heads
        self.latents = nn.Parameter(torch.randn(num_latents, d) * d**-0.5)  # (M, D)
        self.input_proj = nn.Linear(vision_dim, d)  # the patches to the latents' width
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_media": nn.LayerNorm(d, eps=eps),
                    "norm_latents": nn.LayerNorm(d, eps=eps),
                    "attn": nn.ModuleDict(
                        {
                            name: nn.Linear(d, d)
                            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
                        }
                    ),
                    "norm_ff": nn.LayerNorm(d, eps=eps),
                    "ff": nn.Sequential(
                        nn.Linear(d, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, d)
                    ),
                }
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=eps)
        self.output_proj = nn.Linear(d, text_dim)

    def forward(self, patch_features: Tensor) -> Tensor:
        """patch_features (B, P, C_vision) -> (B, M, C_text): M tokens per image, whatever P."""
        B = patch_features.shape[0]
        H = self.num_heads
        media = self.input_proj(patch_features)  # (B, P, D)
        latents = self.latents.expand(B, -1, -1)  # (B, M, D): the same latents for every image
        for layer in self.layers:
            attn = layer["attn"]
            x = layer["norm_latents"](latents)  # (B, M, D)
            # Flamingo's trick: the latents read the patches and themselves in one attention.
            kv = torch.cat([layer["norm_media"](media), x], dim=1)  # (B, P + M, D)
            M, N, D = x.shape[1], kv.shape[1], x.shape[2]
            q = attn["q_proj"](x).view(B, M, H, D // H).transpose(1, 2)  # (B, H, M, d)
            k = attn["k_proj"](kv).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, d)
            v = attn["v_proj"](kv).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, d)
            scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # (B, H, M, N)
            weights = scores.softmax(dim=-1)  # each latent's weights sum to 1 over what it reads
            heads = (weights @ v).transpose(1, 2).reshape(B, M, D)  # (B, M, D)
            latents = latents + attn["out_proj"](heads)
            latents = latents + layer["ff"](layer["norm_ff"](latents))
        return self.output_proj(self.norm(latents))  # (B, M, C_text)
