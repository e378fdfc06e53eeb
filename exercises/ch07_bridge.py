"""Chapter 7, the Bridge: your exercises.

Fill in each function, replacing the `raise NotImplementedError(...)` line, then grade:

    minillava grade ch07            (or `make grade CH=07`, or check(fn) in the notebook)

notebooks/07_bridge.ipynb explains each idea before you write it. Use torch operations only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401
from torch import Tensor, nn


def linear_projector(image_features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LLaVA-1's bridge: one linear map applied to every patch feature on its own.

    image_features (B, P, C_v): P patch vectors of the vision encoder per image.
    weight (C_t, C_v), bias (C_t,): stored the way nn.Linear stores them, (out, in).
    Return (B, P, C_t): every patch vector x becomes W x + b, a vector in the decoder's space.

    Hint: a matrix product with the last dimension of image_features broadcasts over B and P.
    Which of the weight and its transpose has shape (C_v, C_t)?
    """
    raise NotImplementedError("linear_projector: your code here (chapter 7)")


def mlp_projector(
    image_features: Tensor, weight_1: Tensor, bias_1: Tensor, weight_2: Tensor, bias_2: Tensor
) -> Tensor:
    """LLaVA-1.5's bridge, "mlp2x_gelu": Linear -> GELU -> Linear.

    image_features (B, P, C_v); weight_1 (C_t, C_v), bias_1 (C_t,); weight_2 (C_t, C_t),
    bias_2 (C_t,). Return (B, P, C_t):

        hidden = GELU(W1 x + b1)        (B, P, C_t)
        out    = W2 hidden + b2         (B, P, C_t)

    Use the exact GELU, F.gelu with its default (what nn.GELU and transformers' "gelu"
    compute), not the tanh approximation.

    Hint: the activation goes BETWEEN the two layers, and only there. Without it, two linear
    layers are just one linear layer (W2 W1 x + ...), and after the last layer it would cut off
    the negative half of the outputs, which word embeddings need.
    """
    raise NotImplementedError("mlp_projector: your code here (chapter 7)")


def projector_num_parameters(kind: str, vision_dim: int, text_dim: int) -> int:
    """How many trainable numbers does `build_projector(kind, vision_dim, text_dim)` have?

    kind "linear":     one nn.Linear(vision_dim, text_dim)
    kind "mlp2x_gelu": nn.Linear(vision_dim, text_dim), GELU, nn.Linear(text_dim, text_dim)
    Return a Python int; raise ValueError for any other kind.

    Example: projector_num_parameters("linear", 3, 2) == 8 (a 2 x 3 weight and 2 biases).

    Hint: a linear layer from n_in to n_out features holds a weight for every (input, output)
    pair AND a bias for every output; GELU holds no parameters at all.
    """
    raise NotImplementedError("projector_num_parameters: your code here (chapter 7)")


def nearest_text_tokens(projected: Tensor, token_embeddings: Tensor, k: int = 5) -> tuple:
    """Which words of the decoder's vocabulary lie closest to each projected patch?

    projected (N, C): N projected image features (one row per patch).
    token_embeddings (V, C): the decoder's embedding table, row v = the vector of token id v.
    Return (similarities (N, k), token_ids (N, k)): for each row of `projected`, the k tokens
    with the highest COSINE similarity, best first, and those cosines.

    Hint: normalise both to unit length along the features (F.normalize), then one (N, V)
    matrix product gives every cosine, and topk over the vocabulary, the last dimension,
    returns the values and their indices, already sorted. A raw dot product would favour
    tokens whose embeddings are long, not those pointing the same way.
    """
    raise NotImplementedError("nearest_text_tokens: your code here (chapter 7)")


class PerceiverResampler(nn.Module):
    """Stretch exercise: Flamingo's Perceiver Resampler, (B, P, C_vision) -> (B, M, C_text).

    LLaVA's projector turns P patches into P tokens. A resampler turns them into a FIXED number
    M of tokens, whatever P is: M learned vectors, the *latents* (the same for every image),
    read the patches through attention, and each comes out as a summary of the image. Flamingo
    (Alayrac et al., 2022) hands 64 of them to its LLM, BLIP-2's Q-Former 32, where LLaVA-1.5
    hands 576 patch tokens; IDEFICS2 and others project them into the LLM's input as LLaVA does.

    The constructor is given: it makes exactly the parameters of the library's
    minillava.resampler.PerceiverResampler (same names), so the grader loads the library's
    weights into yours and compares the outputs. Write `forward`:

        media   = input_proj(patch_features)                       (B, P, D)
        latents = the learned latents, one copy per image            (B, M, D)
        for each layer:
            x  = norm_latents(latents)                               (B, M, D)
            kv = [norm_media(media); x], joined along the tokens      (B, P + M, D)
            latents = latents + attention(queries from x, keys and values from kv)
            latents = latents + ff(norm_ff(latents))
        return output_proj(norm(latents))                            (B, M, C_text)

    The attention is multi-head attention written out (chapter 2), with the layer's own
    projections: layer["attn"]["q_proj"] makes the queries from x, "k_proj" and "v_proj" the keys
    and values from kv, and "out_proj" maps the merged heads back; num_heads heads of
    D / num_heads channels, scores scaled by 1 / sqrt(D / num_heads), no mask (every latent may
    read every patch and every latent). Flamingo's trick is the concatenation: the latents'
    own keys and values next to the patches' let one attention do the work of a
    cross-attention and a self-attention. The residuals keep what the latents held before.

    Think about which axis the softmax normalises (each latent's weights over what it reads),
    and what decides the number of output tokens.
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
        raise NotImplementedError("PerceiverResampler.forward: your code here (chapter 7, stretch)")
