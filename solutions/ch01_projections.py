"""Chapter 1 reference solutions: projections. Same names and signatures as exercises/."""

import torch
from torch import Tensor


def project_onto_vector(v: Tensor, u: Tensor) -> Tensor:
    """Project v onto the line spanned by u: (v·u / u·u) u."""
    return (v @ u) / (u @ u) * u


def projection_matrix(A: Tensor) -> Tensor:
    """P = A (AᵀA)⁻¹ Aᵀ, computed with a solve instead of an inverse."""
    return A @ torch.linalg.solve(A.T @ A, A.T)


def projection_properties(P: Tensor, atol: float = 1e-5) -> dict[str, bool]:
    """{"idempotent": P @ P ≈ P, "symmetric": P ≈ Pᵀ}."""
    return {
        "idempotent": bool(torch.allclose(P @ P, P, atol=atol)),
        "symmetric": bool(torch.allclose(P, P.T, atol=atol)),
    }


def least_squares(A: Tensor, b: Tensor) -> Tensor:
    """Solve the normal equations (AᵀA) x = Aᵀ b."""
    return torch.linalg.solve(A.T @ A, A.T @ b)


def fit_linear_map(X: Tensor, Y: Tensor) -> Tensor:
    """Solve (XᵀX) W = Xᵀ Y: one least-squares problem per column of Y."""
    return torch.linalg.solve(X.T @ X, X.T @ Y)


def gram_schmidt(A: Tensor, tol: float = 1e-5) -> Tensor:
    """Q (m, k) with orthonormal columns, q_j · a_j > 0: subtract projections, then normalise."""
    qs = []
    for j in range(A.shape[1]):
        a = A[:, j]
        remainder = a
        for q in qs:
            # q has length 1, so its projection is one dot product times q. Projecting the
            # current remainder (not a) gives the same result in exact arithmetic and loses
            # less orthogonality to rounding ("modified" Gram-Schmidt).
            remainder = remainder - (remainder @ q) * q
        length = remainder.norm()
        if length <= tol * a.norm():
            raise ValueError(
                f"column {j} of A depends on the columns before it: its remainder after the "
                f"projections has length {length.item():.3g}, against {a.norm().item():.3g} "
                "for the column itself"
            )
        qs.append(remainder / length)
    if not qs:
        return A.new_zeros(A.shape[0], 0)
    return torch.stack(qs, dim=1)
