"""Chapter 2 exercises: attention by hand, masks, multi-head attention, a pre-norm block.

Fill in each function (and the two `forward` methods), replacing the
`raise NotImplementedError(...)` line, then grade:

    minillava grade ch02            (or `make grade CH=02`, or check(fn) in the notebook)

Shapes use B = batch, H = heads, T = tokens, C = channels (hidden size), D = C / H per head.
Masks are boolean and True where attention is *allowed*, the convention of
torch.nn.functional.scaled_dot_product_attention. notebooks/02_attention.ipynb explains each step.
"""

import math  # noqa: F401 - you will need it
from collections import OrderedDict

import torch  # noqa: F401 - you will need it
from torch import Tensor, nn


def causal_mask(T: int) -> Tensor:
    """The (T, T) boolean mask of a causal (left-to-right) model.

    mask[i, j] is True when query i may attend to key j, that is when j <= i: every token sees
    itself and the tokens before it, never the ones after. Example for T = 3:

        [[True, False, False],
         [True, True,  False],
         [True, True,  True ]]

    Hint: start from a square boolean matrix that is True everywhere, then keep only its lower
    triangle, the diagonal included: that is what torch.tril does.
    """
    raise NotImplementedError("causal_mask: your code here (chapter 2)")


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ / sqrt(D) + M) v, by hand. Returns (output, weights).

    q: (..., Tq, D) queries, k: (..., Tk, D) keys, v: (..., Tk, Dv) values; "..." is any batch
    dimensions, e.g. (B, H). mask: None, or a bool tensor broadcastable to (..., Tq, Tk), True
    where query i may look at key j.

    1. scores = q kᵀ / sqrt(D)            (..., Tq, Tk): how well each query matches each key
       (transpose only the last two dimensions of k, so that the batch dimensions in front
       stay where they are)
    2. where mask is False, set the score to -inf, so that softmax gives that key exactly 0
       weight (masked_fill fills where its mask is True: the mask here says where attention
       is *allowed*, so fill where it is not)
    3. weights = softmax over the keys (the last dimension): each row sums to 1
    4. output = weights v                  (..., Tq, Dv)
    """
    raise NotImplementedError("scaled_dot_product_attention: your code here (chapter 2)")


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, C) -> (B, H, T, D) with H = num_heads and D = C // H.

    Head h gets channels h*D .. (h+1)*D - 1 of every token, the h-th block of D channels.
    Reshape to (B, T, H, D) first (that splits the channels), then swap the T and H dimensions.
    """
    raise NotImplementedError("split_heads: your code here (chapter 2)")


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H * D): the inverse of split_heads, heads side by side again."""
    raise NotImplementedError("merge_heads: your code here (chapter 2)")


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
        """x (B, T, C) -> (B, T, C).

        Project x to queries, keys and values (self.q_proj, ...), split each into heads,
        attend with your scaled_dot_product_attention (passing the mask on), merge the heads,
        and mix them with self.out_proj.
        """
        raise NotImplementedError("MultiHeadAttention.forward: your code here (chapter 2)")


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
        """x (B, T, C) -> (B, T, C):

            x = x + attn(norm1(x), mask)     tokens exchange information
            x = x + mlp(norm2(x))            each token is processed on its own

        The norms sit *inside* the branches: the residual stream x itself is never normalised.
        """
        raise NotImplementedError("PreNormBlock.forward: your code here (chapter 2)")


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Stretch exercise: grouped-query attention (GQA), as Llama-2-70B, Mistral and TinyLlama use.

    q (B, H, T, D): H query heads; k, v (B, H_kv, T, D): only H_kv key/value heads, H_kv dividing
    H. Each key/value head serves a GROUP of g = H / H_kv consecutive query heads: query heads
    0 .. g-1 read key/value head 0, heads g .. 2g-1 read head 1, and so on. Returns (B, H, T, D),
    softmax(q kᵀ / sqrt(D) + M) v per query head with its group's keys and values; mask as in
    scaled_dot_product_attention (True where query i may look at key j).

    Why: at generation the KV cache holds every layer's keys and values for every position;
    with H_kv = H / 8 it is 8 times smaller, for a small loss in quality. Check the shapes
    first and raise a ValueError naming them when H is not a multiple of H_kv. Think about
    which of tensor.repeat and tensor.repeat_interleave puts the copies of one head next to
    each other.
    """
    raise NotImplementedError("grouped_query_attention: your code here (chapter 2, stretch)")
