"""Weighted sums of adapters into one new adapter: the ``merge`` composition.

Low-rank methods (LoRA, rsLoRA, AdaLoRA, LoHa, LoKr, in any mix) are first rewritten exactly as factor pairs per
module, ΔW = B·A with the adapter's scaling folded into A:

- LoRA: B = lora_B, A = s·lora_A with s = α/r (α/√r for rsLoRA), per module through rank_pattern/alpha_pattern;
- AdaLoRA: B = lora_B, A = s·(lora_A ⊙ lora_E) with s = α/(init_r + 1e-5), as PEFT computes it (see
  hub.methods.adalora), at the rank each module kept;
- LoHa: ΔW = s·(W1a·W1b) ⊙ (W2a·W2b) = s·B·A with B's rows the Kronecker products of W1a's and W2a's rows and A's
  columns those of W1b's and W2b's columns (rank r1·r2, no dense matrix);
- LoKr: ΔW = s·kron(W1, W2) = s·kron(U1, U2)·kron(V1, V2) for any factorizations W = U·V (rank rank1·rank2).

Then, per module (a module present in only some adapters gets only their deltas):

- ``exact``: the true Σ wᵢ ΔWᵢ by concatenation (rank Σ rᵢ; never above min(d, k), where it is reduced losslessly);
- ``svd``: the optimal rank-``rank`` truncation of that sum, from the factors (QR + small SVD, see lowrank.py);
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's merge_utils semantics (TIES: Yadav et al.
  2023; DARE: Yu et al. 2024) applied to the true deltas ΔWᵢ, not to their factors as PEFT's add_weighted_adapter
  does (pruning is elementwise, so it depends on the factorization there). Modules are merged on
  torch.get_num_threads() threads at once, each module on one thread (the result does not depend on the count),
  and each a block of rows at a time: the inputs' dense deltas exist one block at a time, the merged d×k delta is
  the only whole dense matrix (one per thread, in a buffer reused from module to module). Magnitude pruning keeps
  each delta's int(density·d·k) largest |entries| (all those tied with the threshold), the threshold selected
  exactly in O(d·k); DARE keeps each entry with probability ``density`` from its own seeded stream per module and
  input (see _dare_prune), so a seed reproduces the merge whatever the order or blocks. The merged delta is then
  factored back at ``rank`` by a randomized range finder whose test matrix spans the inputs' row spaces (the rows
  of their A factors) plus seeded Gaussian directions (lowrank.range_test_matrix; its sample is taken block by
  block as the delta is formed), then one more pass for the small SVD (lowrank.factor_dense), and the error
  reached is reported (MergeResult.truncation): within 0.1% of the truncated SVD's in the tests.

The result is a plain PEFT LoRA whose scaling is exactly 1 in every module (lora_alpha = r, with rank_pattern and
alpha_pattern for modules of another rank), targeting exactly the modules in its tensors. IA3 vectors and prompt
embeddings of identical layout are summed directly. Everything else is refused with a suggestion to stack.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from hub.composition.lowrank import BLOCK_ELEMENTS, factor_dense, range_test_matrix, truncate_product
from hub.errors import Incompatible
from hub.formats import Adapter, adapter_digest, validate
from hub.formats.peft import KEY_PREFIX
from hub.methods import all_methods
from hub.methods.base import PEFT_DEFAULT_R, Term, common_dtype, common_value

STRATEGIES = ("exact", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_STRATEGIES = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
SIGN_ELECTING = frozenset({"ties", "dare_ties"})
MAJORITY_SIGNS = ("total", "frequency")
# PEFT saves an adapted embedding's base layer beside its factors (save_embedding_layers, for resized vocabularies).
BASE_COPY = ".base_layer."
# Entries sampled (at most) to bracket a magnitude threshold: the bracket holds about 10/√(sample) of the entries.
THRESHOLD_SAMPLE = 1 << 16

_T = TypeVar("_T")
# Held while a merge has set torch's process-wide thread count to 1 (_map_modules).
_THREAD_COUNT = threading.Lock()


@dataclass(frozen=True)
class MergeResult:
    """A merged adapter and the recipe that reproduces it (for lineage).

    ``recipe`` holds ``strategy``, ``weights``, ``rank``, ``density``, ``majority_sign``, ``seed`` (None where the
    strategy does not use them) and ``parents``: the inputs' digests in the order the weights refer to.

    ``truncation`` (``svd`` and the pruning strategies; None for ``exact`` and non-low-rank merges, which are
    exact): per module path, the relative Frobenius error ‖ΔW − B·A‖_F / ‖ΔW‖_F of the stored factors B·A against
    the merge's delta ΔW at working precision (float32 or wider, before casting to the inputs' dtype); 0 for an
    all-zero ΔW. For the pruning strategies it is ‖ΔW‖² less the energy the factors keep (they project ΔW
    orthogonally), or measured entry by entry against the dense merged delta where that difference is too small to
    trust in float32 (lowrank.factor_dense); for ``svd`` it comes from the singular values of the exact sum.
    ``truncation_error``: the same over all modules together, √(Σ‖ΔW − B·A‖²_F / Σ‖ΔW‖²_F).
    """

    adapter: Adapter
    recipe: dict[str, Any]
    truncation: dict[str, float] | None = None
    truncation_error: float | None = None


def merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    strategy: str = "exact",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
) -> MergeResult:
    """Merge ``adapters`` into one new adapter computing Σ weights[i] · adapters[i] (see the module docstring).

    ``rank``: the output rank for ``svd`` (default: the largest input rank) and the pruning strategies (default:
    per module, the sum of the input ranks there); a cap, never padded. ``density`` (required by the pruning
    strategies, in (0, 1]): the fraction of each delta's entries kept. ``majority_sign`` ("total" or "frequency"):
    how ties/dare_ties elect each entry's sign. ``seed`` makes DARE's random pruning and the range finder of
    large dense modules reproducible. Whether the adapters share a base is the caller's check.

    Returns the adapter, its recipe and, for ``svd`` and the pruning strategies, the relative Frobenius error of
    its factors per module and overall (MergeResult.truncation, .truncation_error). Memory: the inputs' factors
    plus, for the pruning strategies, per thread (torch.get_num_threads(), see the module docstring) one module's
    dense merged delta (d×k in float32: 180 MB at 4096×11008), its sample for the range finder (d×(Σ input ranks
    + rank + 10)) and one block of each input's delta (2¹⁸ entries each: 4 MiB for 4 inputs). The inputs' whole
    deltas are never held: ties and magnitude_prune form each block twice (first to select the exact threshold)
    rather than keep inputs×d×k (720 MB per thread at 11008×4096 with 4 inputs), since rereading them from memory
    costs about what the rank-r product costs. Time at 7B shapes (224 modules, 4 rank-16 inputs, rank 16): 4.5-6
    CPU-s per layer of 7 modules for ties, 4-5.5 for dare_ties (150-200 CPU-s in all, spread over the threads: 3.3 s
    a layer on 2 free cores; bench/bench_merge_ties.py), of which ~2 s are fixed by the results: the rank-16
    products (0.5 s a pass; ties makes two), the range finder's sample M·Ω (0.6 s) and, for DARE, the seeded SFC64
    draws (1 s).
    Raises Incompatible (one line) for bad options, mismatched layouts or methods that cannot be summed.
    """
    adapters = list(adapters)
    weight_list = _check_weights(adapters, weights)
    _check_options(strategy, rank, density, majority_sign, seed)
    # Plain Python numbers from here on, so the recipe serializes as JSON.
    rank = None if rank is None else int(rank)
    density = None if density is None else float(density)
    seed = int(seed)
    for adapter in adapters:
        validate(adapter)
    kinds = [adapter.kind for adapter in adapters]
    if all(kind.low_rank for kind in kinds):
        # svd's default rank is PEFT's, the largest input rank; each module keeps at most what it can hold.
        svd_rank = max(a.spec.rank or PEFT_DEFAULT_R for a in adapters) if strategy == "svd" and rank is None else rank
        merged, squares = _merge_low_rank(adapters, weight_list, strategy, svd_rank, density, majority_sign, seed,
                                          explicit_rank=rank is not None)
    elif len(set(kinds)) == 1 and kinds[0].summable:
        _require_plain_sum(strategy, rank, density, kinds[0].name)
        merged, squares = kinds[0].weighted_sum(adapters, weight_list), None
    else:
        methods = [adapter.method for adapter in adapters]
        low_rank = ", ".join(sorted({m.name for m in all_methods() if m.low_rank}))
        same = ", ".join(sorted({m.name for m in all_methods() if m.summable and not m.low_rank}))
        raise Incompatible(
            f"cannot merge {' + '.join(methods)}: weighted sums exist for {low_rank} together, and for {same} each"
            " with its own method; stack these adapters instead"
        )
    recipe = {
        "strategy": strategy,
        "weights": weight_list,
        "rank": rank,
        "density": density,
        "majority_sign": majority_sign if strategy in SIGN_ELECTING else None,
        "seed": seed if strategy in PRUNING_STRATEGIES else None,
        "parents": [adapter_digest(adapter) for adapter in adapters],
    }
    if squares is None:
        return MergeResult(adapter=merged, recipe=recipe)
    truncation = {path: math.sqrt(error / norm) if norm else 0.0 for path, (error, norm) in squares.items()}
    total_norm = sum(norm for _, norm in squares.values())
    overall = math.sqrt(sum(error for error, _ in squares.values()) / total_norm) if total_norm else 0.0
    return MergeResult(adapter=merged, recipe=recipe, truncation=truncation, truncation_error=overall)


# ---------------------------------------------------------------------------------------------------------------
# Validation of the call


def _check_weights(adapters: list[Adapter], weights: Sequence[float]) -> list[float]:
    if not adapters:
        raise Incompatible("nothing to merge: the list of adapters is empty")
    if len(weights) != len(adapters):
        raise Incompatible(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    values = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise Incompatible(f"weight #{index} is {weight!r}, not a number")
        if not math.isfinite(weight):
            raise Incompatible(f"weight #{index} is {weight}; weights must be finite numbers")
        values.append(float(weight))
    if not any(values):
        raise Incompatible("all weights are zero: the merge would be an empty adapter")
    return values


def _check_options(strategy: str, rank: int | None, density: float | None, majority_sign: str, seed: int) -> None:
    if strategy not in STRATEGIES:
        raise Incompatible(f"unknown merge strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise Incompatible(f"rank must be a positive integer, got {rank!r}")
        if strategy == "exact":
            raise Incompatible("strategy 'exact' keeps every module's full rank; pass rank only with svd or pruning")
    if strategy in PRUNING_STRATEGIES:
        if density is None:
            raise Incompatible(f"strategy {strategy!r} needs density, the fraction of each delta to keep, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise Incompatible(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise Incompatible(f"density applies to ties, dare_linear, dare_ties and magnitude_prune, not {strategy!r}")
    if majority_sign not in MAJORITY_SIGNS:
        raise Incompatible(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    # torch.Generator.manual_seed's range: a larger seed would overflow inside torch.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise Incompatible(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}")


def _require_plain_sum(strategy: str, rank: int | None, density: float | None, what: str) -> None:
    if strategy != "exact" or rank is not None or density is not None:
        raise Incompatible(f"{what} adapters merge only by their exact weighted sum: strategy='exact', no rank/density")


# ---------------------------------------------------------------------------------------------------------------
# Low-rank methods (LoRA, AdaLoRA, LoHa, LoKr): factor pairs from each method's merge_terms


def _merge_low_rank(adapters: list[Adapter], weights: list[float], strategy: str, rank: int | None,
                    density: float | None, majority_sign: str, seed: int, *,
                    explicit_rank: bool) -> tuple[Adapter, dict[str, tuple[float, float]] | None]:
    """The low-rank sum; a rank the user gave (``explicit_rank``) that no module can reach is refused, a default
    one is capped per module."""
    dtype = common_dtype(adapters)
    # Scalings, sums and factorizations run in at least float32, whatever the inputs' precision.
    work = torch.promote_types(dtype, torch.float32)
    by_module: dict[str, list[tuple[int, Term]]] = {}
    for index, adapter in enumerate(adapters):
        for path, term in _terms(adapter, index, work).items():
            by_module.setdefault(path, []).append((index, term))
    carried = _carried(adapters)
    for path, terms in by_module.items():
        _check_same_layout(path, terms)

    if strategy == "svd" and explicit_rank:
        reachable = max(min(sum(t.a.shape[0] for _, t in terms), *terms[0][1].shape) for terms in by_module.values())
        if rank > reachable:
            raise Incompatible(
                f"rank {rank} is larger than every module's summed rank (at most {reachable}); use strategy='exact', "
                "which is lossless"
            )
    if strategy in PRUNING_STRATEGIES and any(t.bias is not None for ts in by_module.values() for _, t in ts):
        raise Incompatible(f"adapters with lora_bias can be merged by 'exact' or 'svd', not by {strategy!r}")

    paths = sorted(by_module)
    if strategy in PRUNING_STRATEGIES:
        outcomes = _map_modules(
            lambda path, arena: _sum_pruned(path, [(i, weights[i], term) for i, term in by_module[path]], strategy,
                                            rank, density, majority_sign, seed, arena),
            paths, max(math.prod(terms[0][1].shape) for terms in by_module.values()), work)
    else:
        outcomes = [_sum_factored([(weights[i], term) for i, term in by_module[path]], strategy, rank)
                    for path in paths]
    merged: dict[str, Term] = {}
    errors: dict[str, tuple[float, float]] = {}
    for path, outcome in zip(paths, outcomes, strict=True):
        if outcome is not None:
            merged[path], *squares = outcome
            errors[path] = tuple(squares)
    if not merged:
        raise Incompatible("every adapter with a non-zero weight is empty: nothing to merge")
    merged_adapter = _lora_adapter(adapters, merged, dtype)
    merged_adapter.tensors.update(carried)
    saved = sorted({name for adapter in adapters for name in adapter.config.get("modules_to_save") or ()})
    if saved:
        merged_adapter = Adapter(config={**merged_adapter.config, "modules_to_save": saved},
                                 tensors=merged_adapter.tensors)
    return merged_adapter, (None if strategy == "exact" else errors)


def _map_modules(merge_one: Callable[[str, torch.Tensor], _T], paths: list[str], arena_size: int,
                 dtype: torch.dtype) -> list[_T]:
    """``merge_one(path, arena)`` for every path, on torch.get_num_threads() threads at once, each with its own
    arena (``arena_size`` entries of ``dtype``) and single-threaded kernels; torch and numpy release the GIL.
    Modules are independent, so whole modules in parallel use the cores fully where splitting each block's short
    kernels across threads does not (5-8× slower on 2 loaded cores), and a module's result is the same bit for bit
    whatever the number of threads (multi-threaded kernels sum in another order). torch's thread count is 1
    process-wide for the duration, then restored."""
    # One merge at a time per process: two interleaved ones would each restore the other's "1" as the count.
    with _THREAD_COUNT:
        threads = torch.get_num_threads()
        workers = max(1, min(threads, len(paths)))
        # One merged dense delta per thread at a time, in memory touched once: fresh pages cost a fault per 4 KiB,
        # a tenth of the time of the merge itself.
        arenas: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(workers):
            arenas.put(torch.empty(arena_size, dtype=dtype))

        def run(path: str) -> _T:
            arena = arenas.get()
            try:
                return merge_one(path, arena)
            finally:
                arenas.put(arena)

        torch.set_num_threads(1)
        try:
            if workers == 1:
                return [run(path) for path in paths]
            # Each new thread sets its own count too: until it does, its OpenMP kernels take OMP_NUM_THREADS threads.
            with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                return list(pool.map(run, paths))
        finally:
            torch.set_num_threads(threads)


def _carried(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """The tensors that are not deltas, kept as they are: saved base layers (they must agree) and whole modules an
    adapter replaces (modules_to_save, e.g. a retrained head). As in PEFT, at most one adapter may replace a given
    module: the sum of two heads has no meaning."""
    copies: dict[str, tuple[int, torch.Tensor]] = {}
    for index, adapter in enumerate(adapters):
        for key, tensor in adapter.tensors.items():
            if adapter.kind.split_key(key) is not None:
                continue
            if key in copies and not torch.equal(copies[key][1], tensor):
                module = key.removeprefix(KEY_PREFIX).rsplit(".", 1)[0]
                if BASE_COPY in key:
                    raise Incompatible(
                        f"adapters #{copies[key][0]} and #{index} carry different copies of base weight {key} (a "
                        "resized vocabulary?): they do not share a base"
                    )
                raise Incompatible(
                    f"adapters #{copies[key][0]} and #{index} each replace {module} with their own trained copy"
                    " (modules_to_save): a weighted sum of two such modules has no meaning; stack them, or sum"
                    " adapters where at most one carries it"
                )
            copies.setdefault(key, (index, tensor))
    return {key: tensor for key, (_, tensor) in copies.items()}


def _terms(adapter: Adapter, index: int, work: torch.dtype) -> dict[str, Term]:
    try:
        return adapter.kind.merge_terms(adapter, work)
    except Incompatible as exc:
        raise Incompatible(f"adapter #{index}: {exc}") from None


def _check_same_layout(path: str, terms: list[tuple[int, Term]]) -> None:
    first_index, first = terms[0]
    for index, term in terms[1:]:
        if term.shape != first.shape or term.embedding != first.embedding:
            raise Incompatible(
                f"module {path} is {_describe(first)} in adapter #{first_index} but {_describe(term)} in adapter "
                f"#{index}: the adapters were made for different bases"
            )


def _describe(term: Term) -> str:
    return f"{'an embedding' if term.embedding else 'a linear'} {term.shape[0]}×{term.shape[1]}"


def _sum_factored(terms: list[tuple[float, Term]], strategy: str, rank: int | None) -> tuple[Term, float, float] | None:
    live = [(weight, term) for weight, term in terms if weight != 0]
    if not live:
        return None
    first = live[0][1]
    b = torch.cat([term.b for _, term in live], dim=1)
    a = torch.cat([weight * term.a for weight, term in live], dim=0)
    full = min(first.shape)
    error = norm = 0.0  # `exact` reports no truncation
    if strategy == "svd":
        b, a, error, norm = truncate_product(b, a, min(rank, full))
    elif b.shape[1] > full:
        # A concatenation wider than the matrix itself carries redundant rank: drop it without loss.
        b, a, _, _ = truncate_product(b, a, full)
    biases = [weight * term.bias for weight, term in live if term.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return Term(b=b, a=a, bias=bias, embedding=first.embedding), error, norm


def _sum_pruned(path: str, terms: list[tuple[int, float, Term]], strategy: str, rank: int | None, density: float,
                majority_sign: str, seed: int, arena: torch.Tensor) -> tuple[Term, float, float] | None:
    """One module's TIES/DARE/magnitude merge on the true deltas ΔWᵢ = bᵢ·aᵢ, a block of rows at a time: the merged
    d×k delta (in ``arena``, reused from module to module) is the only dense matrix; the inputs' deltas exist one
    block at a time. Returns the factors at the target rank and their (error², norm²) (see factor_dense).
    ``terms``: (input position, weight, factors)."""
    if not any(weight for _, weight, _ in terms):
        return None
    first = terms[0][2]
    rows, cols = first.shape
    total = arena[:rows * cols].view(rows, cols)
    step = _block_rows(cols)
    blocks = [slice(start, start + step) for start in range(0, rows, step)]
    # The inputs' pruned blocks, one row each of a matrix (inputs × entries), so that sums over the inputs are single
    # calls (a weighted one a matrix product).
    pruned = torch.empty(len(terms), min(step, rows) * cols, dtype=total.dtype)
    if strategy in ("ties", "magnitude_prune") and density < 1:
        keep = int(density * rows * cols)
        # hardshrink keeps |x| > λ: the largest number of the working dtype below the threshold keeps exactly
        # |x| ≥ threshold (entries tied with it are all kept).
        lambdas = [float(np.nextafter(_kth_largest_abs(t.b, t.a, keep, blocks, pruned[0].view(-1, cols)), 0))
                   for *_, t in terms]
    dare = strategy.startswith("dare") and density < 1
    streams = [_dare_stream(seed, path, index) for index, _, _ in terms] if dare else []
    # DARE's 1/density rescale of the kept entries, folded into the weights: a common positive factor elects the
    # same signs.
    weights = torch.tensor([[weight / density if dare else weight for _, weight, _ in terms]], dtype=total.dtype)
    target = min(rank if rank is not None else sum(t.a.shape[0] for _, _, t in terms), rows, cols)
    omega = range_test_matrix(torch.cat([t.a for *_, t in terms]), (rows, cols), target,
                              generator=torch.Generator().manual_seed(seed))
    # The range finder's sample M·Ω, a block at a time while the block is in cache.
    sample = None if omega is None else torch.empty(rows, omega.shape[1], dtype=total.dtype)
    scratch = torch.empty(2, pruned.shape[1], dtype=total.dtype)
    for block in blocks:
        out = total[block]
        stacked = pruned[:, :out.numel()]
        views = [row.view(out.shape) for row in stacked]
        for slot, (view, (_, _, term)) in enumerate(zip(views, terms, strict=True)):
            torch.mm(term.b[block], term.a, out=view)
            if dare:
                _dare_prune(view, density, streams[slot])
            elif density < 1:
                torch.hardshrink(view, lambdas[slot], out=view)
        if strategy in SIGN_ELECTING:
            _elect_and_average(out.view(-1), stacked, weights, majority_sign, scratch[:, :out.numel()])
        else:
            torch.mm(weights, stacked, out=out.view(1, -1))
        if omega is not None:
            torch.mm(out, omega, out=sample[block])
    del pruned, scratch
    b, a, error, norm = factor_dense(total, target, sample=sample)
    return Term(b=b, a=a, bias=None, embedding=first.embedding), error, norm


def _elect_and_average(out: torch.Tensor, stacked: torch.Tensor, weights: torch.Tensor, majority_sign: str,
                       scratch: torch.Tensor) -> None:
    """PEFT's disjoint merge on one block: each entry's sign is elected on the unweighted pruned deltas (their sum,
    or the count of signs), and the weighted entries that agree with it are averaged. ``stacked``: the pruned
    deltas, inputs × entries (overwritten); ``weights``: 1 × inputs; ``out`` and each row of ``scratch`` (2 ×
    entries): one entry per column of ``stacked``."""
    elected, agreeing = scratch
    if majority_sign == "total":
        torch.sum(stacked, 0, out=out)
    else:
        out.zero_()
        for row in stacked:
            out.add_(torch.sign(row, out=agreeing))
    torch.sign(out, out=elected).add_(0.5).sign_()  # a tied vote (0) elects +1, as in PEFT
    stacked.mul_(elected).clamp_(min=0)  # |entry| where its sign is the elected one, else 0
    torch.mm(weights, stacked, out=out.view(1, -1))
    torch.sum(stacked.sign_(), 0, out=agreeing)
    torch.div(out.mul_(elected), agreeing.clamp_(min=1), out=out)


def _block_rows(cols: int) -> int:
    """Rows per block: about BLOCK_ELEMENTS entries, an even count of them so that DARE's stream (two 32-bit draws
    per 64-bit word) maps to the entries in row-major order whatever the block size."""
    rows = max(1, BLOCK_ELEMENTS // cols)
    return rows + rows % 2 if cols % 2 else rows


def _kth_largest_abs(b: torch.Tensor, a: torch.Tensor, keep: int, blocks: list[slice],
                     buffer: torch.Tensor) -> np.floating:
    """The ``keep``-th largest |entry| of b·a (b: d×r, a: r×k; keep in [0, d·k], 0 giving +inf), exactly, in O(d·k)
    time and memory for ~2% of the entries: a sample of entries brackets the value (5 standard deviations of the
    sample quantile on each side), one pass over the blocks counts the entries above the bracket and keeps those
    inside, and the value is selected among these; a bracket that misses it falls back to a selection among all
    entries. ``buffer``: room for one block, in the working dtype."""
    dtype = buffer.numpy().dtype
    if keep == 0:
        return dtype.type(np.inf)
    rows, cols = b.shape[0], a.shape[1]
    n = rows * cols
    below = (n - keep) / n  # the share of entries under the threshold
    # Gathering a sampled entry costs about what a pass costs per 64 entries: small modules take a smaller sample
    # (and a wider bracket), or sampling would cost more than the pass itself.
    size = min(THRESHOLD_SAMPLE, max(1024, n // 64))
    sampler = torch.Generator().manual_seed(0)  # placement of the sample only: the value found is exact anyway
    picked_rows = torch.randint(rows, (size,), generator=sampler)
    picked_cols = torch.randint(cols, (size,), generator=sampler)
    sample = (b[picked_rows] * a[:, picked_cols].T).sum(1).abs().numpy()
    margin = 5 * math.sqrt(below * (1 - below) / size) + 2 / size
    low_at, high_at = int((below - margin) * size), int((below + margin) * size)
    ordered = np.partition(sample, [min(max(at, 0), size - 1) for at in (low_at, high_at)])
    low = ordered[low_at] if low_at >= 0 else -1.0
    high = ordered[high_at] if high_at < size else math.inf
    above, inside = 0, []
    for block in blocks:
        # numpy's comparisons, counts and boolean selection run several times faster than torch's on the CPU.
        magnitudes = torch.mm(b[block], a, out=buffer[:b[block].shape[0]]).numpy().reshape(-1)
        np.abs(magnitudes, out=magnitudes)
        over_low = magnitudes > low
        over_high = magnitudes > high
        above += int(np.count_nonzero(over_high))
        # high ≥ low, so this is low < |x| ≤ high; compress takes them faster than a boolean index.
        inside.append(np.compress(over_low ^ over_high, magnitudes))
    candidates = np.concatenate(inside)
    if not above < keep <= above + candidates.size:
        candidates, above = np.abs(np.concatenate([(b[block] @ a).numpy().reshape(-1) for block in blocks])), 0
    position = candidates.size - (keep - above)  # the threshold's place among the candidates in ascending order
    return np.partition(candidates, position)[position]


def _dare_stream(seed: int, path: str, index: int) -> np.random.SFC64:
    """DARE's random stream for input ``index`` at module ``path``: its own generator, so modules can be computed in
    any order or block size. SFC64 seeded by SeedSequence([seed mod 2⁶⁴, first 8 bytes of sha256(path), index])."""
    path_key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    return np.random.SFC64(np.random.SeedSequence([seed % 2**64, path_key, index]))


def _dare_prune(delta: torch.Tensor, density: float, stream: np.random.SFC64) -> None:
    """DARE's drop (Yu et al. 2024) in place: keep each entry with probability ``density``; the caller rescales the
    kept ones by 1/density, so that the expected delta is unchanged. Entry j (row-major) draws the j-th 32-bit half
    of the stream's 64-bit words, read as a signed int32 u: kept iff u < −2³¹ + round(density·2³²)."""
    words = stream.random_raw((delta.numel() + 1) // 2)
    draws = words.view(np.int32)[:delta.numel()].reshape(delta.shape)
    np.multiply(delta.numpy(), draws < -(2**31) + round(density * 2**32), out=delta.numpy())


def _lora_adapter(adapters: list[Adapter], merged: dict[str, Term], dtype: torch.dtype) -> Adapter:
    ranks = {path: factors.a.shape[0] for path, factors in merged.items()}
    top = max(ranks.values())
    lora_bias = any(factors.bias is not None for factors in merged.values())
    if lora_bias and any(factors.embedding for factors in merged.values()):
        raise Incompatible("a merge with lora_bias cannot include embedding modules: PEFT has no LoRA bias for them")
    tensors: dict[str, torch.Tensor] = {}
    for path, factors in merged.items():
        prefix = KEY_PREFIX + path
        if factors.embedding:
            tensors[f"{prefix}.lora_embedding_A"] = factors.a.to(dtype).contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = factors.b.to(dtype).contiguous()
            continue
        tensors[f"{prefix}.lora_A.weight"] = factors.a.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = factors.b.to(dtype).contiguous()
        if lora_bias:
            bias = factors.bias if factors.bias is not None else torch.zeros(factors.b.shape[0])
            tensors[f"{prefix}.lora_B.bias"] = bias.to(dtype).contiguous()
    # alpha = rank everywhere makes every module's scaling exactly 1. Pattern keys are regexes matched against the
    # end of the module path, so the paths are escaped.
    pattern = {re.escape(path): r for path, r in sorted(ranks.items()) if r != top}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": common_value(adapters, "task_type"),
        "base_model_name_or_path": adapters[0].config.get("base_model_name_or_path"),
        "revision": adapters[0].config.get("revision"),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        # Full module paths: PEFT creates exactly these modules, none with zero weights in other layers.
        "target_modules": sorted(merged),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(common_value(adapters, "fan_in_fan_out")),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return Adapter(config=config, tensors=tensors)
