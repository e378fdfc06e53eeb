"""Bridges that shrink an image to a few tokens: the Perceiver Resampler and the Q-Former (ch. 7).

LLaVA's bridge is an MLP applied to every patch on its own: P patch features in, P image tokens
out, each one a function of one patch only. Two famous vision-language models chose differently.
They put a small transformer between the eyes and the brain that reads *all* the patches and
writes a *fixed, small* number of tokens, whatever the image size:

    patch features (B, P, C_vision)  ->  [ M learned queries cross-attend to them ]  ->  (B, M, C)

The M queries ("latents") are parameters, the same for every image. Each layer lets them look at
the patches through cross-attention (queries from the latents, keys and values from the patches),
so after a few layers each latent holds a learned summary of the image. M is small (64 in
Flamingo, 32 in BLIP-2), P can be large (576 for LLaVA-1.5's 336 px CLIP), so the LLM reads far
fewer image tokens.

**Flamingo's Perceiver Resampler** (Alayrac et al., 2022; after the Perceiver, Jaegle et al.,
2021). Each of its 6 layers is one attention and one feed-forward network (FFN), with
pre-LayerNorms and residuals:

    latents = latents + Attention(q = LN(latents), kv = [LN(patches); LN(latents)])
    latents = latents + FFN(LN(latents))

Keys and values are the patches *and the latents themselves*, concatenated, so one attention does
the work of a cross-attention and a self-attention. (Flamingo also adds a learned time embedding
per video frame; one image needs none.) The 64 output vectors are not put into the LLM's input:
Flamingo inserts new gated cross-attention layers into its frozen LLM, through which the text
tokens attend to them. In Flamingo-3B the resampler alone has 194M parameters.

**BLIP-2's Q-Former** (Li et al., 2023). A BERT-base transformer (12 layers, width 768, post-LN)
whose 32 learned queries go through, in every layer, a self-attention among the queries, then,
every other layer, a cross-attention to the frozen image features, then an FFN:

    queries = LN(queries + SelfAttention(queries))
    queries = LN(queries + CrossAttention(q = queries, kv = patches))   # every 2nd layer
    queries = LN(queries + FFN(queries))

It is trained first on its own, with three image-text losses (contrastive, matching, and
captioning, text tokens sharing the self-attention with the queries), which teaches the queries
to pull out what text can describe. Then a linear layer maps the 32 outputs to the LLM's width and
they are *prepended to the text as soft prompt tokens*, like LLaVA's image tokens. The paper
counts 188M parameters; `qformer_num_parameters` below counts the 107M that the queries pass
through (BERT's word embeddings and the text-only FFNs make up the rest).

**How they differ from LLaVA's MLP.** Both compress: M tokens, not P, and the choice of what to keep
is made by a small network that never sees the question. LLaVA-1.5 argued the opposite way (Liu et
al., 2023, "Improved Baselines with Visual Instruction Tuning"): keep every patch token, use the
simplest bridge that can map them into the LLM's space (a 2-layer MLP), and let the LLM's own
attention decide, for each question, which patches matter. An MLP is also cheap to train (no
pretraining stage of its own) and keeps the patch layout that questions about position need. The
price is a longer input: P tokens per image, which is why later models pool or resample again
when images get large.

`PerceiverResampler` and `QFormerBridge` here are small, faithful-in-structure versions, so the
chapter can count their parameters and run them on our patch features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange, repeat
from torch import Tensor

from minillava.attention import attention


@dataclass
class ResamplerConfig:
    vision_dim: int = 128  # C_vision: width of the patch features that come in
    text_dim: int = 128  # C_text: width of the tokens that go out (the LLM's hidden size)
    hidden_size: int = 128  # D: width of the latents inside the bridge
    num_latents: int = 16  # M: how many tokens come out per image (Flamingo 64, BLIP-2 32)
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512  # the FFN's hidden width
    cross_attention_every: int = 2  # Q-Former only: cross-attention in layers 0, k, 2k, ...
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"ResamplerConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        positive = ("vision_dim", "text_dim", "num_latents", "num_layers", "cross_attention_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ResamplerConfig: {name} must be >= 1, got {getattr(self, name)}")


class CrossAttention(nn.Module):
    """Queries from one sequence, keys/values from another: (B, M, D), (B, N, C_kv) -> (B, M, D).

    The output has one row per *query*, however long the key/value sequence is: that is how M
    latents summarise N patches.
    """

    def __init__(self, hidden_size: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_dim, hidden_size)  # kv_dim may differ: e.g. the ViT's width
        self.v_proj = nn.Linear(kv_dim, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: Tensor, keys_values: Tensor) -> Tensor:
        heads = "b t (h d) -> b h t d"
        q = rearrange(self.q_proj(queries), heads, h=self.num_heads)  # (B, H, M, d)
        k = rearrange(self.k_proj(keys_values), heads, h=self.num_heads)  # (B, H, N, d)
        v = rearrange(self.v_proj(keys_values), heads, h=self.num_heads)  # (B, H, N, d)
        out = attention(q, k, v)  # no mask: every query may look at every patch
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, M, D)


def feed_forward(hidden_size: int, intermediate_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, intermediate_size),
        nn.GELU(),
        nn.Linear(intermediate_size, hidden_size),
    )


# ---------------------------------------------------------------------------------------------
# Flamingo's Perceiver Resampler
# ---------------------------------------------------------------------------------------------


class PerceiverLayer(nn.Module):
    """latents += Attn(q = LN(latents), kv = [LN(patches); LN(latents)]); latents += FFN(LN(.))."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm_media = nn.LayerNorm(d, eps=eps)
        self.norm_latents = nn.LayerNorm(d, eps=eps)
        self.attn = CrossAttention(d, d, config.num_heads)
        self.norm_ff = nn.LayerNorm(d, eps=eps)
        self.ff = feed_forward(d, config.intermediate_size)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        """latents (B, M, D), media (B, N, D) -> latents (B, M, D)."""
        normed = self.norm_latents(latents)
        # The latents see the patches and each other in one attention (Flamingo's trick).
        keys_values = torch.cat([self.norm_media(media), normed], dim=1)  # (B, N + M, D)
        latents = latents + self.attn(normed, keys_values)
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """Flamingo-style: M learned latents read the patches; (B, P, C_vision) -> (B, M, C_text).

    Unlike Flamingo, the output is then projected to the LLM's width by a linear layer, so it can
    be used LLaVA-style as M image tokens (as IDEFICS2 and others do).
    """

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * d**-0.5)  # (M, D)
        self.input_proj = nn.Linear(config.vision_dim, d)  # patches to the latents' width
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.output_proj = nn.Linear(d, config.text_dim)

    def forward(self, patch_features: Tensor) -> Tensor:
        """patch_features (B, P, C_vision) -> (B, M, C_text): M tokens per image, whatever P."""
        _check_features(patch_features, self.config.vision_dim)
        media = self.input_proj(patch_features)  # (B, P, D)
        latents = repeat(self.latents, "m d -> b m d", b=patch_features.shape[0])  # (B, M, D)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.output_proj(self.norm(latents))  # (B, M, C_text)


