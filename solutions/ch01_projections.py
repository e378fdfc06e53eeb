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
