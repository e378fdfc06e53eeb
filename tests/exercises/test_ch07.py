"""Chapter 7: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.projector) agrees with solutions/ch07_bridge.py.
"""

import pytest
import torch
import torch.nn.functional as F

from minillava.graders import ch07 as grader
from minillava.projector import build_projector
from minillava.resampler import PerceiverResampler, ResamplerConfig
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
        (untransposed, ["as it is stored", "(out, in)", "transpose"]),
        (no_bias, ["bias is missing"]),
        (times_bias, ["multiplied by the bias instead of adding"]),
        (last_image_only, ["is wrong", "expected"]),
    ],
)
def test_linear_projector_rejects(rejects, wrong, mentions):
    rejects("ch07.linear_projector", wrong, mentions=mentions, hint_mentions=["transposed weight"])


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
        (gelu_after_second, ["after the second layer", "BETWEEN the layers"]),
        (relu_instead, ["GELU, not ReLU"]),
        (tanh_gelu, ["tanh approximation", "exact GELU"]),
    ],
)
def test_mlp_projector_rejects(rejects, wrong, mentions):
    rejects("ch07.mlp_projector", wrong, mentions=mentions, hint_mentions=["exact GELU"])


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
    "wrong, mentions, hint_mentions",
    [
        (forgets_biases, ["weights only", "count the biases"], ["n_out biases"]),
        (second_layer_from_vision, ["from text_dim to text_dim"], ["n_in times n_out"]),
        (returns_tensor, ["Python int"], ["no tensor is needed"]),
        (accepts_anything, ["should raise ValueError"], ["names the kind"]),
    ],
)
def test_projector_num_parameters_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch07.projector_num_parameters", wrong, mentions=mentions, hint_mentions=hint_mentions)


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
    "wrong, mentions, hint_mentions",
    [
        (raw_dot_product, ["raw dot product", "whatever their direction"], ["normalise both"]),
        (tokens_normalised_only, ["normalise the projected vectors too"], ["unit length"]),
        (topk_over_vectors, ["shape (3, 10), expected (4, 3)"], ["last dimension"]),
        (ids_only, ["pair (similarities, token_ids)"], ["indices"]),
        (lowest_first, ["LEAST similar"], ["highest first"]),
        (swapped_pair, ["wrong way round", "(similarities, token_ids)"], ["values first"]),
    ],
)
def test_nearest_text_tokens_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch07.nearest_text_tokens", wrong, mentions=mentions, hint_mentions=hint_mentions)


# --- perceiver_resampler (stretch) ----------------------------------------------------------


def _resample(
    self, x, keys_values="both", softmax_dim=-1, residual=True, queries="latents", detach=False
):
    """The solution's forward with one switch flipped: each wrong version below is one bug."""
    B, H = x.shape[0], self.num_heads
    media = self.input_proj(x)
    latents = (self.latents.detach() if detach else self.latents).expand(B, -1, -1)
    if queries == "patches":  # the patches ask: one output token per patch
        latents = media + self.latents.mean(0)
    for layer in self.layers:
        attn = layer["attn"]
        q_in = layer["norm_latents"](latents)
        kv = {
            "both": [layer["norm_media"](media), q_in],
            "latents": [q_in],
        }[keys_values]
        kv = torch.cat(kv, dim=1)
        D = q_in.shape[-1]
        q, k, v = (
            proj(t).unflatten(-1, (H, D // H)).transpose(1, 2)
            for proj, t in ((attn["q_proj"], q_in), (attn["k_proj"], kv), (attn["v_proj"], kv))
        )
        weights = (q @ k.transpose(-2, -1) / (D // H) ** 0.5).softmax(dim=softmax_dim)
        out = attn["out_proj"]((weights @ v).transpose(1, 2).flatten(2))
        latents = latents + out if residual else out
        latents = latents + layer["ff"](layer["norm_ff"](latents))
    return self.output_proj(self.norm(latents))


class LatentsOnly(solution.PerceiverResampler):
    def forward(self, patch_features):
        return _resample(self, patch_features, keys_values="latents")


class SoftmaxOverQueries(solution.PerceiverResampler):
    def forward(self, patch_features):
        return _resample(self, patch_features, softmax_dim=-2)


class NoAttentionResidual(solution.PerceiverResampler):
    def forward(self, patch_features):
        return _resample(self, patch_features, residual=False)


class PatchesAsQueries(solution.PerceiverResampler):
    def forward(self, patch_features):
        return _resample(self, patch_features, queries="patches")


class DetachedLatents(solution.PerceiverResampler):
    def forward(self, patch_features):
        return _resample(self, patch_features, detach=True)


class RenamedParameters(solution.PerceiverResampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queries = self.latents  # renamed: the library's weights no longer fit
        del self.latents

    def forward(self, patch_features):
        return self.queries.sum() * patch_features


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (LatentsOnly, ["attended to themselves only", "same whatever the image"]),
        (SoftmaxOverQueries, ["softmax ran over the latents", "instead of over the keys"]),
        (NoAttentionResidual, ["attention's residual is missing"]),
        (PatchesAsQueries, ["one token per patch", "must not depend on the number of patches"]),
        (DetachedLatents, ["No gradient reaches latents"]),
        (RenamedParameters, ["do not fit your PerceiverResampler"]),
    ],
)
def test_perceiver_resampler_rejects(rejects, wrong, mentions):
    rejects("ch07.perceiver_resampler", wrong, mentions=mentions)


def test_perceiver_resampler_hint_walks_through_a_layer(rejects):
    rejects(
        "ch07.perceiver_resampler",
        SoftmaxOverQueries,
        mentions=["softmax"],
        hint_mentions=["softmax over the keys", "added to the latents"],
    )


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


@pytest.mark.parametrize("num_layers, num_heads, P", [(1, 1, 7), (2, 4, 5), (3, 2, 30)])
def test_library_resampler_matches_the_solution(num_layers, num_heads, P):
    torch.manual_seed(num_layers)
    sizes = dict(
        vision_dim=12,
        text_dim=20,
        hidden_size=16,
        num_latents=4,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=32,
    )
    library = PerceiverResampler(ResamplerConfig(**sizes))
    ours = solution.PerceiverResampler(**sizes)
    ours.load_state_dict(library.state_dict())  # strict: the same parameters, by name
    x = torch.randn(3, P, 12)
    torch.testing.assert_close(ours(x), library(x))
    assert ours(x).shape == (3, 4, 20)


def test_the_graders_wrong_versions_start_from_the_library():
    """With no mistake switched on, the grader's own forward is the library's resampler."""
    module = grader._reference_resampler()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(grader._resample(module, x), module(x))
