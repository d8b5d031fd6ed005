"""Low-rank linear algebra for merging: truncating a product of factors, factoring a dense matrix, and measuring how
far a factorization is from the matrix it stands for.

The factorizations return balanced factors ``(b, a)`` with ``b @ a`` the approximation (the singular values are
split as square roots on both sides, so neither factor carries all the scale).
"""

from __future__ import annotations

import torch

# Below this many rows or columns a dense SVD costs well under a second, so it is used exactly.
EXACT_SVD_LIMIT = 256
# Randomized SVD (Halko, Martinsson & Tropp 2011, alg. 4.4): extra sketch columns and subspace iterations. Each
# iteration costs two passes over the matrix; on TIES/DARE merges of rank-16 LoRAs (a flat spectrum) one iteration
# comes within 1% of the optimal rank-16 error (0.823 against 0.817), none 10% above it, two within 0.2% at 1.5×
# the time. The error actually reached is measured anyway (residual_norm).
OVERSAMPLE = 10
POWER_ITERATIONS = 1
# Entries per block of rows (here and in merge.py's pruning strategies): 1 MiB of float32, small enough to stay in
# cache between elementwise steps (measured fastest of 64 Ki, 256 Ki and 1 Mi), so no d×k product is formed whole.
BLOCK_ELEMENTS = 1 << 18


def truncate_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``rank`` approximation of ``b @ a`` (b: d×R, a: R×k), computed from the factors.

    QR of b and of aᵀ reduce the problem to the SVD of a small core (at most R×R), so the cost is
    O((d+k)·R² + R³) and the d×k product is never formed. The result is the Eckart–Young optimum, the same as a
    dense SVD of ``b @ a`` truncated to ``rank``. A rank above the product's own rank keeps the product's rank.
    Returns ``(b', a', error², norm²)``: ‖b·a − b'·a'‖²_F and ‖b·a‖²_F, from the core's singular values (exact
    in exact arithmetic: the product's singular values are the core's).
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    energy = s.double().square()
    b_out, a_out = _split(q_b @ u[:, :rank], s[:rank], vh[:rank] @ q_a.T)
    return b_out, a_out, energy[rank:].sum().item(), energy.sum().item()


def factor_dense(matrix: torch.Tensor, rank: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``rank`` factorization of a dense d×k matrix: exact truncated SVD when the matrix is small or the rank
    is a large share of it, otherwise a randomized SVD (Halko et al. 2011, alg. 4.4: a Gaussian range finder with
    ``POWER_ITERATIONS`` re-orthonormalized subspace iterations) whose sketch is drawn from ``generator``, so the
    result is reproducible given its seed, at O(d·k·rank) cost instead of a full SVD's O(d·k·min(d, k)).
    The randomized result is near, not at, the optimum: measure it with ``residual_norm``.
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


def residual_norm(matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """``(‖matrix − b·a‖²_F, ‖matrix‖²_F)`` measured entry by entry, a block of rows at a time so that b·a is never
    formed whole. matrix: d×k, b: d×r, a: r×k, all of one floating dtype."""
    step = max(1, BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    error = norm = 0.0
    for start in range(0, matrix.shape[0], step):
        block = matrix[start:start + step]
        # Each block's sum in the working dtype (a quarter million terms), the sum of the blocks in float64.
        norm += torch.linalg.vector_norm(block).item() ** 2
        error += torch.linalg.vector_norm(torch.addmm(block, b[start:start + step], a, alpha=-1)).item() ** 2
    return error, norm


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.sqrt()
    return u * root, root[:, None] * vh
