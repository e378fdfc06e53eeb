"""The Bridge: a learned map from the vision encoder's space into the language model's space.

The ViT describes each image patch with a vector of `vision_dim` numbers; the decoder reads
token embeddings of `text_dim` numbers. LLaVA connects the two with a *projector*: one linear
map W (LLaVA-1) or a small 2-layer MLP with a GELU in between (LLaVA-1.5), trained so that a
patch's feature lands where the language model can read it, like a word it already knows.

Chapter 1 builds the idea from the ground up, and its linear algebra lives here too:

    project_onto_vector(v, u)   the point on the line through u closest to v
    projection_matrix(A)        P = A (AᵀA)⁻¹ Aᵀ: projects onto the column space of A
    least_squares(A, b)         x minimising ||Ax - b||: Ax is the projection of b
    fit_linear_map(X, Y)        W minimising ||XW - Y||: the best linear projector, in closed form

A trained projector is `fit_linear_map` done by gradient descent, on features that came from a
real ViT, with a non-linearity added when one matrix is not enough.

With `minillava train --parts exercises` your chapter 7 linear_projector or mlp_projector runs in
the model's projector instead of the library's layers (minillava/parts.py).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from minillava import parts

# ---------------------------------------------------------------------------------------------
# The projectors used by the model
# ---------------------------------------------------------------------------------------------


class LinearProjector(nn.Module):
    """LLaVA-1's projector: one matrix (and a bias), (..., vision_dim) -> (..., text_dim)."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)

    def forward(self, image_features: Tensor) -> Tensor:
        yours = parts.get("linear_projector")  # a learner's, if chosen (parts.py)
        if yours is not None:
            return yours(image_features, self.linear.weight, self.linear.bias)
        return self.linear(image_features)


class MLPProjector(nn.Module):
    """LLaVA-1.5's "mlp2x_gelu": Linear -> GELU -> Linear, (..., vision_dim) -> (..., text_dim).

    The names `linear_1`, `act`, `linear_2` are those of transformers' LlavaMultiModalProjector,
    so trained weights load there unchanged. The non-linearity lets the projector bend the
    vision space instead of only rotating and stretching it.
    """

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as transformers' "gelu"
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, image_features: Tensor) -> Tensor:
        yours = parts.get("mlp_projector")  # a learner's, if chosen (parts.py)
        if yours is not None:
            first, second = self.linear_1, self.linear_2
            return yours(image_features, first.weight, first.bias, second.weight, second.bias)
        return self.linear_2(self.act(self.linear_1(image_features)))


