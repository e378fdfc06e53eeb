"""Chapter 7, the Bridge: your exercises.

Fill in each function, replacing the `raise NotImplementedError(...)` line, then grade:

    minillava grade ch07            (or `make grade CH=07`, or check(fn) in the notebook)

notebooks/07_bridge.ipynb explains each idea before you write it. Use torch operations only.
"""

from __future__ import annotations

import torch  # noqa: F401 - you will need it
import torch.nn.functional as F  # noqa: F401
from torch import Tensor


def linear_projector(image_features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LLaVA-1's bridge: one linear map applied to every patch feature on its own.

    image_features (B, P, C_v): P patch vectors of the vision encoder per image.
    weight (C_t, C_v), bias (C_t,): stored the way nn.Linear stores them, (out, in).
    Return (B, P, C_t): every patch vector x becomes W x + b, a vector in the decoder's space.

    Hint: a matrix product with the last dimension of image_features broadcasts over B and P.
    Which of `weight` and `weight.T` has shape (C_v, C_t)?
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

    Use the exact GELU, `F.gelu(x)` (what nn.GELU() and transformers' "gelu" compute).

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

    Hint: nn.Linear(n_in, n_out) holds n_in * n_out weights AND n_out biases; GELU has none.
    """
    raise NotImplementedError("projector_num_parameters: your code here (chapter 7)")


def nearest_text_tokens(projected: Tensor, token_embeddings: Tensor, k: int = 5) -> tuple:
    """Which words of the decoder's vocabulary lie closest to each projected patch?

    projected (N, C): N projected image features (one row per patch).
    token_embeddings (V, C): the decoder's embedding table, row v = the vector of token id v.
    Return (similarities (N, k), token_ids (N, k)): for each row of `projected`, the k tokens
    with the highest COSINE similarity, best first, and those cosines.

    Hint: normalise both to unit length (F.normalize(x, dim=-1)), one (N, V) matrix product,
    then `tensor.topk(k, dim=-1)` returns (values, indices) already sorted. A raw dot product
    would favour tokens whose embeddings are long, not those pointing the same way.
    """
    raise NotImplementedError("nearest_text_tokens: your code here (chapter 7)")
