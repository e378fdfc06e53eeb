"""Chapter 5: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.vit) agrees with solutions/ch05_eyes.py, so the chapter, the
notebook and the reference cannot drift apart.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minillava import vit
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
        (channels_first, ["channels innermost"]),
        (plain_reshape, ["rearrange"]),
    ],
)
def test_patchify_rejects(rejects, wrong, mentions):
    rejects("ch05.patchify", wrong, mentions=mentions)


# --- add_cls_and_positions ----------------------------------------------------------------------


def cls_last(patch_tokens, cls_token, position_embeddings):
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)
    return torch.cat([patch_tokens, cls], dim=1) + position_embeddings


def positions_on_patches_only(patch_tokens, cls_token, position_embeddings):
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)
    return torch.cat([cls, patch_tokens + position_embeddings[1:]], dim=1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [(cls_last, ["*first*"]), (positions_on_patches_only, ["row 0"])],
)
def test_add_cls_and_positions_rejects(rejects, wrong, mentions):
    rejects("ch05.add_cls_and_positions", wrong, mentions=mentions)


# --- attention_head -----------------------------------------------------------------------------


def unscaled(x, w_q, w_k, w_v):
    weights = ((x @ w_q.T) @ (x @ w_k.T).transpose(-2, -1)).softmax(-1)
    return weights @ (x @ w_v.T), weights


def softmax_over_queries(x, w_q, w_k, w_v):
    q, k = x @ w_q.T, x @ w_k.T
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2)
    return weights @ (x @ w_v.T), weights


@pytest.mark.parametrize(
    "wrong, mentions",
    [(unscaled, ["1 / sqrt(D)"]), (softmax_over_queries, ["over the *keys*"])],
)
def test_attention_head_rejects(rejects, wrong, mentions):
    rejects("ch05.attention_head", wrong, mentions=mentions)


# --- position_similarity ------------------------------------------------------------------------


def raw_dot_product(position_embeddings):
    return position_embeddings @ position_embeddings.T


def normalised_columns(position_embeddings):
    unit = F.normalize(position_embeddings, dim=0)
    return unit @ unit.T


@pytest.mark.parametrize(
    "wrong, mentions",
    [(raw_dot_product, ["length 1"]), (normalised_columns, ["each ROW"])],
)
def test_position_similarity_rejects(rejects, wrong, mentions):
    rejects("ch05.position_similarity", wrong, mentions=mentions)


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
