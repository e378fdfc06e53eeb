"""Chapter 1: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.projector) agrees with solutions/ch01_projections.py, so the course
text, the notebook and the reference cannot drift apart.
"""

import pytest
import torch

from minillava import projector
from solutions import ch01_projections as solution

# --- project_onto_vector --------------------------------------------------------------------


def no_division(v, u):
    return (v @ u) * u


def divides_by_norm(v, u):
    return (v @ u) / u.norm() * u


def onto_v_instead(v, u):
    return (v @ u) / (v @ v) * v


def keeps_dim(v, u):
    return ((v @ u) / (u @ u) * u)[None, :]  # (1, n): an extra dimension


def returns_list(v, u):
    return ((v @ u) / (u @ u) * u).tolist()


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_division, ["divide by u·u", "expected [2., 0.]", "got      [32.,  0.]"]),
        (divides_by_norm, ["divided by |u| rather than by u·u"]),
        (onto_v_instead, ["projected u onto v"]),
        (keeps_dim, ["shape (1, 2), expected (2,)", "dimensions of size 1"]),
        (returns_list, ["returned a list, expected a torch.Tensor"]),
    ],
)
def test_project_onto_vector_rejects(rejects, wrong, mentions):
    rejects("ch01.project_onto_vector", wrong, mentions=mentions)


# --- projection_matrix ----------------------------------------------------------------------


def forgets_inverse(A):
    return A @ A.T


def transposed_formula(A):
    return A.T @ torch.linalg.solve(A @ A.T + torch.eye(A.shape[0]), A)  # (k, k)


def test_projection_matrix_rejects(rejects):
    rejects(
        "ch01.projection_matrix",
        forgets_inverse,
        mentions=["Your P is A Aᵀ", "orthonormal"],
        hint_mentions=["inverse of the k x k Gram matrix AᵀA"],
    )
    rejects(
        "ch01.projection_matrix",
        transposed_formula,
        mentions=["shape (2, 2), expected (5, 5)", "m x m"],
    )


# --- projection_properties ------------------------------------------------------------------


def exact_comparison(P, atol=1e-5):
    return {"idempotent": torch.equal(P @ P, P), "symmetric": torch.equal(P, P.T)}


def idempotent_means_identity(P, atol=1e-5):
    eye = torch.eye(P.shape[0])
    return {
        "idempotent": torch.allclose(P @ P, eye, atol=atol),
        "symmetric": torch.allclose(P, P.T, atol=atol),
    }


def ignores_atol(P, atol=1e-5):
    return {
        "idempotent": torch.allclose(P @ P, P, atol=1e-5),
        "symmetric": torch.allclose(P, P.T, atol=1e-5),
    }


def returns_tuple(P, atol=1e-5):
    return torch.allclose(P @ P, P, atol=atol), torch.allclose(P, P.T, atol=atol)


def elementwise(P, atol=1e-5):
    return {"idempotent": torch.isclose(P @ P, P, atol=atol), "symmetric": P == P.T}


def test_projection_properties_rejects(rejects):
    rejects(
        "ch01.projection_properties",
        exact_comparison,
        mentions=["should be True, got False", "within atol = 1e-05"],
        hint_mentions=["up to a tolerance", "exact comparison is too strict"],
    )
    rejects(
        "ch01.projection_properties",
        idempotent_means_identity,
        mentions=["idempotent should be True", "within atol"],
        hint_mentions=["P times P is P again (not the identity)"],
    )
    rejects(
        "ch01.projection_properties",
        ignores_atol,
        mentions=["atol=1e-2", "within atol = 0.01"],
        hint_mentions=["atol argument"],
    )
    rejects("ch01.projection_properties", returns_tuple, mentions=["dict", "got tuple"])
    rejects("ch01.projection_properties", elementwise, mentions=["single True/False"])


# --- least_squares --------------------------------------------------------------------------


def only_right_hand_side(A, b):
    return A.T @ b


def wrong_system(A, b):
    return torch.linalg.solve(A.T @ A, b)  # b has m entries, AᵀA is k x k: a shape error


def test_least_squares_rejects(rejects):
    rejects(
        "ch01.least_squares",
        only_right_hand_side,
        mentions=["Your x is Aᵀ b", "right-hand side of the normal equations"],
        hint_mentions=["perpendicular to every column of A"],
    )
    result = rejects("ch01.least_squares", wrong_system, mentions=["Your code raised"])
    # The learner's own line is quoted, with its file.
    assert "return torch.linalg.solve(A.T @ A, b)" in result.message
    assert "test_ch01.py" in result.message and "in wrong_system" in result.message


# --- fit_linear_map -------------------------------------------------------------------------


def transposed_map(X, Y):
    return torch.linalg.solve(X.T @ X, X.T @ Y).T


def fits_y_to_x(X, Y):
    return torch.linalg.lstsq(Y, X).solution  # the map from Y back to X: (d_out, d_in)


def one_gradient_step(X, Y):
    W = torch.zeros(X.shape[1], Y.shape[1])
    return W - 0.01 * 2 * X.T @ (X @ W - Y)


def test_fit_linear_map_rejects(rejects):
    rejects(
        "ch01.fit_linear_map",
        transposed_map,
        mentions=["shape (4, 3), expected (3, 4)", "transposed", "d_in = 3"],
    )
    rejects("ch01.fit_linear_map", fits_y_to_x, mentions=["expected (3, 4)"])
    rejects(
        "ch01.fit_linear_map",
        one_gradient_step,
        mentions=["is wrong", "W_true itself is the answer"],
        hint_mentions=["least squares once per output column"],
    )


