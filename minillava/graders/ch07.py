"""Chapter 7 graders: the Bridge (exercises/ch07_bridge.py).

The projector checks copy random weights into minillava.projector's modules and compare outputs;
the parameter count is compared with the modules' own count; nearest tokens with a cosine top-k.
"""

import torch
import torch.nn.functional as F

from minillava import projector as ref
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
    diagnose,
    grader,
    step,
)

TITLE = "The Bridge"
MODULE = "ch07_bridge"

TRANSPOSE = (
    "nn.Linear stores its weight as (out, in) = (C_t, C_v): compute x @ weight.T + bias, "
    "not x @ weight."
)


def _linear_module(vision_dim: int, text_dim: int) -> ref.LinearProjector:
    module = ref.build_projector("linear", vision_dim, text_dim)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # non-zero biases, so a missing bias shows
    return module


@grader("linear_projector", points=2)
def check_linear_projector(linear_projector):
    """Square (4 -> 4) then (6 -> 4) weights on (2, 3, C_v) features, against LinearProjector."""
    module = _linear_module(4, 4)
    W, b = module.linear.weight.detach(), module.linear.bias.detach()
    x = torch.randn(2, 3, 4)
    step("calling linear_projector(features (2, 3, 4), weight (4, 4), bias (4,))")
    got = linear_projector(x, W, b)
    assert_close(
        got,
        module(x).detach(),
        "linear_projector(features (2, 3, 4), weight (4, 4), bias (4,))",
        why_shape="every one of the 2 x 3 patch vectors becomes one vector of C_t = 4",
        hint=diagnose(
            got,
            {
                TRANSPOSE: x @ W + b,
                "The bias is missing: W x + b.": x @ W.T,
                "Add the bias once per output, not multiply: x @ weight.T + bias.": (x @ W.T) * b,
            },
            "Each patch vector x becomes x @ weight.T + bias.",
        ),
    )
    module = _linear_module(6, 4)
    W, b = module.linear.weight.detach(), module.linear.bias.detach()
    x = torch.randn(2, 3, 6)
    step("calling linear_projector(features (2, 3, 6), weight (4, 6), bias (4,))")
    assert_close(
        linear_projector(x, W, b),
        module(x).detach(),
        "linear_projector(features (2, 3, 6), weight (4, 6), bias (4,))",
        why_shape="C_v = 6 numbers in, C_t = 4 out, for each of the 2 x 3 patches",
        hint=TRANSPOSE,
    )
    step("calling linear_projector on one image's patches alone")
    assert_close(
        linear_projector(x[1:], W, b),
        module(x[1:]).detach(),
        "linear_projector(features[1:], ...)",
        hint="Each patch is projected on its own: the result cannot depend on the other images.",
    )


@grader("mlp_projector", points=2)
def check_mlp_projector(mlp_projector):
    """(2, 5, 6) features through Linear(6 -> 4), GELU, Linear(4 -> 4), against MLPProjector."""
    module = ref.build_projector("mlp2x_gelu", 6, 4)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    weights = [
        t.detach()
        for t in (
            module.linear_1.weight,
            module.linear_1.bias,
            module.linear_2.weight,
            module.linear_2.bias,
        )
    ]
    W1, b1, W2, b2 = weights
    x = torch.randn(2, 5, 6)
    step("calling mlp_projector(features (2, 5, 6), W1 (4, 6), b1 (4,), W2 (4, 4), b2 (4,))")
    got = mlp_projector(x, *weights)
    h = x @ W1.T + b1
    assert_close(
        got,
        module(x).detach(),
        "mlp_projector(features (2, 5, 6), W1 (4, 6), b1, W2 (4, 4), b2)",
        why_shape="C_t = 4 numbers out for each of the 2 x 5 patches",
        hint=diagnose(
            got,
            {
                "The activation is missing: without a GELU between them the two layers collapse "
                "into one linear map (W2 W1 x + ...). Apply F.gelu to the first layer's "
                "output.": h @ W2.T + b2,
                "The GELU goes BETWEEN the layers, not after the second one: "
                "out = W2 GELU(W1 x + b1) + b2.": F.gelu(h @ W2.T + b2),
                "GELU, not ReLU: LLaVA-1.5's projector uses F.gelu, which lets small negative "
                "values through.": F.relu(h) @ W2.T + b2,
                "Use the exact GELU, F.gelu(x), not the tanh approximation.": F.gelu(
                    h, approximate="tanh"
                )
                @ W2.T
                + b2,
            },
            "out = W2 GELU(W1 x + b1) + b2, with x @ W.T for each layer.",
        ),
        atol=1e-5,
        rtol=1e-5,
    )


