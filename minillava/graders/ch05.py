"""Chapter 5 graders: the Eyes (exercises/ch05_eyes.py).

Each check compares the learner's function with minillava.vit / minillava.attention on small
random images and tokens, then tests a property every right answer has (patches that put the
image back together, attention rows that sum to 1, a similarity matrix with ones on its
diagonal).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from minillava import vit as ref
from minillava.attention import manual_attention
from minillava.grading import GradingFailure, assert_close, assert_tensor, diagnose, grader, step

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
        assert_close(
            got,
            expected,
            f"patchify(images {shape}, {p})",
            why_shape=f"N = ({H}/{p}) * ({W}/{p}) = {(H // p) * (W // p)} patches of "
            f"p*p*C = {p * p * C} values each",
            hint=diagnose(
                got,
                {
                    "Your patches come column by column: patch 1 should be the right neighbour "
                    "of patch 0 (row by row, like reading), not the one below it.": rearrange(
                        images, "b c (gh p1) (gw p2) -> b (gw gh) (p1 p2 c)", p1=p, p2=p
                    ),
                    "Inside a patch, keep each pixel's C channel values together, channels "
                    "innermost: (p1, p2, c), not (c, p1, p2).": rearrange(
                        images, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=p, p2=p
                    ),
                    "Inside a patch, walk the pixels row by row (p1 before p2).": rearrange(
                        images, "b c (gh p1) (gw p2) -> b (gh gw) (p2 p1 c)", p1=p, p2=p
                    ),
                },
                'rearrange(images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)',
            ),
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
            hint=diagnose(
                got,
                {
                    "Put [CLS] *first*: [CLS, patch_1, ..., patch_N]. Slot 0 is the one the "
                    "model reads the summary from.": torch.cat([patches, cls_rows], 1) + pos,
                    "You forgot to add the position embeddings.": torch.cat([cls_rows, patches], 1),
                    "The [CLS] token gets a position embedding too (row 0): add all N + 1 rows "
                    "after concatenating.": torch.cat([cls_rows, patches + pos[1:]], 1),
                },
                "tokens = torch.cat([cls_token.expand(B, 1, -1), patch_tokens], dim=1); "
                "return tokens + position_embeddings",
            ),
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
        raise GradingFailure("attention_head must return a tuple (out, weights).")
    out, weights = result
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    expected_out, expected_weights = manual_attention(q[:, None], k[:, None], v[:, None])
    scores = q @ k.transpose(-2, -1)
    assert_close(
        weights,
        expected_weights[:, 0],
        "the attention weights",
        why_shape="one weight per (query, key) pair: (B, T, T)",
        hint=diagnose(
            weights,
            {
                "Scale the scores by 1 / sqrt(D) before the softmax (D = head size, "
                "here 4).": scores.softmax(-1),
                "Softmax over the *keys* (dim=-1): each query's weights must sum to 1.": (
                    scores / math.sqrt(D)
                ).softmax(-2),
                "Use the transposed keys, q @ k^T, not k @ q^T: row t holds query t's weights.": (
                    scores / math.sqrt(D)
                )
                .transpose(-2, -1)
                .softmax(-1),
            },
            "weights = softmax(q @ k.transpose(-2, -1) / sqrt(D), dim=-1)",
        ),
    )
    assert_close(
        out,
        expected_out[:, 0],
        "the attention output",
        why_shape="one D-vector per token: (B, T, D)",
        hint="out = weights @ v, with v = x @ w_v.T.",
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
        hint=diagnose(
            got,
            {
                "Normalise each embedding to length 1 first: that is a raw dot product, "
                "which grows with the vectors' lengths.": embeddings @ embeddings.T,
                "Normalise each ROW (one embedding per row): F.normalize(e, dim=-1).": F.normalize(
                    embeddings, dim=0
                )
                @ F.normalize(embeddings, dim=0).T,
            },
            "unit = F.normalize(e, dim=-1); return unit @ unit.T",
        ),
        atol=1e-5,
    )
    diagonal = assert_tensor(got, "position_similarity").diagonal()
    if not torch.allclose(diagonal, torch.ones_like(diagonal), atol=1e-4):
        raise GradingFailure("Every embedding has cosine similarity 1 with itself: the diagonal.")
