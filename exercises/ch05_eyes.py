"""Chapter 5, The Eyes: your exercises. Fill each function, then run `minillava grade ch05`.

A Vision Transformer reads an image as a sequence of patches. You cut images into patches, put
the [CLS] token in front and add position embeddings, compute one head of self-attention, and
measure how similar the learned position embeddings are. Compare with minillava/vit.py.

Shapes: B batch, C channels (or hidden size), H, W image height and width, p patch size,
N = (H/p) * (W/p) patches, T tokens, D head size.
"""

from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping p x p patches, flatten each: (B, C, H, W) -> (B, N, p*p*C).

    Order of the patches: row by row, like reading a page: patch 0 is the top-left one, patch 1
    its right neighbour, patch W/p starts the second row.
    Order inside a patch vector: the patch's pixels row by row, and for each pixel its C channel
    values together: (p1, p2, c), channels innermost (the ViT paper's order).
    Hint: einops.rearrange(images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
    says all of that in one line. Try it without einops too: view + permute + reshape.
    """
    raise NotImplementedError("patchify: your code here (chapter 5)")


def add_cls_and_positions(
    patch_tokens: Tensor, cls_token: Tensor, position_embeddings: Tensor
) -> Tensor:
    """Prepend the [CLS] token and add the position embeddings.

    patch_tokens (B, N, C): the embedded patches. cls_token (C,): one learned vector, the same for
    every image. position_embeddings (N + 1, C): row 0 is the [CLS] slot's, row i is patch i's.
    Returns (B, N + 1, C): [CLS, patch_1, ..., patch_N], each plus its position embedding.
    Hint: cls_token.expand(B, 1, -1) makes a (B, 1, C) view; torch.cat along dim 1.
    """
    raise NotImplementedError("add_cls_and_positions: your code here (chapter 5)")


def attention_head(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor]:
    """One head of (unmasked) self-attention. x (B, T, C); w_q, w_k, w_v (D, C), nn.Linear layout.

    q = x @ w_q.T, k = x @ w_k.T, v = x @ w_v.T               (B, T, D) each
    weights = softmax(q @ k^T / sqrt(D)) over the keys       (B, T, T): row t = where token t looks
    out = weights @ v                                        (B, T, D)
    Return (out, weights). Every row of weights sums to 1.
    """
    raise NotImplementedError("attention_head: your code here (chapter 5)")


def position_similarity(position_embeddings: Tensor) -> Tensor:
    """Cosine similarity between every pair of position embeddings: (N, C) -> (N, N).

    sim[i, j] = <e_i, e_j> / (|e_i| |e_j|), in [-1, 1]; the diagonal is 1. Plot row i as a
    (grid x grid) image to see which positions patch i's embedding resembles.
    Hint: torch.nn.functional.normalize(e, dim=-1) makes every row unit length.
    """
    raise NotImplementedError("position_similarity: your code here (chapter 5)")
