"""Chapter 5: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.vit) agrees with solutions/ch05_eyes.py, so the chapter, the
notebook and the reference cannot drift apart.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minillava import grading, vit
from minillava.attention import manual_attention
from solutions import ch05_eyes as solution

# --- patchify -----------------------------------------------------------------------------------


def column_by_column(images, patch_size):
    p = patch_size
    return rearrange(images, "b c (gh p1) (gw p2) -> b (gw gh) (p1 p2 c)", p1=p, p2=p)


def channels_first(images, patch_size):
    p = patch_size
    return rearrange(images, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=p, p2=p)


def plain_reshape(images, patch_size):
    B, C, H, W = images.shape
    return images.reshape(B, (H // patch_size) * (W // patch_size), -1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (column_by_column, ["column by column", "right neighbour"]),
        (channels_first, ["grouped by channel", "channels innermost"]),
        (plain_reshape, ["reshaped the image straight into patches", "not a p x p square"]),
    ],
)
def test_patchify_rejects(rejects, wrong, mentions):
    rejects("ch05.patchify", wrong, mentions=mentions, hint_mentions=["permuted"])


# --- add_cls_and_positions ----------------------------------------------------------------------


def cls_last(patch_tokens, cls_token, position_embeddings):
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)
    return torch.cat([patch_tokens, cls], dim=1) + position_embeddings


def positions_on_patches_only(patch_tokens, cls_token, position_embeddings):
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)
    return torch.cat([cls, patch_tokens + position_embeddings[1:]], dim=1)


def no_positions(patch_tokens, cls_token, position_embeddings):
    return torch.cat([cls_token.expand(patch_tokens.shape[0], 1, -1), patch_tokens], dim=1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (cls_last, ["comes last", "*first*"]),
        (positions_on_patches_only, ["no position embedding", "row 0"]),
        (no_positions, ["forgot to add the position embeddings"]),
    ],
)
def test_add_cls_and_positions_rejects(rejects, wrong, mentions):
    rejects(
        "ch05.add_cls_and_positions", wrong, mentions=mentions, hint_mentions=["N + 1 position"]
    )


# --- attention_head -----------------------------------------------------------------------------


def unscaled(x, w_q, w_k, w_v):
    weights = ((x @ w_q.T) @ (x @ w_k.T).transpose(-2, -1)).softmax(-1)
    return weights @ (x @ w_v.T), weights


def softmax_over_queries(x, w_q, w_k, w_v):
    q, k = x @ w_q.T, x @ w_k.T
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2)
    return weights @ (x @ w_v.T), weights


def transposed_weights(x, w_q, w_k, w_v):
    q, k = x @ w_q.T, x @ w_k.T
    weights = (k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    return weights @ (x @ w_v.T), weights


def weights_only(x, w_q, w_k, w_v):
    return solution.attention_head(x, w_q, w_k, w_v)[1]


def averages_queries(x, w_q, w_k, w_v):
    _, weights = solution.attention_head(x, w_q, w_k, w_v)
    return weights @ (x @ w_q.T), weights


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (unscaled, ["not scaled", "√D"]),
        (softmax_over_queries, ["ran over the queries", "over the *keys*"]),
        (transposed_weights, ["weights are transposed"]),
        (weights_only, ["tuple (out, weights)", "got Tensor"]),
        (averages_queries, ["the attention output", "averages the queries"]),
    ],
)
def test_attention_head_rejects(rejects, wrong, mentions):
    rejects("ch05.attention_head", wrong, mentions=mentions)


def test_attention_head_hint_waits_for_hint(rejects):
    result = rejects("ch05.attention_head", unscaled, hint_mentions=["row over the keys"])
    assert result.hint not in result.message


# --- position_similarity ------------------------------------------------------------------------


def raw_dot_product(position_embeddings):
    return position_embeddings @ position_embeddings.T


def normalised_columns(position_embeddings):
    unit = F.normalize(position_embeddings, dim=0)
    return unit @ unit.T


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (raw_dot_product, ["raw dot products", "length 1"]),
        (normalised_columns, ["normalised each column", "each ROW"]),
    ],
)
def test_position_similarity_rejects(rejects, wrong, mentions):
    rejects("ch05.position_similarity", wrong, mentions=mentions, hint_mentions=["unit"])


# --- sincos_2d_positions (stretch) -------------------------------------------------------------


def _code_1d(positions, width, over=None):
    over = width if over is None else over
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) * 2 / over)
    angles = positions.double()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _grid(grid_h, grid_w):
    index = torch.arange(grid_h * grid_w)
    return index // grid_w, index % grid_w


def rows_first(grid_h, grid_w, dim):
    rows, cols = _grid(grid_h, grid_w)
    return torch.cat([_code_1d(rows, dim // 2), _code_1d(cols, dim // 2)], dim=1).float()


def interleaved(grid_h, grid_w, dim):
    rows, cols = _grid(grid_h, grid_w)
    halves = []
    for p in (cols, rows):
        code = _code_1d(p, dim // 2)
        sin, cos = code.chunk(2, dim=1)
        halves.append(torch.stack([sin, cos], dim=-1).reshape(len(p), -1))
    return torch.cat(halves, dim=1).float()


def exponent_over_dim(grid_h, grid_w, dim):
    rows, cols = _grid(grid_h, grid_w)
    halves = [_code_1d(cols, dim // 2, over=dim), _code_1d(rows, dim // 2, over=dim)]
    return torch.cat(halves, dim=1).float()


def flattened_index(grid_h, grid_w, dim):
    return _code_1d(torch.arange(grid_h * grid_w), dim).float()


def column_major(grid_h, grid_w, dim):
    index = torch.arange(grid_h * grid_w)
    rows, cols = index % grid_h, index // grid_h
    return torch.cat([_code_1d(cols, dim // 2), _code_1d(rows, dim // 2)], dim=1).float()


def positions_scaled_to_the_grid(grid_h, grid_w, dim):
    rows, cols = _grid(grid_h, grid_w)
    halves = [_code_1d(cols / grid_w, dim // 2), _code_1d(rows / grid_h, dim // 2)]
    return torch.cat(halves, dim=1).float()


def never_checks_dim(grid_h, grid_w, dim):
    if dim % 4:
        return torch.zeros(grid_h * grid_w, dim)
    return solution.sincos_2d_positions(grid_h, grid_w, dim)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (rows_first, ["halves are swapped", "column"]),
        (interleaved, ["alternate channel by channel", "all the sines come first"]),
        (exponent_over_dim, ["spread over the full width", "dim / 2"]),
        (flattened_index, ["one 1-D position", "start of the next"]),
        (column_major, ["column by column", "right neighbour"]),
        (positions_scaled_to_the_grid, ["a step right", "a step down", "not coded the same way"]),
        (never_checks_dim, ["no ValueError", "multiple of 4"]),
    ],
)
def test_sincos_2d_positions_rejects(rejects, wrong, mentions):
    rejects("ch05.sincos_2d_positions", wrong, mentions=mentions)


def test_sincos_2d_positions_hint_describes_the_code_in_words(rejects):
    result = rejects("ch05.sincos_2d_positions", rows_first, hint_mentions=["row-major", "sines"])
    assert result.hint not in result.message


def test_sincos_2d_positions_by_hand():
    """Grid 2 x 3, dim 8: two frequencies per half, 1 and 1/100; patch 5 is row 1, column 2."""
    code = solution.sincos_2d_positions(2, 3, 8)
    assert code.shape == (6, 8) and code.dtype == torch.float32
    s, c = math.sin, math.cos
    column, row = 2.0, 1.0
    expected = [
        *(s(column), s(column / 100), c(column), c(column / 100)),
        *(s(row), s(row / 100), c(row), c(row / 100)),
    ]
    torch.testing.assert_close(code[5], torch.tensor(expected))
    torch.testing.assert_close(code[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    with pytest.raises(ValueError):
        solution.sincos_2d_positions(2, 2, 6)


def test_sincos_2d_positions_matches_maes_layout():
    """MAE's recipe: a meshgrid with the width coordinate first feeds the first half."""
    grid_h, grid_w, dim = 3, 5, 16
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    halves = []
    for coordinate in grid:  # grid[0]: the column of each patch, grid[1]: its row
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        angles = np.outer(coordinate.reshape(-1), omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    mae = torch.from_numpy(np.concatenate(halves, axis=1)).float()
    torch.testing.assert_close(solution.sincos_2d_positions(grid_h, grid_w, dim), mae)


def test_sincos_2d_similarity_depends_on_the_offset():
    """The property the chapter claims: the dot product of two patches' codes depends only on
    their 2-D offset, a step right is a step down, and nearer patches are more similar."""
    grid_h, grid_w = 6, 8
    code = solution.sincos_2d_positions(grid_h, grid_w, 64).double()
    sim = (code @ code.T).reshape(grid_h, grid_w, grid_h, grid_w)
    for dr, dc in ((0, 1), (1, 0), (2, 3), (1, -2)):
        values = [
            sim[r, c, r + dr, c + dc]
            for r in range(grid_h)
            for c in range(grid_w)
            if 0 <= r + dr < grid_h and 0 <= c + dc < grid_w
        ]
        assert max(values) - min(values) < 1e-4  # the code is float32
    torch.testing.assert_close(sim[0, 0, 0, 1], sim[0, 0, 1, 0])
    assert sim[0, 0, 0, 0] > sim[0, 0, 0, 1] > sim[0, 0, 0, 2] > sim[0, 0, 0, 3]
    # A 1-D code of the flattened index breaks it: the end of a row is a near twin of the next
    # row's start, which lies on the other side of the image.
    flat = flattened_index(grid_h, grid_w, 64).double()
    flat_sim = (flat @ flat.T).reshape(grid_h, grid_w, grid_h, grid_w)
    assert flat_sim[0, grid_w - 1, 1, 0] > flat_sim[0, grid_w - 1, 1, grid_w - 1]
    assert sim[0, grid_w - 1, 1, 0] < sim[0, grid_w - 1, 1, grid_w - 1]
    assert grading.run_check("ch05.sincos_2d_positions", solution.sincos_2d_positions).passed


# --- library == solutions -----------------------------------------------------------------------


def test_library_matches_solution():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 24)
    assert torch.equal(vit.patchify(images, 8), solution.patchify(images, 8))

    config = vit.ViTConfig(image_size=16, patch_size=4, hidden_size=8, num_heads=2)
    embeddings = vit.VisionEmbeddings(config)
    torch.nn.init.normal_(embeddings.class_embedding)
    square = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        by_hand = solution.add_cls_and_positions(
            embeddings.patch_embedding(square),
            embeddings.class_embedding,
            embeddings.position_embedding.weight,
        )
        assert torch.allclose(embeddings(square), by_hand, atol=1e-6)
        # The conv patch embedding == patchify then one matrix (the chapter's claim).
        linear = solution.patchify(square, 4) @ embeddings.patch_embedding.linear_weight().T
        assert torch.allclose(embeddings.patch_embedding(square), linear, atol=1e-5)

    x, w = torch.randn(2, 5, 8), torch.randn(3, 4, 8)
    out, weights = solution.attention_head(x, *w)
    lib_out, lib_weights = manual_attention(*(x[:, None] @ wi.T for wi in w))
    assert torch.allclose(out, lib_out[:, 0], atol=1e-6)
    assert torch.allclose(weights, lib_weights[:, 0], atol=1e-6)

    pos = embeddings.position_embedding.weight.detach()
    sim = solution.position_similarity(pos)
    assert torch.allclose(sim, F.cosine_similarity(pos[:, None], pos[None], dim=-1), atol=1e-5)