def test_noisy_fit_reports_the_gradient(rejects):
    def exact_only(X, Y):  # right on exact data, then a slightly shrunk answer
        W = torch.linalg.solve(X.T @ X, X.T @ Y)
        return W if torch.allclose(X @ W, Y, atol=1e-4) else 0.9 * W

    rejects(
        "ch01.fit_linear_map",
        exact_only,
        mentions=["gradient of the squared error is zero", "at yours its largest entry"],
        hint_mentions=["normal equations"],
    )


# --- the library agrees with the solutions --------------------------------------------------


def test_library_agrees_with_solutions():
    torch.manual_seed(0)
    v, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(
        projector.project_onto_vector(v, u), solution.project_onto_vector(v, u)
    )
    A, b = torch.randn(7, 3), torch.randn(7)
    torch.testing.assert_close(projector.projection_matrix(A), solution.projection_matrix(A))
    torch.testing.assert_close(projector.least_squares(A, b), solution.least_squares(A, b))
    X, Y = torch.randn(30, 4), torch.randn(30, 6)
    torch.testing.assert_close(projector.fit_linear_map(X, Y), solution.fit_linear_map(X, Y))
    for P in (projector.projection_matrix(A), torch.randn(4, 4), 2 * torch.eye(3)):
        assert projector.projection_properties(P) == solution.projection_properties(P)


# --- gram_schmidt (stretch) -------------------------------------------------------------------


def _columns(A):
    return [A[:, j] for j in range(A.shape[1])]


def gs_not_normalised(A, tol=1e-5):
    remainders = []
    for j, a in enumerate(_columns(A)):
        r = a
        for p in remainders:
            r = r - (a @ p) / (p @ p) * p
        if r.norm() <= tol * a.norm():
            raise ValueError(f"column {j} depends on the columns before it")
        remainders.append(r)  # perpendicular to the others, but never divided by its length
    return torch.stack(remainders, dim=1)


def gs_original_columns(A, tol=1e-5):
    qs = []
    for j, a in enumerate(_columns(A)):
        r = a
        for i in range(j):  # projections onto A's columns, not onto the q's
            r = r - (a @ A[:, i]) / (A[:, i] @ A[:, i]) * A[:, i]
        if r.norm() <= tol * a.norm():
            raise ValueError(f"column {j} depends on the columns before it")
        qs.append(r / r.norm())
    return torch.stack(qs, dim=1)


def gs_normalised_first(A, tol=1e-5):
    qs = []
    for j, a in enumerate(_columns(A)):
        r = a / a.norm()  # length 1 now, shorter after the subtractions
        for q in qs:
            r = r - (r @ q) * q
        if r.norm() <= tol:
            raise ValueError(f"column {j} depends on the columns before it")
        qs.append(r)
    return torch.stack(qs, dim=1)


def gs_never_raises(A, tol=1e-5):
    qs = []
    for a in _columns(A):
        r = a
        for q in qs:
            r = r - (r @ q) * q
        qs.append(r / r.norm())  # rounding noise blown up to length 1
    return torch.stack(qs, dim=1)


def gs_fixed_threshold(A, tol=1e-5):
    qs = []
    for j, a in enumerate(_columns(A)):
        r = a
        for q in qs:
            r = r - (r @ q) * q
        if r.norm() <= tol:  # not relative to the column's length
            raise ValueError(f"column {j} depends on the columns before it")
        qs.append(r / r.norm())
    return torch.stack(qs, dim=1)


def gs_counts_from_one(A, tol=1e-5):
    for j in range(A.shape[1]):
        try:
            solution.gram_schmidt(A[:, : j + 1], tol)
        except ValueError:
            raise ValueError(f"column {j + 1} depends on the columns before it") from None
    return solution.gram_schmidt(A, tol)


def gs_library_qr(A, tol=1e-5):
    return torch.linalg.qr(A).Q  # the right space, signs as LAPACK leaves them


@pytest.mark.parametrize(
    "wrong, mentions, hint_mentions",
    [
        (
            gs_not_normalised,
            ["[[3., 0.]", "never divided by their length"],
            ["scale what remains to length 1"],
        ),
        (
            gs_original_columns,
            ["random A (6, 4)", "onto A's own columns rather than onto the q's"],
            ["every q found so far"],
        ),
        (
            gs_normalised_first,
            ["only the first has length 1", "normalised each column before subtracting"],
            ["scale what remains"],
        ),
        (
            gs_never_raises,
            ["should raise a ValueError naming column 2", "rounding noise"],
            ["compare that length with the length of the column"],
        ),
        (
            gs_fixed_threshold,
            ["gram_schmidt(1e-06 A) raised ValueError", "compared with a fixed length"],
            ["not with a fixed number"],
        ),
        (gs_counts_from_one, ["which does not name column 2"], ["counting from 0"]),
        (gs_library_qr, ["right up to sign", "positive dot product"], []),
    ],
    ids=[
        "not_normalised",
        "original_columns",
        "normalised_first",
        "never_raises",
        "fixed_threshold",
        "counts_from_one",
        "library_qr",
    ],
)
def test_gram_schmidt_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch01.gram_schmidt", wrong, mentions=mentions, hint_mentions=hint_mentions)


def test_gram_schmidt_agrees_with_the_projection_matrix_and_qr():
    """Q Qᵀ is the library's projection matrix, and Q is QR's Q with R's diagonal positive."""
    torch.manual_seed(0)
    A = torch.randn(7, 3, dtype=torch.float64)
    Q = solution.gram_schmidt(A)
    torch.testing.assert_close(Q @ Q.T, projector.projection_matrix(A))
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    Q_qr, R = torch.linalg.qr(A)
    torch.testing.assert_close(Q, Q_qr * torch.sign(R.diagonal()))
    A[:, 2] = A[:, 0] - A[:, 1]
    with pytest.raises(ValueError, match="column 2"):
        solution.gram_schmidt(A)