PROJECTORS = OrderedDict(linear=LinearProjector, mlp2x_gelu=MLPProjector)


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """ "linear" -> LinearProjector, "mlp2x_gelu" -> MLPProjector, both vision_dim -> text_dim."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector kind={kind!r} not known, expected one of {list(PROJECTORS)}")
    for name, value in (("vision_dim", vision_dim), ("text_dim", text_dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return PROJECTORS[kind](vision_dim, text_dim)


# ---------------------------------------------------------------------------------------------
# Chapter 1: the linear algebra of projections
# ---------------------------------------------------------------------------------------------


def _check_matrix(name: str, M: Tensor, rows: int | None = None) -> None:
    if not isinstance(M, Tensor) or M.dim() != 2:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"{name} must be a 2-D tensor (rows, columns), got {shape}")
    if rows is not None and M.shape[0] != rows:
        raise ValueError(f"{name} has {M.shape[0]} rows, expected {rows} (one per row of A / X)")


def project_onto_vector(v: Tensor, u: Tensor) -> Tensor:
    """The projection of v onto the line spanned by u: (v·u / u·u) u.

    v, u: (n,), or batches (..., n) that broadcast. v·u / u·u is how many "u"s fit in v's
    shadow on the line; dividing by u·u (not |u|) makes the answer independent of u's length.
    Example: v = [2, 3], u = [4, 0] -> [2, 0].
    """
    if v.shape[-1] != u.shape[-1]:
        raise ValueError(f"v {tuple(v.shape)} and u {tuple(u.shape)}: last dimensions differ")
    uu = (u * u).sum(-1, keepdim=True)
    if (uu == 0).any():
        raise ValueError("u must be non-zero: the zero vector spans no line to project onto")
    return (v * u).sum(-1, keepdim=True) / uu * u


def projection_matrix(A: Tensor) -> Tensor:
    """P = A (AᵀA)⁻¹ Aᵀ, the (m, m) matrix projecting onto the span of A's columns.

    A: (m, k) with independent columns. P v is the point of the column space closest to v.
    We solve (AᵀA) X = Aᵀ instead of forming the inverse: same answer, fewer rounding errors.
    """
    _check_matrix("A", A)
    return A @ torch.linalg.solve(A.T @ A, A.T)


def least_squares(A: Tensor, b: Tensor) -> Tensor:
    """x (k,) minimising ||A x - b||² for A (m, k), b (m,): the normal equations AᵀA x = Aᵀb.

    Why: A x̂ must be the projection of b onto the column space, so the residual b - A x̂ is
    orthogonal to every column: Aᵀ(b - A x̂) = 0. (`torch.linalg.lstsq` uses a QR factorisation,
    more accurate when the columns are nearly dependent.)
    """
    _check_matrix("A", A)
    if b.shape != (A.shape[0],):
        raise ValueError(f"b must have shape ({A.shape[0]},) to match A {tuple(A.shape)}")
    return torch.linalg.solve(A.T @ A, A.T @ b)


def fit_linear_map(X: Tensor, Y: Tensor) -> Tensor:
    """W (d_in, d_out) minimising ||X W - Y||² for X (N, d_in), Y (N, d_out).

    Each column of Y is its own least-squares problem with the same A = X, so all of them are
    solved at once: (XᵀX) W = XᵀY. Add a column of ones to X to fit a bias too.
    """
    _check_matrix("X", X)
    _check_matrix("Y", Y, rows=X.shape[0])
    return torch.linalg.solve(X.T @ X, X.T @ Y)


def is_idempotent(P: Tensor, atol: float = 1e-5) -> bool:
    """P @ P == P (up to atol): projecting twice changes nothing."""
    return bool(torch.allclose(P @ P, P, atol=atol))


def is_symmetric(P: Tensor, atol: float = 1e-5) -> bool:
    """P == Pᵀ (up to atol): true of *orthogonal* projections, false of oblique ones."""
    return bool(torch.allclose(P, P.T, atol=atol))


def projection_properties(P: Tensor, atol: float = 1e-5) -> dict[str, bool]:
    """{"idempotent": P @ P ≈ P, "symmetric": P ≈ Pᵀ}: an orthogonal projection is both."""
    _check_matrix("P", P)
    return {"idempotent": is_idempotent(P, atol), "symmetric": is_symmetric(P, atol)}


# ---------------------------------------------------------------------------------------------
# Plots (each returns a matplotlib Figure; in a notebook it displays inline)
# ---------------------------------------------------------------------------------------------


def _arrow(ax, start, end, colour, label, **kwargs):
    ax.annotate(
        "", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=colour, lw=2, **kwargs)
    )
    ax.plot([], [], color=colour, lw=2, label=label)  # legend entry for the arrow


def plot_vector_projection(v: Tensor, u: Tensor) -> Figure:
    """v, u and the projection of v onto u in 2-D, with the right angle that defines it."""
    v, u = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(u, dtype=torch.float32)
    p = project_onto_vector(v, u)
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    origin = (0.0, 0.0)
    _arrow(ax, origin, u.tolist(), "tab:blue", f"u = {u.tolist()}")
    _arrow(ax, origin, v.tolist(), "tab:orange", f"v = {v.tolist()}")
    _arrow(ax, origin, p.tolist(), "tab:green", f"projection = {[round(x, 3) for x in p.tolist()]}")
    ax.plot([v[0], p[0]], [v[1], p[1]], "k--", lw=1, label="residual v - p (perpendicular to u)")
    points = torch.stack([torch.zeros(2), u, v, p])
    lo, hi = points.min(0).values - 0.7, points.max(0).values + 0.7
    ax.set_xlim(lo[0].item(), hi[0].item())
    ax.set_ylim(lo[1].item(), hi[1].item())
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Projecting v onto u")
    return fig


def plot_plane_projection(v: Tensor, A: Tensor) -> Figure:
    """A vector v in 3-D, the plane spanned by A's two columns, and v's projection onto it."""
    v, A = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(A, dtype=torch.float32)
    if A.shape != (3, 2) or v.shape != (3,):
        raise ValueError(f"expected v (3,) and A (3, 2), got {tuple(v.shape)} and {tuple(A.shape)}")
    p = projection_matrix(A) @ v
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    s, t = np.meshgrid(np.linspace(-1.6, 1.6, 10), np.linspace(-1.6, 1.6, 10))
    a1, a2 = A[:, 0].numpy(), A[:, 1].numpy()
    plane = s[..., None] * a1 + t[..., None] * a2  # (10, 10, 3): points s a1 + t a2
    ax.plot_surface(plane[..., 0], plane[..., 1], plane[..., 2], alpha=0.2, color="tab:blue")
    for vec, colour, label in (
        (a1, "tab:blue", "columns of A"),
        (a2, "tab:blue", None),
        (v.numpy(), "tab:orange", "v"),
        (p.numpy(), "tab:green", "P v (projection)"),
    ):
        ax.quiver(0, 0, 0, *vec, color=colour, lw=2, arrow_length_ratio=0.1, label=label)
    ax.plot(
        *zip(v.tolist(), p.tolist(), strict=True),
        "k--",
        lw=1,
        label="residual (perpendicular to the plane)",
    )
    span = torch.cat([torch.zeros(1, 3), v[None], p[None], A.T]).abs().max().item() + 0.3
    for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        set_lim(-span, span)
    ax.set_box_aspect((1, 1, 1))  # equal scales, so the right angle looks like one
    ax.view_init(elev=25, azim=-55)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("z")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Projecting v onto a plane")
    return fig


def plot_learned_map(X: Tensor, Y: Tensor, W: Tensor, labels: Tensor | None = None) -> Figure:
    """Left: points X in one space. Right: their targets Y and where X W puts them.

    X (N, 2) and Y (N, 2): two 2-D "embedding spaces" so both can be drawn. Lines join each
    prediction to its target: short lines mean W maps one space onto the other well.
    """
    X, Y, W = (torch.as_tensor(t, dtype=torch.float32) for t in (X, Y, W))
    if X.shape[-1] != 2 or Y.shape[-1] != 2 or W.shape != (2, 2):
        raise ValueError("plot_learned_map draws 2-D spaces: X (N, 2), Y (N, 2), W (2, 2)")
    pred = X @ W
    colours = labels.numpy() if labels is not None else np.arange(len(X))
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    left.scatter(X[:, 0], X[:, 1], c=colours, cmap="tab10", s=25)
    left.set_title("space A (say, image features)")
    right.scatter(
        Y[:, 0],
        Y[:, 1],
        c=colours,
        cmap="tab10",
        s=90,
        edgecolors="black",
        zorder=3,
        label="target Y",
    )
    right.scatter(
        pred[:, 0], pred[:, 1], c=colours, cmap="tab10", s=25, marker="x", label="X W (mapped)"
    )
    for target, guess in zip(Y.tolist(), pred.tolist(), strict=True):
        right.plot([target[0], guess[0]], [target[1], guess[1]], color="grey", lw=0.5)
    right.set_title("space B (say, word embeddings)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    return fig
