"""Chapter 5, The Eyes: your exercises. Fill each function, then run `minillava grade ch05`.

A Vision Transformer reads an image as a sequence of patches. You cut images into patches, put
the [CLS] token in front and add position embeddings, compute one head of self-attention, and
measure how similar the learned position embeddings are; the stretch computes positions instead
of learning them, with sines and cosines. Compare with minillava/vit.py.

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
    Hint: einops.rearrange says all of that in one line: split the height into (grid row, row
    in the patch) and the width into (grid column, column in the patch), then group the two grid
    axes into the patch index and the two in-patch axes, followed by the channels, into the
    vector. Try it without einops too: view, then permute, then reshape.
    """
    raise NotImplementedError("patchify: your code here (chapter 5)")


def add_cls_and_positions(
    patch_tokens: Tensor, cls_token: Tensor, position_embeddings: Tensor
) -> Tensor:
    """Prepend the [CLS] token and add the position embeddings.

    patch_tokens (B, N, C): the embedded patches. cls_token (C,): one learned vector, the same for
    every image. position_embeddings (N + 1, C): row 0 is the [CLS] slot's, row i is patch i's.
    Returns (B, N + 1, C): [CLS, patch_1, ..., patch_N], each plus its position embedding.
    Hint: expand gives every image a (B, 1, C) view of the same [CLS] vector, without copying
    it; torch.cat then puts it in front of the patches, along the token dimension. The position
    embeddings (N + 1, C) broadcast over the batch.
    """
    raise NotImplementedError("add_cls_and_positions: your code here (chapter 5)")


def attention_head(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor]:
    """One head of (unmasked) self-attention. x (B, T, C); w_q, w_k, w_v (D, C), nn.Linear layout.

    q = x W_qᵀ, k = x W_kᵀ, v = x W_vᵀ                        (B, T, D) each
    weights = softmax(q kᵀ / sqrt(D)) over the keys          (B, T, T): row t = where token t looks
    out = weights v                                          (B, T, D)
    Return (out, weights). Every row of weights sums to 1.
    """
    raise NotImplementedError("attention_head: your code here (chapter 5)")


def position_similarity(position_embeddings: Tensor) -> Tensor:
    """Cosine similarity between every pair of position embeddings: (N, C) -> (N, N).

    sim[i, j] = <e_i, e_j> / (|e_i| |e_j|), in [-1, 1]; the diagonal is 1. Plot row i as a
    (grid x grid) image to see which positions patch i's embedding resembles.
    Hint: torch.nn.functional.normalize makes every row unit length (normalise along the
    features, the last dimension); after that, one matrix product gives every pair's cosine.
    """
    raise NotImplementedError("position_similarity: your code here (chapter 5)")


def sincos_2d_positions(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Stretch: fixed 2-D sine-cosine position embeddings, one row per patch (grid_h * grid_w, dim).

    CLIP learns its position table; MAE (He et al., 2021) and many ViTs since compute it instead,
    with no parameters: the transformer paper's sine-cosine code, once for the patch's column and
    once for its row. Nothing to learn, and a grid of another size gets a code at once.

    The layout (match it exactly, as MAE's reference code lays it out):
      - rows of the result follow patchify's order, row-major: patch n is at row n // grid_w,
        column n % grid_w; patch 0 is the top-left one, patch 1 its right neighbour;
      - channels 0 .. dim/2 - 1 encode the COLUMN (the horizontal position), channels
        dim/2 .. dim - 1 the ROW;
      - each half is the 1-D code of one position p in d = dim/2 channels: the d/2 sines, then
        the d/2 cosines (not interleaved),
            [sin(p ω_0), ..., sin(p ω_{d/2-1}), cos(p ω_0), ..., cos(p ω_{d/2-1})],
        with frequencies ω_i = 1 / 10000^(2i / d), i = 0 .. d/2 - 1: the first channel turns
        once a position (a radian), the last almost not at all;
      - positions count from 0, so patch 0's code is sin 0 = 0 and cos 0 = 1 throughout.
    dim must be a multiple of 4 (a sine and a cosine block for each of the two halves): raise
    ValueError otherwise. Return float32.

    Why it works: the dot product of two codes is a sum of cos(ω_i Δ) terms, so it depends only
    on the offset (Δrow, Δcol) between two patches, and falls as they move apart. A 1-D code of
    the flattened index would instead make the last patch of a row a near twin of the first
    patch of the next row, on the other side of the image.
    """
    raise NotImplementedError("sincos_2d_positions: your code here (chapter 5, stretch)")