@grader("projector_num_parameters", points=2)
def check_projector_num_parameters(projector_num_parameters):
    """Both kinds at several sizes against build_projector's own count; unknown kinds raise."""
    step('calling projector_num_parameters("linear", 3, 2)')
    got = projector_num_parameters("linear", 3, 2)
    if not isinstance(got, int) or isinstance(got, bool):
        raise GradingFailure(
            f"projector_num_parameters returned a {type(got).__name__}, expected a Python int.",
            "Plain arithmetic on the int arguments gives an int; use int(...) on a tensor.",
        )
    for kind in ("linear", "mlp2x_gelu"):
        for vision_dim, text_dim in ((3, 2), (128, 256), (1024, 4096)):
            module = ref.build_projector(kind, vision_dim, text_dim)
            expected = sum(p.numel() for p in module.parameters())
            step(f"calling projector_num_parameters({kind!r}, {vision_dim}, {text_dim})")
            got = projector_num_parameters(kind, vision_dim, text_dim)
            if got == expected:
                continue
            no_bias = vision_dim * text_dim + (text_dim * text_dim if kind != "linear" else 0)
            both_from_vision = 2 * (vision_dim * text_dim + text_dim)
            if got == no_bias:
                hint = "Count the biases too: nn.Linear(n_in, n_out) has n_out of them."
            elif kind != "linear" and got == both_from_vision:
                hint = "The second layer maps text_dim -> text_dim, not vision_dim -> text_dim."
            else:
                hint = (
                    "Add up each nn.Linear(n_in, n_out): n_in * n_out weights + n_out biases. "
                    "The MLP's layers are (vision_dim -> text_dim) and (text_dim -> text_dim)."
                )
            raise GradingFailure(
                f"projector_num_parameters({kind!r}, {vision_dim}, {text_dim}) = {got}, but "
                f"build_projector({kind!r}, {vision_dim}, {text_dim}) has {expected} parameters.",
                hint,
            )
    step('calling projector_num_parameters("qformer", 8, 8)')
    try:
        projector_num_parameters("qformer", 8, 8)
    except ValueError:
        return
    raise GradingFailure(
        'projector_num_parameters("qformer", 8, 8) should raise ValueError (an unknown kind), '
        "but it returned.",
        "End with: raise ValueError(f'unknown projector kind {kind!r}').",
    )


@grader("nearest_text_tokens", points=2)
def check_nearest_text_tokens(nearest_text_tokens):
    """4 vectors against 10 token embeddings of very different lengths: cosine top-3."""
    table = torch.randn(10, 6) * torch.linspace(0.2, 5.0, 10)[:, None]  # long rows at the end
    projected = torch.randn(4, 6)
    projected[0] = 3.0 * table[2]  # row 0 points exactly at (short) token 2
    cosines = F.normalize(projected, dim=-1) @ F.normalize(table, dim=-1).T
    values, ids = cosines.topk(3, dim=-1)
    step("calling nearest_text_tokens(projected (4, 6), token_embeddings (10, 6), k=3)")
    out = nearest_text_tokens(projected, table, 3)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise GradingFailure(
            "nearest_text_tokens should return a pair (similarities, token_ids), got "
            f"{type(out).__name__}.",
            "tensor.topk(k, dim=-1) returns exactly that pair.",
        )
    got_values, got_ids = out
    swapped = (
        isinstance(got_values, torch.Tensor)
        and isinstance(got_ids, torch.Tensor)
        and not got_values.is_floating_point()
        and got_ids.is_floating_point()
    )
    if swapped:
        raise GradingFailure(
            "The pair is the wrong way round: the first item holds integers (token ids) and the "
            "second floats (similarities). Return (similarities, token_ids).",
            "topk returns (values, indices): that is already the order asked for.",
        )
    dots = projected @ table.T
    assert_shape(got_ids, (4, 3), "token_ids", why="k = 3 tokens for each of the 4 vectors")
    assert_equal(
        got_ids.long(),
        ids,
        "token_ids",
        hint=diagnose(
            got_ids.float(),
            {
                "That ranks by raw dot product: long embeddings win whatever their direction. "
                "Normalise both sides first (cosine similarity).": dots.topk(3, dim=-1)[1].float(),
            },
            "Rank by cosine similarity, highest first: F.normalize both, multiply, topk.",
        ),
    )
    assert_close(
        got_values,
        values,
        "similarities",
        hint=diagnose(
            got_values,
            {
                "Return the cosines, not raw dot products: normalise both sides.": torch.gather(
                    dots, 1, ids
                ),
                "Normalise the projected vectors too, so the values are cosines in "
                "[-1, 1].": torch.gather(projected @ F.normalize(table, dim=-1).T, 1, ids),
            },
            "similarities[n, j] = cos(projected[n], token_embeddings[token_ids[n, j]]).",
        ),
    )
    if abs(float(got_values[0, 0]) - 1.0) > 1e-4 or int(got_ids[0, 0]) != 2:
        raise GradingFailure(
            "projected[0] is 3 x the embedding of token 2: token 2 should come first with "
            "similarity 1.0."
        )
