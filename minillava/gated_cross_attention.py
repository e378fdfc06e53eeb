"""Flamingo's other half: gated cross-attention layers inside a frozen LLM (ch. 7).

LLaVA and BLIP-2 put the image *into the LLM's input*: image tokens sit in the sequence beside the
words, and the LLM's own self-attention reads them. Flamingo (Alayrac et al., 2022) leaves the
input alone. Its Perceiver Resampler (minillava/resampler.py) turns each image into 64 vectors, and
new layers, inserted between the frozen LLM's own blocks, let the text tokens look at them:

    y = y + tanh(alpha_attn)  * CrossAttention(q = LN(y), kv = image)     (B, T, C_text)
    y = y + tanh(alpha_dense) * FFN(LN(y))

This is the GATED XATTN-DENSE block. The two gates are single learned numbers that start at
**zero**, so tanh(0) = 0 and at the first step every new block is the identity: the frozen LLM
computes exactly what it did before training, and its language skills are not wrecked by random
new layers. Training opens the gates a little at a time.

The price is parameters. Each block is as wide as the LLM (queries, outputs and a 4x feed-forward
network at C_text), and Flamingo inserts one before every LLM block in Flamingo-3B, every 4th in
Flamingo-9B, every 7th in Flamingo-80B: the paper counts 1.2B, 1.6B and 10B parameters in these
layers, against LLaVA-1.5's 21M for its MLP. `count_parameters` on a block built on the
`meta` device (shapes only, no memory) gives such counts at any size; chapter 7 does it at
LLaVA-1.5's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from minillava.decoder import count_parameters
from minillava.resampler import CrossAttention


class GatedCrossAttentionBlock(nn.Module):
    """One GATED XATTN-DENSE block: text (B, T, C_text), image (B, M, C_vision) -> (B, T, C_text).

    Every text position may read every image vector (one image; Flamingo's masks that let each
    token see only the image just before it matter only with several images in one text).
    """

    def __init__(self, text_dim: int, vision_dim: int, num_heads: int, ffn_mult: int = 4):
        super().__init__()
        if text_dim % num_heads != 0:
            raise ValueError(f"text_dim={text_dim} must be divisible by num_heads={num_heads}")
        self.norm_attn = nn.LayerNorm(text_dim)
        self.attn = CrossAttention(text_dim, vision_dim, num_heads)  # q from text, kv from image
        self.norm_dense = nn.LayerNorm(text_dim)
        self.dense = nn.Sequential(
            nn.Linear(text_dim, ffn_mult * text_dim),
            nn.GELU(),
            nn.Linear(ffn_mult * text_dim, text_dim),
        )
        # Zero at the start: tanh(0) = 0, so the block adds nothing until training opens it.
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """text (B, T, C_text): the LLM's hidden states between two of its blocks;
        image (B, M, C_vision): e.g. the resampler's M vectors. Returns (B, T, C_text)."""
        if text.ndim != 3 or image.ndim != 3 or text.shape[0] != image.shape[0]:
            raise ValueError(
                f"text must be (B, T, C_text) and image (B, M, C_vision) with the same B, got "
                f"{tuple(text.shape)} and {tuple(image.shape)}"
            )
        text = text + torch.tanh(self.alpha_attn) * self.attn(self.norm_attn(text), image)
        return text + torch.tanh(self.alpha_dense) * self.dense(self.norm_dense(text))


def flamingo_layers_num_parameters(
    text_dim: int, vision_dim: int, llm_layers: int, every: int, num_heads: int = 32
) -> int:
    """Parameters of the gated blocks Flamingo-style conditioning adds to an LLM of `llm_layers`
    blocks, one gated block before every `every`-th of them; counted on the meta device, so
    LLaVA-1.5's sizes (text_dim 4096) cost no memory."""
    with torch.device("meta"):
        block = GatedCrossAttentionBlock(text_dim, vision_dim, num_heads)
    return count_parameters(block) * (llm_layers // every)
