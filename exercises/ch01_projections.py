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
    # Hint: PyTorch's matrix product, applied to two 1-D tensors, is their dot product.
    raise NotImplementedError("project_onto_vector: your code here (chapter 1)")


def projection_matrix(A: Tensor) -> Tensor:
    """The (m, m) matrix P = A (AᵀA)⁻¹ Aᵀ that projects onto the span of A's columns.

    A: (m, k) with k <= m independent columns. For any v of length m, P v is the point of
    the column space closest to v.

    Use torch.linalg.solve (given a matrix M and a right-hand side B, it computes M⁻¹ B) rather
    than torch.linalg.inv: it is cheaper and more accurate.
    """
    raise NotImplementedError("projection_matrix: your code here (chapter 1)")


def projection_properties(P: Tensor, atol: float = 1e-5) -> dict[str, bool]:
    """Test the two properties of an orthogonal projection matrix P (m, m).

    Returns {"idempotent": bool, "symmetric": bool}:
      idempotent: P P equals P (projecting a second time changes nothing),
      symmetric:  P equals its transpose Pᵀ.
    Compare up to the absolute tolerance `atol` (floating-point results are never exact):
    torch.allclose does that, given the tolerance as its own atol argument.
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


def gram_schmidt(A: Tensor, tol: float = 1e-5) -> Tensor:
    """Stretch exercise: an orthonormal basis of A's column space, built by Gram-Schmidt.

    A: (m, k) with k <= m. Returns Q (m, k) whose columns q_0, ..., q_{k-1} have length 1, are
    perpendicular to each other, and such that q_0 .. q_j span the same space as A's first
    j + 1 columns. Build it column by column with section 2's idea: from column a_j subtract
    its projections onto q_0 .. q_{j-1}; what remains is perpendicular to all of them; divide
    it by its length to get q_j. (Each q has length 1, so q·q = 1 and its projection needs no
    division.) A loop over the columns is expected here.

    Convention, so that the answer is unique: q_j · a_j > 0 (in QR terms, R has a positive
    diagonal). The construction above gives it by itself; torch.linalg.qr does not promise it.

    Dependent columns: when the remainder of a_j is not longer than tol times |a_j| (a zero
    column, a combination of earlier columns, more columns than rows), a_j adds no new
    direction and there is no q_j. Raise a ValueError that names the column by its index,
    counting from 0, e.g. "column 2 of A depends on the columns before it". Compare with
    |a_j|, not with a fixed number: in float32 the remainder of a dependent column is rounding
    noise of about 1e-7 |a_j|, never exactly 0, and multiplying A by 1000 must not change the
    verdict.

    Why: with orthonormal columns (QᵀQ = I) section 3's projection needs no inverse,
    P = A (AᵀA)⁻¹ Aᵀ = Q Qᵀ, and least squares becomes a triangular solve, R x̂ = Qᵀ b with
    R = QᵀA. This is the QR factorisation that torch.linalg.qr and torch.linalg.lstsq compute
    (with Householder reflections, which stay orthogonal in floating point where Gram-Schmidt
    slowly drifts), and torch.nn.init.orthogonal_ uses it to start weight matrices orthonormal.

    Example: A = [[3., 3.], [4., 4.], [0., 2.]] -> Q = [[0.6, 0.], [0.8, 0.], [0., 1.]]
    """
    raise NotImplementedError("gram_schmidt: your code here (chapter 1, stretch)")
