"""minillava.projector: the projectors the model uses, and chapter 1's linear algebra."""

import pytest
import torch
from matplotlib.figure import Figure

from minillava.projector import (
    LinearProjector,
    MLPProjector,
    build_projector,
    fit_linear_map,
    least_squares,
    plot_learned_map,
    plot_plane_projection,
    plot_vector_projection,
    project_onto_vector,
    projection_matrix,
    projection_properties,
)


def test_build_projector_shapes_and_names():
    x = torch.randn(2, 16, 32)  # (B, P, vision_dim)
    linear = build_projector("linear", 32, 48)
    assert isinstance(linear, LinearProjector) and linear(x).shape == (2, 16, 48)
    assert set(linear.state_dict()) == {"linear.weight", "linear.bias"}
    mlp = build_projector("mlp2x_gelu", 32, 48)
    assert isinstance(mlp, MLPProjector) and mlp(x).shape == (2, 16, 48)
    assert set(mlp.state_dict()) == {
        "linear_1.weight",
        "linear_1.bias",
        "linear_2.weight",
        "linear_2.bias",
    }
    assert isinstance(mlp.act, torch.nn.GELU) and mlp.act.approximate == "none"
    with pytest.raises(ValueError, match="kind='conv'.*linear.*mlp2x_gelu"):
        build_projector("conv", 32, 48)
    with pytest.raises(ValueError, match="vision_dim"):
        build_projector("linear", 0, 48)


@pytest.mark.slow  # importing transformers takes seconds
def test_mlp_projector_matches_transformers():
    import transformers  # a dev dependency: installed by `make test`
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, num_attention_heads=4),
        text_config=transformers.LlamaConfig(hidden_size=48, num_attention_heads=4),
    )
    theirs = LlavaMultiModalProjector(config)
    ours = build_projector("mlp2x_gelu", 32, 48)
    ours.load_state_dict(theirs.state_dict())  # same names, same shapes
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_course_example_and_projection_facts():
    p = project_onto_vector(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(p, torch.tensor([2.0, 0.0]))
    v, u = torch.randn(3, 5), torch.randn(5)  # a batch of v, one u
    p = project_onto_vector(v, u)
    torch.testing.assert_close((v - p) @ u, torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="non-zero"):
        project_onto_vector(torch.ones(2), torch.zeros(2))

    A = torch.randn(6, 2, dtype=torch.float64)
    P = projection_matrix(A)
    assert projection_properties(P) == {"idempotent": True, "symmetric": True}
    torch.testing.assert_close(P @ A, A)
    oblique = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert projection_properties(oblique) == {"idempotent": True, "symmetric": False}


def test_least_squares_and_fit_linear_map_match_lstsq():
    A, b = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    x = least_squares(A, b)
    torch.testing.assert_close(x, torch.linalg.lstsq(A, b[:, None]).solution[:, 0])
    torch.testing.assert_close(projection_matrix(A) @ b, A @ x)  # A x̂ is b's projection
    X, Y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    W = fit_linear_map(X, Y)
    assert W.shape == (3, 5)
    torch.testing.assert_close(W, torch.linalg.lstsq(X, Y).solution)
    with pytest.raises(ValueError, match="Y has 39 rows, expected 40"):
        fit_linear_map(X, Y[:39])
    with pytest.raises(ValueError, match=r"b must have shape \(8,\)"):
        least_squares(A, b[:5])


def test_gradient_descent_finds_the_least_squares_map():
    """A linear projector trained by gradient descent converges to fit_linear_map's W."""
    torch.manual_seed(0)
    X = torch.randn(64, 4)
    Y = X @ torch.randn(4, 3) + 0.05 * torch.randn(64, 3)
    proj = torch.nn.Linear(4, 3, bias=False)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        ((proj(X) - Y) ** 2).mean().backward()
        opt.step()
    torch.testing.assert_close(proj.weight.T.detach(), fit_linear_map(X, Y), atol=2e-3, rtol=0)


def test_plots_return_figures():
    assert isinstance(
        plot_vector_projection(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0])), Figure
    )
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2]])
    assert isinstance(plot_plane_projection(torch.tensor([0.5, 1.0, 2.0]), A), Figure)
    X = torch.randn(20, 2)
    W = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    fig = plot_learned_map(X, X @ W, W, labels=torch.arange(20) % 3)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    with pytest.raises(ValueError, match="A \\(3, 2\\)"):
        plot_plane_projection(torch.ones(3), torch.ones(3, 3))
