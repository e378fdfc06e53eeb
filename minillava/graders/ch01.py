"""Chapter 1 graders: projections (exercises/ch01_projections.py).

Every check calls the learner's function on fixed and random inputs and compares the result
with the library (minillava.projector), then tests a property that any right answer has.
"""

import torch

from minillava import projector as ref
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

TITLE = "Projections"
MODULE = "ch01_projections"


@grader("project_onto_vector", points=2)
def check_project_onto_vector(project_onto_vector):
    """v = [2, 3] onto u = [4, 0], then random vectors; the result must not depend on |u|."""
    v, u = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.0])
    step("projecting v = [2, 3] onto u = [4, 0]")
    got = project_onto_vector(v, u)
    assert_close(
        got,
        torch.tensor([2.0, 0.0]),
        "project_onto_vector([2, 3], [4, 0])",
        hint=diagnose(
            got,
            {
                "It looks like you forgot to divide by u·u: p = (v·u) / (u·u) * u.": (v @ u) * u,
                "Divide by u·u = |u|², not by |u|: p = (v·u) / (u·u) * u.": (v @ u) / u.norm() * u,
                "You projected u onto v: the result must lie on the line through u.": (v @ u)
                / (v @ v)
                * v,
            },
            "The projection is p = (v·u) / (u·u) * u: the shadow of v on the line through u.",
        ),
        why_shape="the projection has as many entries as v",
    )
    for n in (3, 5):
        v, u = torch.randn(n), torch.randn(n)
        step(f"projecting a random v of shape ({n},) onto a random u")
        got = assert_close(
            project_onto_vector(v, u),
            ref.project_onto_vector(v, u),
            f"project_onto_vector(v, u) for random v, u of length {n}",
            hint="Use dot products of the whole vectors: v @ u and u @ u.",
        )
        residual = v - got
        if abs(float(residual @ u)) > 1e-4 * float(u.norm() * v.norm() + 1):
            raise GradingFailure("The residual v - p should be perpendicular to u.")
    step("projecting onto 10 u instead of u")
    v, u = torch.randn(4), torch.randn(4)
    assert_close(
        project_onto_vector(v, 10 * u),
        ref.project_onto_vector(v, u),
        "project_onto_vector(v, 10 * u)",
        hint="Projecting onto 10 u must give the same point as onto u (same line); "
        "dividing by u·u cancels u's length.",
    )


@grader("projection_matrix", points=2)
def check_projection_matrix(projection_matrix):
    """P for a random 5 x 2 A against A (AᵀA)⁻¹Aᵀ; P A = A; with one column, P v = projection."""
    A = torch.randn(5, 2)
    step("calling projection_matrix(A) with A of shape (5, 2)")
    P = projection_matrix(A)
    assert_close(
        P,
        ref.projection_matrix(A),
        "projection_matrix(A) for a random A of shape (5, 2)",
        why_shape="P multiplies vectors of length m = 5 (A is m x k = 5 x 2), so P is m x m",
        hint=diagnose(
            P,
            {
                "A @ A.T is a projection only when A's columns are orthonormal; include the "
                "(AᵀA)⁻¹ in the middle: P = A (AᵀA)⁻¹ Aᵀ.": A @ A.T,
            },
            "P = A (AᵀA)⁻¹ Aᵀ: in torch, A @ torch.linalg.solve(A.T @ A, A.T).",
        ),
    )
    step("checking P @ A == A")
    assert_close(
        P @ A,
        A,
        "P @ A (vectors already in the column space must not move)",
        hint="P = A (AᵀA)⁻¹ Aᵀ maps every column of A to itself.",
    )
    a, v = torch.randn(4, 1), torch.randn(4)
    step("calling projection_matrix(a) with a single column a of shape (4, 1)")
    assert_close(
        projection_matrix(a) @ v,
        ref.project_onto_vector(v, a[:, 0]),
        "projection_matrix(a) @ v for a one-column a (should equal projecting v onto a)",
        why_shape="A of shape (4, 1) gives a 4 x 4 P",
    )


def _as_properties(result, what: str) -> dict[str, bool]:
    if not isinstance(result, dict) or set(result) != {"idempotent", "symmetric"}:
        got = type(result).__name__ if not isinstance(result, dict) else sorted(result)
        raise GradingFailure(
            f'{what} should return a dict with exactly the keys "idempotent" and "symmetric", '
            f"got {got}."
        )
    try:
        return {key: bool(value) for key, value in result.items()}
    except (RuntimeError, TypeError) as exc:
        raise GradingFailure(
            f"{what}: each value must be a single True/False ({exc}). "
            "torch.allclose returns one bool for the whole matrix."
        ) from None


