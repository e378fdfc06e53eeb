"""Chapter 1 graders: projections (exercises/ch01_projections.py).

Every check calls the learner's function on fixed and random inputs and compares the result
with the library (minillava.projector), then tests a property that any right answer has.
"""

import re

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
    shape_str,
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
        diagnosis=diagnose(
            got,
            {
                "It looks like you forgot to divide by u·u: your point is (u·u) times too far "
                "along u.": (v @ u) * u,
                "It looks like you divided by |u| rather than by u·u (|u| squared): your point "
                "is |u| times too far along u.": (v @ u) / u.norm() * u,
                "You projected u onto v: the result must lie on the line through u.": (v @ u)
                / (v @ v)
                * v,
            },
        ),
        hint="The projection is the shadow of v on the line through u: how far along u (one "
        "dot product, scaled by u's squared length), times u.",
        why_shape="the projection has as many entries as v",
    )
    for n in (3, 5):
        v, u = torch.randn(n), torch.randn(n)
        step(f"projecting a random v of shape ({n},) onto a random u")
        got = assert_close(
            project_onto_vector(v, u),
            ref.project_onto_vector(v, u),
            f"project_onto_vector(v, u) for random v, u of length {n}",
            hint="Use dot products of the whole vectors, whatever their length: v with u, and u "
            "with itself.",
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
        diagnosis=diagnose(
            P,
            {
                "Your P is A Aᵀ, which is a projection only when A's columns are orthonormal: "
                "the columns' lengths and angles must be undone in the middle.": A @ A.T,
            },
        ),
        hint="The projection matrix is the vector formula grown up: A, then the inverse of the "
        "k x k Gram matrix AᵀA, then Aᵀ. Solving a linear system is steadier than inverting.",
    )
    step("checking P @ A == A")
    assert_close(
        P @ A,
        A,
        "P @ A (vectors already in the column space must not move)",
        hint="A projection onto the column space leaves every column of A where it is.",
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
                "idempotent": "Idempotent means P times P is P again (not the identity)",
                "symmetric": "Symmetric means P equals its transpose",
            }[key]
            if "atol=1e-2" in description:
                hint = f"{definition}; compare with the atol argument you were given."
            elif expected[key]:
                hint = (
                    f"{definition}, up to a tolerance: floating-point results differ by "
                    "rounding errors, so an exact comparison is too strict."
                )
            else:
                hint = f"{definition}, and here it is not."
            pair = {"idempotent": ("P P", P @ P), "symmetric": ("Pᵀ", P.T)}[key]
            gap = (pair[1] - P).abs().max().item()
            within = "within" if gap <= atol else "more than"
            raise GradingFailure(
                f"For {description}, {key} should be {expected[key]}, got {got[key]}.\n"
                f"  P = {fmt(P, precision=3, indent=6)}\n"
                f"Here {pair[0]} and P differ by at most {gap:.2g}, {within} atol = {atol:g}.",
                hint,
            )


SOLVE = (
    "The best x makes the residual perpendicular to every column of A: the normal equations. "
    "Solve that k x k system rather than inverting a matrix."
)
RHS_ONLY = "Your x is Aᵀ b, which is only the right-hand side of the normal equations."


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
        diagnosis=diagnose(x, {RHS_ONLY: A.T @ b}),
        hint=SOLVE,
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
        diagnosis=diagnose(x, {RHS_ONLY: A.T @ b})
        or "At the best x the residual b - A x is perpendicular to every column of A, so "
        f"Aᵀ (b - A x) should be 0; with your x it is {fmt(residual_dot_columns)}.",
        hint=SOLVE,
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
        hint="This is least squares once per output column, all at once: the same normal "
        "equations with a matrix Y on the right.",
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
        diagnosis="At the best W the gradient of the squared error is zero; at yours its largest "
        f"entry is {grad.abs().max().item():.3g}.",
        hint="The same normal equations as least_squares, with a matrix Y on the right.",
    )


# --- gram_schmidt (stretch) -------------------------------------------------------------------