# ---------------------------------------------------------------------------------------------
# BLIP-2's Q-Former (the query path)
# ---------------------------------------------------------------------------------------------


class QFormerLayer(nn.Module):
    """BERT layer (post-LN) for the queries, with an optional cross-attention to the image."""

    def __init__(self, config: ResamplerConfig, has_cross_attention: bool):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CrossAttention(d, d, config.num_heads)  # kv = the queries themselves
        self.norm_self = nn.LayerNorm(d, eps=eps)
        # Only some layers look at the image (BLIP-2: every other one); the rest have None here.
        self.cross_attn = (
            CrossAttention(d, config.vision_dim, config.num_heads) if has_cross_attention else None
        )
        self.norm_cross = nn.LayerNorm(d, eps=eps) if has_cross_attention else None
        self.ff = feed_forward(d, config.intermediate_size)
        self.norm_ff = nn.LayerNorm(d, eps=eps)

    def forward(self, queries: Tensor, patch_features: Tensor) -> Tensor:
        """queries (B, M, D), patch_features (B, P, C_vision) -> queries (B, M, D)."""
        queries = self.norm_self(queries + self.self_attn(queries, queries))
        if self.cross_attn is not None:
            queries = self.norm_cross(queries + self.cross_attn(queries, patch_features))
        return self.norm_ff(queries + self.ff(queries))


class QFormerBridge(nn.Module):
    """BLIP-2-style: M learned queries, self-attention + cross-attention every k-th layer + FFN,
    then a linear map to the LLM's width; (B, P, C_vision) -> (B, M, C_text).

    Only the path the queries take at inference; BLIP-2's text inputs and its three stage-1
    pretraining losses are left out.
    """

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(config.num_latents, d) * 0.02)  # (M, D)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # BERT's embedding LayerNorm
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_every == 0)
            for i in range(config.num_layers)
        )
        self.language_projection = nn.Linear(d, config.text_dim)  # BLIP-2's name for it

    def forward(self, patch_features: Tensor) -> Tensor:
        """patch_features (B, P, C_vision) -> (B, M, C_text)."""
        _check_features(patch_features, self.config.vision_dim)
        queries = self.norm(repeat(self.query_tokens, "m d -> b m d", b=patch_features.shape[0]))
        for layer in self.layers:
            queries = layer(queries, patch_features)
        return self.language_projection(queries)  # (B, M, C_text)


def qformer_num_parameters(
    vision_dim: int,
    text_dim: int,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_queries: int = 32,
    intermediate_size: int = 3072,
    cross_attention_every: int = 2,
) -> int:
    """Parameters on the query path of a Q-Former, by formula (defaults: BLIP-2's BERT-base).

    A Linear(n_in, n_out) has n_in * n_out weights + n_out biases; a LayerNorm(d) has 2d.
    Equals `QFormerBridge(...)`'s count (tests check it), and needs no memory, so it works at
    BLIP-2's size too: qformer_num_parameters(1408, 2560) is about 107M (EVA ViT-g into OPT-2.7B).
    """
    d, f = hidden_size, intermediate_size

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    layer_norm = 2 * d
    self_attention = 4 * linear(d, d) + layer_norm  # q, k, v, out
    cross_attention = 2 * linear(d, d) + 2 * linear(vision_dim, d) + layer_norm  # q, out; k, v
    ffn = linear(d, f) + linear(f, d) + layer_norm
    num_cross = math.ceil(num_layers / cross_attention_every)  # layers 0, k, 2k, ...
    return (
        num_queries * d  # the learned queries
        + layer_norm  # the LayerNorm on them
        + num_layers * (self_attention + ffn)
        + num_cross * cross_attention
        + linear(d, text_dim)  # into the LLM's width
    )


def _check_features(patch_features: Tensor, vision_dim: int) -> None:
    if patch_features.ndim != 3 or patch_features.shape[-1] != vision_dim:
        raise ValueError(
            f"patch_features must have shape (B, P, {vision_dim}) (vision_dim of the "
            f"ResamplerConfig), got {tuple(patch_features.shape)}"
        )
