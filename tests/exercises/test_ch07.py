"""Chapter 7: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.projector) agrees with solutions/ch07_bridge.py.
"""

import pytest
import torch
import torch.nn.functional as F

from minillava.projector import build_projector
from solutions import ch07_bridge as solution

# --- linear_projector -----------------------------------------------------------------------


def untransposed(image_features, weight, bias):
    return image_features @ weight + bias


def no_bias(image_features, weight, bias):
    return image_features @ weight.T


def times_bias(image_features, weight, bias):
    return (image_features @ weight.T) * bias


def last_image_only(image_features, weight, bias):
    return (image_features[-1:] @ weight.T + bias).expand(len(image_features), -1, -1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (untransposed, ["(out, in)", "weight.T"]),
        (no_bias, ["bias is missing"]),
        (times_bias, ["not multiply"]),
        (last_image_only, ["is wrong"]),
    ],
)
def test_linear_projector_rejects(rejects, wrong, mentions):
    rejects("ch07.linear_projector", wrong, mentions=mentions)


# --- mlp_projector --------------------------------------------------------------------------


def no_activation(x, w1, b1, w2, b2):
    return (x @ w1.T + b1) @ w2.T + b2


def gelu_after_second(x, w1, b1, w2, b2):
    return F.gelu((x @ w1.T + b1) @ w2.T + b2)


def relu_instead(x, w1, b1, w2, b2):
    return F.relu(x @ w1.T + b1) @ w2.T + b2


def tanh_gelu(x, w1, b1, w2, b2):
    return F.gelu(x @ w1.T + b1, approximate="tanh") @ w2.T + b2


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_activation, ["activation is missing", "collapse"]),
        (gelu_after_second, ["BETWEEN the layers"]),
        (relu_instead, ["GELU, not ReLU"]),
        (tanh_gelu, ["exact GELU"]),
    ],
)
def test_mlp_projector_rejects(rejects, wrong, mentions):
    rejects("ch07.mlp_projector", wrong, mentions=mentions)


# --- projector_num_parameters ---------------------------------------------------------------


def forgets_biases(kind, vision_dim, text_dim):
    if kind == "linear":
        return vision_dim * text_dim
    return vision_dim * text_dim + text_dim * text_dim


def second_layer_from_vision(kind, vision_dim, text_dim):
    one = vision_dim * text_dim + text_dim
    return one if kind == "linear" else 2 * one


def returns_tensor(kind, vision_dim, text_dim):
    return torch.tensor(solution.projector_num_parameters(kind, vision_dim, text_dim))


def accepts_anything(kind, vision_dim, text_dim):
    if kind == "linear":
        return vision_dim * text_dim + text_dim
    return vision_dim * text_dim + text_dim * text_dim + 2 * text_dim


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (forgets_biases, ["count the biases"]),
        (second_layer_from_vision, ["text_dim -> text_dim"]),
        (returns_tensor, ["Python int"]),
        (accepts_anything, ["ValueError"]),
    ],
)
def test_projector_num_parameters_rejects(rejects, wrong, mentions):
    rejects("ch07.projector_num_parameters", wrong, mentions=mentions)


# --- nearest_text_tokens --------------------------------------------------------------------


def raw_dot_product(projected, token_embeddings, k=5):
    return (projected @ token_embeddings.T).topk(k, dim=-1)


def tokens_normalised_only(projected, token_embeddings, k=5):
    return (projected @ F.normalize(token_embeddings, dim=-1).T).topk(k, dim=-1)


def topk_over_vectors(projected, token_embeddings, k=5):
    cos = F.normalize(projected, dim=-1) @ F.normalize(token_embeddings, dim=-1).T
    return cos.topk(k, dim=0)


def ids_only(projected, token_embeddings, k=5):
    return solution.nearest_text_tokens(projected, token_embeddings, k)[1]


def swapped_pair(projected, token_embeddings, k=5):
    similarities, token_ids = solution.nearest_text_tokens(projected, token_embeddings, k)
    return token_ids, similarities


def lowest_first(projected, token_embeddings, k=5):
    cos = F.normalize(projected, dim=-1) @ F.normalize(token_embeddings, dim=-1).T
    return cos.topk(k, dim=-1, largest=False)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (raw_dot_product, ["raw dot product", "normalise both"]),
        (tokens_normalised_only, ["normalise the projected vectors too"]),
        (topk_over_vectors, ["shape (3, 10), expected (4, 3)"]),
        (ids_only, ["pair (similarities, token_ids)"]),
        (lowest_first, ["highest first"]),
        (swapped_pair, ["wrong way round", "(similarities, token_ids)"]),
    ],
)
def test_nearest_text_tokens_rejects(rejects, wrong, mentions):
    rejects("ch07.nearest_text_tokens", wrong, mentions=mentions)


# --- the library and the solutions agree ----------------------------------------------------


def test_library_projectors_match_the_solutions():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12)
    linear = build_projector("linear", 12, 20)
    expected = solution.linear_projector(x, linear.linear.weight, linear.linear.bias)
    torch.testing.assert_close(linear(x), expected)
    mlp = build_projector("mlp2x_gelu", 12, 20)
    expected = solution.mlp_projector(
        x, mlp.linear_1.weight, mlp.linear_1.bias, mlp.linear_2.weight, mlp.linear_2.bias
    )
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_library_parameter_count_matches_the_formula(kind):
    module = build_projector(kind, 48, 80)
    assert solution.projector_num_parameters(kind, 48, 80) == sum(
        p.numel() for p in module.parameters() if p.requires_grad
    )
