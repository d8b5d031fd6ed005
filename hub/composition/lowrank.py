"""Low-rank linear algebra for merging: truncating a product of factors, factoring a dense matrix, and measuring how
far a factorization is from the matrix it stands for.

The factorizations return balanced factors ``(b, a)`` with ``b @ a`` the approximation (the singular values are
split as square roots on both sides, so neither factor carries all the scale).
"""

from __future__ import annotations

import torch

# Below this many rows or columns a dense SVD costs well under a second, so it is used exactly.
EXACT_SVD_LIMIT = 256
# Randomized range finder (Halko, Martinsson & Tropp 2011): extra directions kept beyond the rank.
OVERSAMPLE = 10
# ‖M‖² − Σ kept σ² below this share of ‖M‖² is mostly float32 rounding: the error is then measured entry by entry.
CANCELLATION = 1e-4
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


def range_test_matrix(row_factors: torch.Tensor, shape: tuple[int, int], rank: int, *,
                      generator: torch.Generator) -> torch.Tensor | None:
    """The test matrix Ω (k×s, orthonormal columns) of a randomized range finder (Halko, Martinsson & Tropp 2011,
    alg. 4.1) for a d×k matrix ``shape`` whose leading right singular vectors lie mostly in the row space of
    ``row_factors`` (R×k), as a merge of low-rank deltas does: that row space plus ``rank + OVERSAMPLE`` Gaussian
    directions drawn from ``generator``. A test matrix that spans more only lowers the range finder's error, so the
    Gaussian part keeps alg. 4.1's guarantee, and the row space brings it to the optimum in practice (TIES/DARE of
    4 × r16 LoRAs at rank 16: within 0.01% of the truncated SVD's error, where a Gaussian sketch with one power
    iteration, twice the passes, is 0.9% above it).
    Returns None where factor_dense should take the exact SVD: at most EXACT_SVD_LIMIT rows or columns, or a test
    matrix at least half as wide as the matrix."""
    rows, cols = shape
    width = row_factors.shape[0] + rank + OVERSAMPLE
    if min(rows, cols) <= EXACT_SVD_LIMIT or 2 * width >= min(rows, cols):
        return None
    gaussian = torch.randn(cols, rank + OVERSAMPLE, generator=generator, dtype=row_factors.dtype)
    omega, _ = torch.linalg.qr(torch.cat([row_factors.T, gaussian], dim=1))
    return omega


def factor_dense(matrix: torch.Tensor, rank: int, *,
                 sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A rank-``rank`` factorization of a dense d×k matrix M and its error: ``(b, a, error², norm²)`` with
    error² = ‖M − b·a‖²_F and norm² = ‖M‖²_F.

    ``sample``: M·Ω (d×s) for Ω from range_test_matrix, which the caller computes while it forms M, a block of rows
    at a time; None for the exact truncated SVD (small matrices). With a sample, Q holds the leading
    ``rank + OVERSAMPLE`` left singular vectors of M·Ω, and the factors are the truncated SVD of QᵀM (one pass over
    M, a block of rows at a time, which also sums ‖M‖²): O(d·k·(rank + OVERSAMPLE)) instead of a full SVD's
    O(d·k·min(d, k)). b·a is then the orthogonal projection of M on a rank-``rank`` space, so error² is
    ‖M‖² − Σ kept σ²; where that difference is under CANCELLATION·‖M‖², so that rounding would dominate it, the
    error is measured entry by entry instead (residual_norm).
    """
    if sample is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        energy = s.double().square()
        b, a = _split(u[:, :rank], s[:rank], vh[:rank])
        return b, a, energy[rank:].sum().item(), energy.sum().item()
    u, _, _ = torch.linalg.svd(sample, full_matrices=False)
    basis = u[:, :rank + OVERSAMPLE]
    step = max(1, BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    core = torch.zeros(basis.shape[1], matrix.shape[1], dtype=matrix.dtype)
    norm = 0.0
    for start in range(0, matrix.shape[0], step):
        block = matrix[start:start + step]
        core.addmm_(basis[start:start + step].T, block)
        norm += torch.linalg.vector_norm(block).item() ** 2
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    b, a = _split(basis @ u[:, :rank], s[:rank], vh[:rank])
    error = max(norm - s[:rank].double().square().sum().item(), 0.0)
    if error < CANCELLATION * norm:
        error = residual_norm(matrix, b, a)[0]
    return b, a, error, norm


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
