"""Chapter 1 exercises: projections, from one vector to a learned map between two spaces.

Fill in each function, replacing the `raise NotImplementedError(...)` line, then grade:

    minillava grade ch01            (or `make grade CH=01`, or check(fn) in the notebook)

Use torch operations only (no loops over elements needed). The notebook
notebooks/01_projections.ipynb explains each idea before you write it.
"""

import torch  # noqa: F401 - you will need it
from torch import Tensor


def project_onto_vector(v: Tensor, u: Tensor) -> Tensor:
    """Project v onto the line spanned by u.

    v, u: (n,) float tensors, u non-zero. Returns (n,): the point p = c u on the line that is
    closest to v. The residual v - p is perpendicular to u, which gives c = (v·u) / (u·u).

    Example: v = [2., 3.], u = [4., 0.] -> [2., 0.]
    """
    # Hint: `v @ u` is the dot product of two 1-D tensors.
    raise NotImplementedError("project_onto_vector: your code here (chapter 1)")


def projection_matrix(A: Tensor) -> Tensor:
    """The (m, m) matrix P = A (AᵀA)⁻¹ Aᵀ that projects onto the span of A's columns.

    A: (m, k) with k <= m independent columns. For any v of length m, P @ v is the point of
    the column space closest to v.

    Use torch.linalg.solve(M, B) (which computes M⁻¹ B) rather than torch.linalg.inv:
    it is cheaper and more accurate.
    """
    raise NotImplementedError("projection_matrix: your code here (chapter 1)")


def projection_properties(P: Tensor, atol: float = 1e-5) -> dict[str, bool]:
    """Test the two properties of an orthogonal projection matrix P (m, m).

    Returns {"idempotent": bool, "symmetric": bool}:
      idempotent: P @ P equals P (projecting a second time changes nothing),
      symmetric:  P equals its transpose P.T.
    Compare up to the absolute tolerance `atol` (floating-point results are never exact):
    torch.allclose(a, b, atol=atol) does that.
    """
    raise NotImplementedError("projection_properties: your code here (chapter 1)")


def least_squares(A: Tensor, b: Tensor) -> Tensor:
    """The x (k,) that minimises ||A x - b||² for A (m, k) and b (m,), m >= k.

    A x̂ is the projection of b onto the column space of A, so the residual b - A x̂ is
    perpendicular to every column of A: Aᵀ (b - A x̂) = 0. Solve these "normal equations"
    (AᵀA) x̂ = Aᵀ b with torch.linalg.solve.
    """
    raise NotImplementedError("least_squares: your code here (chapter 1)")


def fit_linear_map(X: Tensor, Y: Tensor) -> Tensor:
    """The matrix W (d_in, d_out) that minimises ||X W - Y||² for X (N, d_in), Y (N, d_out).

    Row i of X is a point in one space (say an image feature), row i of Y is where it should
    land in the other (say a word embedding). Each column of Y is a least-squares problem with
    the same matrix X, so you can solve them all at once: (XᵀX) W = Xᵀ Y.
    """
    raise NotImplementedError("fit_linear_map: your code here (chapter 1)")
