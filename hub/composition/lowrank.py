"""Low-rank linear algebra for merging: truncating a product of factors, and factoring a dense matrix.

Both return balanced factors ``(b, a)`` with ``b @ a`` the approximation (the singular values are split as square
roots on both sides, so neither factor carries all the scale).
"""

from __future__ import annotations

import torch

# Below this many rows or columns a dense SVD costs well under a second, so it is used exactly.
EXACT_SVD_LIMIT = 1024
# Randomized SVD (Halko, Martinsson & Tropp 2011, alg. 4.4): extra sketch columns and subspace iterations.
OVERSAMPLE = 10
POWER_ITERATIONS = 4


def truncate_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``b @ a`` (b: d×R, a: R×k), computed from the factors.

    QR of b and of aᵀ reduce the problem to the SVD of a small core (at most R×R), so the cost is
    O((d+k)·R² + R³) and the d×k product is never formed. The result is the Eckart–Young optimum, the same as a
    dense SVD of ``b @ a`` truncated to ``rank``. A rank above the product's own rank keeps the product's rank.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return _split(q_b @ u[:, :rank], s[:rank], vh[:rank] @ q_a.T)


def factor_dense(matrix: torch.Tensor, rank: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``rank`` factorization of a dense d×k matrix: exact truncated SVD when the matrix is small or the rank
    is a large share of it, otherwise a randomized SVD whose sketch is drawn from ``generator`` (so the result is
    reproducible given its seed) at O(d·k·rank) cost instead of a full SVD's O(d·k·min(d, k)).
    """
    rows, cols = matrix.shape
    sketch = rank + max(OVERSAMPLE, rank)
    if min(rows, cols) <= EXACT_SVD_LIMIT or 2 * sketch >= min(rows, cols):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return _split(u[:, :rank], s[:rank], vh[:rank])
    omega = torch.randn(cols, sketch, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(POWER_ITERATIONS):
        # Re-orthonormalizing at every step keeps the small singular directions from being lost to rounding.
        co_basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ co_basis)
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return _split(basis @ u[:, :rank], s[:rank], vh[:rank])


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.sqrt()
    return u * root, root[:, None] * vh
