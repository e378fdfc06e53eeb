"""Chapter 5 graders: the Eyes (exercises/ch05_eyes.py).

Each check compares the learner's function with minillava.vit / minillava.attention on small
random images and tokens, then tests a property every right answer has (patches that put the
image back together, attention rows that sum to 1, a similarity matrix with ones on its
diagonal, position codes whose similarity depends only on the 2-D offset).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from minillava import vit as ref
from minillava.attention import manual_attention
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_shape,
    assert_tensor,
    diagnose,
    fmt,
    grader,
    step,
)

TITLE = "The Eyes"
MODULE = "ch05_eyes"


# --- patchify -----------------------------------------------------------------------------------


@grader("patchify", points=2)
def check_patchify(patchify):
    """Random square and non-square images against vit.patchify; patch 1 is right of patch 0."""
    for shape, p in (((2, 3, 16, 16), 4), ((1, 3, 8, 12), 4), ((2, 1, 6, 6), 3)):
        images = torch.randn(*shape)
        step(f"calling patchify(images {shape}, patch_size={p})")
        got = patchify(images, p)
        expected = ref.patchify(images, p)
        B, C, H, W = shape
        grid = "b c (gh p1) (gw p2) -> "  # the known mistakes, in einops
        column_major = rearrange(images, grid + "b (gw gh) (p1 p2 c)", p1=p, p2=p)
        channels_first = rearrange(images, grid + "b (gh gw) (c p1 p2)", p1=p, p2=p)
        pixels_by_column = rearrange(images, grid + "b (gh gw) (p2 p1 c)", p1=p, p2=p)
        reshaped = images.reshape(B, (H // p) * (W // p), -1)
        assert_close(
            got,
            expected,
            f"patchify(images {shape}, {p})",
            why_shape=f"N = ({H}/{p}) * ({W}/{p}) = {(H // p) * (W // p)} patches of "
            f"p*p*C = {p * p * C} values each",
            diagnosis=diagnose(
                got,
                {
                    "Your patches come column by column: patch 1 should be the right neighbour "
                    "of patch 0 (row by row, like reading), not the one below it.": column_major,
                    "Inside each patch your values are grouped by channel (all the red values, "
                    "then all the green, ...): keep each pixel's C channel values together, "
                    "channels innermost.": channels_first,
                    "Inside each patch your pixels go column by column: walk them row by row, "
                    "like the patches themselves.": pixels_by_column,
                    "It looks like you reshaped the image straight into patches: a reshape keeps "
                    "the memory order, so each of your patches is a run of consecutive pixels "
                    "along the image rows of one channel, not a p x p square.": reshaped,
                },
            ),
            hint="Split the height into (rows of patches, pixel rows inside a patch) and the "
            "width likewise; bring the two patch-grid axes to the front, grid row before grid "
            "column; flatten each patch as pixel row, pixel column, channel. A plain reshape "
            "cannot do it: the axes have to be permuted in between.",
        )


# --- add_cls_and_positions ----------------------------------------------------------------------


@grader("add_cls_and_positions", points=1)
def check_add_cls_and_positions(add_cls_and_positions):
    """Against vit.VisionEmbeddings: [CLS] first, every slot plus its own position embedding."""
    config = ref.ViTConfig(image_size=8, patch_size=4, hidden_size=6, num_heads=2)
    embeddings = ref.VisionEmbeddings(config)
    torch.nn.init.normal_(embeddings.class_embedding)
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        patches = embeddings.patch_embedding(images)  # (3, 4, 6)
        cls, pos = embeddings.class_embedding.detach(), embeddings.position_embedding.weight
        step("calling add_cls_and_positions(patch_tokens (3, 4, 6), cls_token (6,), pos (5, 6))")
        got = add_cls_and_positions(patches.clone(), cls.clone(), pos.clone())
        cls_rows = cls.expand(3, 1, 6)
        assert_close(
            got,
            embeddings(images),
            "add_cls_and_positions(...)",
            why_shape="one [CLS] token plus N = 4 patches, each of width C = 6",
            diagnosis=diagnose(
                got,
                {
                    "Your [CLS] token comes last: it belongs *first*, in slot 0, the one the "
                    "model reads the summary from.": torch.cat([patches, cls_rows], 1) + pos,
                    "You forgot to add the position embeddings.": torch.cat([cls_rows, patches], 1),
                    "Your [CLS] token has no position embedding: row 0 of the table is its own, "
                    "the patches take rows 1 to N.": torch.cat([cls_rows, patches + pos[1:]], 1),
                },
            ),
            hint="Build the sequence first, the same [CLS] vector in front of every image's "
            "patches (along the token axis), then add the whole table of N + 1 position "
            "embeddings, one row per slot.",
        )


# --- attention_head -----------------------------------------------------------------------------


@grader("attention_head", points=2)
def check_attention_head(attention_head):
    """One head on random tokens against attention.manual_attention; rows of weights sum to 1."""
    B, T, C, D = 2, 5, 12, 4
    x = torch.randn(B, T, C)
    w_q, w_k, w_v = (torch.randn(D, C) / math.sqrt(C) for _ in range(3))
    step(f"calling attention_head(x ({B}, {T}, {C}), w_q, w_k, w_v each ({D}, {C}))")
    result = attention_head(x, w_q, w_k, w_v)
    if not isinstance(result, tuple) or len(result) != 2:
        raise GradingFailure(
            f"attention_head must return a tuple (out, weights), got {type(result).__name__}.",
            "Return both the output and the attention weights, the output first.",
        )
    out, weights = result
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    expected_out, expected_weights = manual_attention(q[:, None], k[:, None], v[:, None])
    scores = q @ k.transpose(-2, -1)
    assert_close(
        weights,
        expected_weights[:, 0],
        "the attention weights",
        why_shape="one weight per (query, key) pair: (B, T, T)",
        diagnosis=diagnose(
            weights,
            {
                "Your scores are not scaled: without dividing by √D (the head size, here 4) "
                "the softmax gets sharper as heads get wider.": scores.softmax(-1),
                "Your softmax ran over the queries: each column sums to 1, but each query's "
                "row of weights over the *keys* must.": (scores / math.sqrt(D)).softmax(-2),
                "Your weights are transposed: row t must hold query t's weights over the keys; "
                "yours holds what every query gives key t.": (scores / math.sqrt(D))
                .transpose(-2, -1)
                .softmax(-1),
            },
        ),
        hint="Project x three times (queries, keys, values; the weights are stored as a linear "
        "layer stores them, so x meets their transposes), score every query against every key "
        "with a dot product scaled by √D, then softmax each query's row over the keys.",
    )
    assert_close(
        out,
        expected_out[:, 0],
        "the attention output",
        why_shape="one D-vector per token: (B, T, D)",
        diagnosis=diagnose(
            out,
            {
                "Your output mixes the values with the transposed weights: token t must average "
                "the values with its own row of weights.": expected_weights[:, 0].transpose(-2, -1)
                @ v,
                "Your output averages the queries, not the values.": expected_weights[:, 0] @ q,
            },
        ),
        hint="Each token's output is the average of the value vectors (x through w_v), "
        "weighted by that token's row of attention weights: one matrix product.",
    )


# --- position_similarity ------------------------------------------------------------------------


@grader("position_similarity", points=1)
def check_position_similarity(position_similarity):
    """Cosine similarities of random embeddings against F.cosine_similarity; diagonal = 1."""
    embeddings = torch.randn(17, 8) * torch.rand(17, 1) * 5
    step("calling position_similarity(embeddings (17, 8))")
    got = position_similarity(embeddings.clone())
    expected = F.cosine_similarity(embeddings[:, None], embeddings[None], dim=-1)
    assert_close(
        got,
        expected,
        "position_similarity(embeddings)",
        why_shape="one similarity per pair of positions: (N, N)",
        diagnosis=diagnose(
            got,
            {
                "Your similarities are raw dot products, which grow with the vectors' lengths: "
                "a cosine needs each embedding brought to length 1 first.": embeddings
                @ embeddings.T,
                "You normalised each column (one feature across all positions), not each ROW "
                "(one embedding per row).": F.normalize(embeddings, dim=0)
                @ F.normalize(embeddings, dim=0).T,
            },
        ),
        hint="Bring every embedding, every row, to length 1; one matrix product of those unit "
        "rows with themselves then gives every pair's cosine.",
        atol=1e-5,
    )
    diagonal = assert_tensor(got, "position_similarity").diagonal()
    if not torch.allclose(diagonal, torch.ones_like(diagonal), atol=1e-4):
        raise GradingFailure(
            f"The diagonal of position_similarity should be all ones, got {fmt(diagonal)}.",
            "Every embedding has cosine similarity 1 with itself.",
        )


# --- sincos_2d_positions (stretch) --------------------------------------------------------------


def _sincos_1d(positions: torch.Tensor, width: int, exponent_over: int | None = None):
    """The 1-D transformer code of `positions` (P,) in `width` channels: (P, width).

    [sin(p ω_0), ..., sin(p ω_{K-1}), cos(p ω_0), ..., cos(p ω_{K-1})], K = width / 2,
    ω_i = 1 / 10000^(2i / width). `exponent_over` replaces `width` in the exponent (a mistake).
    """
    over = width if exponent_over is None else exponent_over
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) * 2 / over)
    angles = positions.double()[:, None] * omega[None]  # (P, K)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _sincos_2d(grid_h: int, grid_w: int, dim: int, **mistake) -> torch.Tensor:
    """The reference (and, with a keyword, a known mistake): (grid_h * grid_w, dim), float32.

    Mistakes: rows_first (the halves swapped), column_major (patch order), interleaved,
    cos_first, exponent_over_dim (ω over the full dim), from_one (positions counted from 1),
    flat (one 1-D code over the patch index).
    """
    n = torch.arange(grid_h * grid_w)
    if mistake.get("flat"):
        return _sincos_1d(n, dim).float()
    if mistake.get("column_major"):
        rows, cols = n % grid_h, n // grid_h
    else:
        rows, cols = n // grid_w, n % grid_w
    if mistake.get("from_one"):
        rows, cols = rows + 1, cols + 1
    over = dim if mistake.get("exponent_over_dim") else None
    halves = [_sincos_1d(cols, dim // 2, over), _sincos_1d(rows, dim // 2, over)]
    if mistake.get("rows_first"):
        halves = halves[::-1]
    code = torch.cat(halves, dim=1)  # (P, dim)
    K = dim // 4
    if mistake.get("interleaved"):  # sin, cos, sin, cos, ... in each half
        code = code.reshape(-1, 2, 2, K).transpose(-2, -1).reshape(-1, dim)
    if mistake.get("cos_first"):
        code = code.reshape(-1, 2, 2, K).flip(2).reshape(-1, dim)
    return code.float()


def _sincos_diagnosis(got: torch.Tensor, grid_h: int, grid_w: int, dim: int) -> str | None:
    """The known layout mistake `got` reproduces, if any."""

    def wrong(**mistake):
        return _sincos_2d(grid_h, grid_w, dim, **mistake)

    return diagnose(
        got,
        {
            "Your two halves are swapped: the first half of the channels must encode the column "
            "(the horizontal position), the second half the row.": wrong(rows_first=True),
            "Your patches are numbered column by column: patch 1 is the right neighbour of "
            "patch 0 (row-major order, as patchify reads them), not the one below it.": wrong(
                column_major=True
            ),
            "Your sines and cosines alternate channel by channel: in each half, all the sines "
            "come first, then all the cosines, as in MAE.": wrong(interleaved=True),
            "Your cosines come before your sines: in each half, the sines come first.": wrong(
                cos_first=True
            ),
            "Your frequencies are spread over the full width dim: each half is a 1-D code of "
            "dim / 2 channels, and its exponents run over dim / 2.": wrong(exponent_over_dim=True),
            "Your positions are counted from 1: patch 0, the top-left one, is at row 0 and "
            "column 0, so its sines are all 0 and its cosines all 1.": wrong(from_one=True),
            "It looks like you coded the patch index as one 1-D position: patches at the end of "
            "a row and at the start of the next get nearly the same code, though they sit on "
            "opposite sides of the image, and a step down looks like a long way off.": wrong(
                flat=True
            ),
        },
    )


def _geometry(code: torch.Tensor, grid_h: int, grid_w: int) -> str | None:
    """What a code whose values are unknown gets wrong about the 2-D geometry, or None.

    A right code's dot product between two patches depends only on their offset (Δrow, Δcol),
    a step right is as similar as a step down, and a step of one is more similar than a step
    of two. The patches are read in row-major order.
    """
    sim = code.detach().double() @ code.detach().double().T
    index = torch.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    steps = {}
    for name, (dr, dc) in {"right": (0, 1), "down": (1, 0), "two right": (0, 2)}.items():
        a = index[: grid_h - dr, : grid_w - dc].reshape(-1)
        b = index[dr:, dc:].reshape(-1)
        values = sim[a, b]
        spread = float(values.max() - values.min())
        if spread > 1e-3 * (1 + float(values.abs().max())):
            worst, best = int(values.argmin()), int(values.argmax())
            return (
                f"Two pairs of patches one step {name} of each other get different dot "
                f"products: patch {int(a[best])} with {int(b[best])} gives "
                f"{fmt(float(values[best]))}, patch {int(a[worst])} with {int(b[worst])} "
                f"{fmt(float(values[worst]))}. In a 2-D code the similarity depends only on "
                "the offset between two patches."
            )
        steps[name] = float(values.mean())
    if abs(steps["right"] - steps["down"]) > 1e-3 * (1 + abs(steps["right"])):
        return (
            f"A step right gives a dot product of {fmt(steps['right'])}, a step down "
            f"{fmt(steps['down'])}: your row and your column are not coded the same way."
        )
    if not steps["right"] > steps["two right"]:
        return (
            "Your neighbours are not more similar than patches two steps away: the lowest "
            "frequencies must vary slowly across the grid."
        )
    return None


@grader("sincos_2d_positions", points=3)
def check_sincos_2d_positions(sincos_2d_positions):
    """Stretch: the 2-D sine-cosine code for grids 2 x 3, 4 x 6 (dim 16, 32) and 7 x 7 (dim 64),
    exactly; the layout mistakes are told apart; dim not a multiple of 4 raises ValueError."""
    for grid_h, grid_w, dim in ((2, 3, 8), (4, 6, 32), (7, 7, 64), (3, 5, 16)):
        step(f"calling sincos_2d_positions({grid_h}, {grid_w}, {dim})")
        got = sincos_2d_positions(grid_h, grid_w, dim)
        got = assert_shape(
            got,
            (grid_h * grid_w, dim),
            f"sincos_2d_positions({grid_h}, {grid_w}, {dim})",
            why=f"one row per patch, {grid_h} x {grid_w} = {grid_h * grid_w}, of dim = {dim} "
            "channels",
        )
        assert_close(
            got,
            _sincos_2d(grid_h, grid_w, dim),
            f"sincos_2d_positions({grid_h}, {grid_w}, {dim})",
            atol=1e-5,
            diagnosis=_sincos_diagnosis(got, grid_h, grid_w, dim) or _geometry(got, grid_h, grid_w),
            hint="Work out each patch's row and column from its row-major index. Each half is "
            "the 1-D code of the transformer paper over dim / 2 channels: dim / 4 frequencies, "
            "falling geometrically from 1 to nearly 1/10000, the sines of position times "
            "frequency, then the cosines. The column's half first, then the row's.",
        )
    step("calling sincos_2d_positions(2, 2, 30): 30 channels cannot be cut into four equal parts")
    try:
        sincos_2d_positions(2, 2, 30)
    except ValueError:
        return
    raise GradingFailure(
        "sincos_2d_positions(2, 2, 30) raised no ValueError, yet 30 is not a multiple of 4: it "
        "cannot hold sine and cosine blocks of equal width for both the column and the row.",
        "Check dim before computing anything, and raise the error the docstring names: a silent "
        "wrong code is worse than a clear refusal.",
    )