NOT_NORMALISED = (
    "Your columns point the right way and are perpendicular to each other, but each keeps the "
    "length of its remainder: it looks like the remainders were never divided by their length."
)
ORIGINAL_COLUMNS = (
    "It looks like you subtracted projections onto A's own columns rather than onto the q's "
    "found so far: A's columns are not perpendicular to each other, so removing their shadows "
    "one by one removes some directions twice, and from the third column on the remainder is "
    "not perpendicular to the earlier q's."
)
NORMALISED_FIRST = (
    "Your columns are perpendicular, but only the first has length 1: it looks like you "
    "normalised each column before subtracting the projections. Subtracting shortens a vector, "
    "so its length is only known once the projections are gone."
)
GS_HINT = (
    "Take A's columns in order. From each, remove its shadow on every q found so far (a q has "
    "length 1, so a shadow needs no division), then scale what remains to length 1."
)


def _qr_positive(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.qr's Q and R (in float64), signs fixed so that R has a positive diagonal."""
    Q, R = torch.linalg.qr(A.double())
    signs = torch.sign(R.diagonal())
    return Q * signs, R * signs[:, None]


def _from_original_columns(A: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt done wrong: each column minus its projections onto A's earlier columns."""
    A = A.double()
    columns = []
    for j in range(A.shape[1]):
        remainder = A[:, j].clone()
        for i in range(j):
            remainder = remainder - ref.project_onto_vector(A[:, j], A[:, i])
        columns.append(remainder / remainder.norm())
    return torch.stack(columns, dim=1)


def _gs_diagnosis(Q, A: torch.Tensor) -> str | None:
    """The mistake: a known wrong version first, else the property of a right Q that Q lacks."""
    expected, R = _qr_positive(A)
    found = diagnose(
        Q,
        {
            NOT_NORMALISED: expected * R.diagonal(),
            ORIGINAL_COLUMNS: _from_original_columns(A),
            NORMALISED_FIRST: expected * R.diagonal() / A.double().norm(dim=0),
        },
    )
    if found or not isinstance(Q, torch.Tensor) or Q.shape != expected.shape:
        return found
    Q = Q.detach().double()
    if not torch.isfinite(Q).all():
        return None  # assert_close says where the NaN is, and where it usually comes from
    lengths = Q.norm(dim=0)
    if not torch.allclose(lengths, torch.ones_like(lengths), atol=1e-4):
        return f"Your columns have lengths {fmt(lengths)}; each must have length 1."
    off_diagonal = (Q.T @ Q - torch.eye(Q.shape[1], dtype=Q.dtype)).abs()
    if off_diagonal.max() > 1e-4:
        i, j = divmod(int(off_diagonal.argmax()), Q.shape[1])
        return (
            f"Your columns {min(i, j)} and {max(i, j)} are not perpendicular: their dot product "
            f"is {(Q[:, i] @ Q[:, j]).item():.3g}, and it must be 0."
        )
    if torch.allclose(Q.abs(), expected.abs(), atol=1e-4):
        flipped = [j for j in range(Q.shape[1]) if (Q[:, j] @ A[:, j].double()) < 0]
        return (
            f"Your columns are right up to sign, but column {flipped[0] if flipped else 0} "
            "points away from the column of A it comes from: the convention is that each q "
            "has a positive dot product with its column of A (R has a positive diagonal)."
        )
    if not torch.allclose(Q @ Q.T, expected @ expected.T, atol=1e-4):
        return (
            "Your columns are orthonormal, but they span another space than A's columns: "
            "every q must be built from A's columns."
        )
    return (
        "Your columns are orthonormal and span A's column space, but they are not the ones "
        "Gram-Schmidt builds: q_0 must point along A's first column, and each q_j must lie in "
        "the span of A's first j + 1 columns, so take the columns in order."
    )


def _gram_schmidt_call(gram_schmidt, A: torch.Tensor, what: str, why: str = "") -> torch.Tensor:
    """The learner's Q for an A with independent columns (a ValueError there is explained)."""
    try:
        return gram_schmidt(A)
    except ValueError as exc:
        raise GradingFailure(
            f"{what} raised ValueError({str(exc)!r}), but A's columns are independent.{why}",
            "Compare each remainder's length with the length of its own column of A, not with "
            "a fixed number: multiplying A by any non-zero number changes neither the "
            "dependence nor the answer.",
        ) from None


@grader("gram_schmidt", points=3)
def check_gram_schmidt(gram_schmidt):
    """Stretch: Q against QR's (R's diagonal positive), Q Qᵀ = P, scaled A, dependent columns.

    A fixed (3, 2) A and a random (6, 4) A against torch.linalg.qr, Q Qᵀ against the projection
    matrix, A scaled by 1000 and by 1e-6 (same Q), and a ValueError naming the column for a
    combination of earlier columns (also scaled by 1000), a zero column and too many columns.
    """
    A = torch.tensor([[3.0, 3.0], [4.0, 4.0], [0.0, 2.0]])
    step("calling gram_schmidt(A) with A = [[3, 3], [4, 4], [0, 2]]")
    Q = _gram_schmidt_call(gram_schmidt, A, "gram_schmidt([[3, 3], [4, 4], [0, 2]])")
    assert_close(
        Q,
        torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.0, 1.0]]),
        "gram_schmidt([[3, 3], [4, 4], [0, 2]]) (q_0 is [3, 4, 0] over its length 5; the second "
        "column minus its shadow on q_0 is [0, 0, 2])",
        why_shape="Q has A's shape (m, k) = (3, 2): one orthonormal column per column of A",
        diagnosis=_gs_diagnosis(Q, A),
        hint=GS_HINT,
    )
    A = torch.randn(6, 4)
    expected, _ = _qr_positive(A)
    step("calling gram_schmidt(A) with a random A of shape (6, 4)")
    Q = _gram_schmidt_call(gram_schmidt, A, "gram_schmidt(A) for a random A (6, 4)")
    Q = assert_close(
        Q,
        expected,
        "gram_schmidt(A) for a random A (6, 4), against torch.linalg.qr's Q with R's diagonal "
        "made positive",
        why_shape="Q has A's shape (m, k) = (6, 4): one orthonormal column per column of A",
        diagnosis=_gs_diagnosis(Q, A),
        hint=GS_HINT,
    )
    step("comparing Q Qᵀ with the projection matrix A (AᵀA)⁻¹ Aᵀ")
    assert_close(
        Q @ Q.T,
        ref.projection_matrix(A.double()),
        "Q Qᵀ (with orthonormal columns, the projection onto A's column space)",
        hint="Q's columns must span the same space as A's and be orthonormal.",
    )
    short = (
        " Its columns are only a million times shorter than A's: it looks like a remainder was "
        "compared with a fixed length, which mistakes short columns for dependent ones."
    )
    for scale, why in (
        (1000.0, " Scaling A changes neither its column space nor Q."),
        (1e-6, short),
    ):
        step(f"calling gram_schmidt on {scale:g} times the same A")
        what = f"gram_schmidt({scale:g} A)"
        assert_close(
            _gram_schmidt_call(gram_schmidt, scale * A, what, why),
            expected,
            f"{what} (scaling A changes neither its column space nor the directions of its "
            "columns, so Q is the same)",
            hint=GS_HINT,
        )
    base = torch.randn(5, 4)
    dependent = base.clone()
    dependent[:, 2] = base[:, 0] + 2 * base[:, 1]
    zero = base[:, :3].clone()
    zero[:, 1] = 0.0
    cases = [
        (dependent, 2, "column 2 equal to column 0 plus twice column 1"),
        (1000 * dependent, 2, "1000 times that A (column 2 still depends on columns 0 and 1)"),
        (zero, 1, "column 1 all zeros"),
        (torch.randn(3, 4), 3, "4 columns of length 3: at most 3 can be independent"),
    ]
    for A, column, description in cases:
        what = f"gram_schmidt(A) for A {shape_str(A.shape)} with {description}"
        step(f"calling {what}")
        try:
            Q = gram_schmidt(A)
        except ValueError as exc:
            if not re.search(rf"\b{column}\b", str(exc)):
                raise GradingFailure(
                    f"{what} raised ValueError({str(exc)!r}), which does not name column {column}.",
                    "Name the column whose remainder vanished by its index, counting from 0 as "
                    "Python does.",
                ) from None
            continue
        nan = " with NaN in it" if isinstance(Q, torch.Tensor) and Q.isnan().any() else ""
        raise GradingFailure(
            f"{what} should raise a ValueError naming column {column}, and it returned a "
            f"result{nan}. Column {column} adds no new direction: its remainder after the "
            "projections is zero or rounding noise, and dividing by that length gives NaN or "
            "blows the noise up into a meaningless unit vector.",
            "Before dividing a remainder by its length, compare that length with the length "
            "of the column it came from, times the tolerance; not longer means dependent.",
        )