@grader("projection_properties", points=2)
def check_projection_properties(projection_properties):
    """Orthogonal, oblique, symmetric-but-not-idempotent and random matrices, and tolerance."""
    A, C = torch.randn(4, 2), torch.randn(4, 2)
    orthogonal = ref.projection_matrix(A)
    oblique = A @ torch.linalg.solve(C.T @ A, C.T)  # P² = P, but P ≠ Pᵀ
    S = torch.randn(4, 4)
    cases = [
        ("an orthogonal projection P = A (AᵀA)⁻¹ Aᵀ", orthogonal, 1e-5, True, True),
        ("an oblique projection A (CᵀA)⁻¹ Cᵀ", oblique, 1e-5, True, False),
        ("2 P (symmetric, but (2P)² = 4P ≠ 2P)", 2 * orthogonal, 1e-5, False, True),
        ("S + Sᵀ for a random S", S + S.T, 1e-5, False, True),
        ("a random matrix", S, 1e-5, False, False),
        ("the identity", torch.eye(3), 1e-5, True, True),
        ("P plus rounding noise of 1e-7", orthogonal + 1e-7 * torch.randn(4, 4), 1e-5, True, True),
        (
            "P plus noise of 1e-3, with atol=1e-5",
            orthogonal + 1e-3 * torch.randn(4, 4),
            1e-5,
            False,
            False,
        ),
        (
            "P plus noise of 1e-3, with atol=1e-2",
            orthogonal + 1e-3 * torch.randn(4, 4),
            1e-2,
            True,
            True,
        ),
    ]
    for description, P, atol, idempotent, symmetric in cases:
        step(f"calling projection_properties on {description}")
        got = _as_properties(projection_properties(P, atol=atol), "projection_properties(P)")
        expected = {"idempotent": idempotent, "symmetric": symmetric}
        if got != expected:
            key = "idempotent" if got["idempotent"] != idempotent else "symmetric"
            definition = {
                "idempotent": "Idempotent means P @ P ≈ P (not P @ P ≈ I)",
                "symmetric": "Symmetric means P ≈ P.T",
            }[key]
            if "atol=1e-2" in description:
                hint = f"{definition}; compare with the atol argument you were given."
            elif expected[key]:
                hint = (
                    f"{definition}, compared with a tolerance: torch.allclose(a, b, atol=atol). "
                    "Floating-point results differ by rounding errors, so == is too strict."
                )
            else:
                hint = f"{definition}, and here it is not."
            raise GradingFailure(
                f"For {description}, {key} should be {expected[key]}, got {got[key]}.\n"
                f"  P = {fmt(P, precision=3, indent=6)}",
                hint,
            )


SOLVE = "Solve the normal equations (AᵀA) x = Aᵀ b with torch.linalg.solve."
RHS_ONLY = "Aᵀ b is only the right-hand side: solve (AᵀA) x = Aᵀ b for x."


@grader("least_squares", points=2)
def check_least_squares(least_squares):
    """Random 6 x 3 systems against torch.linalg.lstsq; an exact system is solved exactly."""
    A, x_true = torch.randn(6, 3), torch.randn(3)
    b = A @ x_true
    step("calling least_squares(A, b) with A (6, 3) and b = A @ x (6,) an exact system")
    x = least_squares(A, b)
    assert_close(
        x,
        x_true,
        "least_squares(A, A @ x) (b is exactly reachable, so x itself is the answer)",
        why_shape="x has one coefficient per column of A (A is 6 x 3)",
        hint=diagnose(x, {RHS_ONLY: A.T @ b}, SOLVE),
    )
    A, b = torch.randn(6, 3), torch.randn(6)
    step("calling least_squares(A, b) with A (6, 3) and a random b (6,)")
    x = least_squares(A, b)
    expected = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    x = assert_shape(x, (3,), "least_squares(A, b)", why="one coefficient per column of A (6 x 3)")
    residual_dot_columns = A.T @ (b - A @ x.to(A.dtype))
    assert_close(
        x,
        expected,
        "least_squares(A, b) for a random b",
        hint=diagnose(
            x,
            {RHS_ONLY: A.T @ b},
            "At the best x the residual r = b - A x is perpendicular to every column of A, "
            f"so Aᵀ r should be 0; with your x it is {fmt(residual_dot_columns)}.",
        ),
    )


@grader("fit_linear_map", points=2)
def check_fit_linear_map(fit_linear_map):
    """Recover a known W from exact data; match lstsq on noisy data; the gradient there is 0."""
    X, W_true = torch.randn(20, 3), torch.randn(3, 4)
    why = "W takes a d_in = 3 vector to a d_out = 4 vector, so X (20, 3) @ W has Y's shape (20, 4)"
    step("fitting W to X (20, 3) and Y = X @ W_true (20, 4)")
    W = fit_linear_map(X, X @ W_true)
    assert_close(
        W,
        W_true,
        "fit_linear_map(X, X @ W_true) (exact data: W_true itself is the answer)",
        why_shape=why,
        hint=diagnose(
            W,
            {},
            "Solve (XᵀX) W = Xᵀ Y with torch.linalg.solve.",
        ),
    )
    Y = X @ W_true + 0.1 * torch.randn(20, 4)
    step("fitting W to noisy Y (20, 4)")
    W = assert_shape(fit_linear_map(X, Y), (3, 4), "fit_linear_map(X, Y)", why=why)
    W = assert_tensor(W, "fit_linear_map(X, Y)").detach().to(X.dtype).requires_grad_(True)
    loss = ((X @ W - Y) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, W)
    assert_close(
        W,
        ref.fit_linear_map(X, Y),
        "fit_linear_map(X, Y) for noisy Y",
        hint="At the best W the gradient of ||XW - Y||² is zero; at yours its largest entry is "
        f"{grad.abs().max().item():.3g}. Solve (XᵀX) W = Xᵀ Y.",
    )
