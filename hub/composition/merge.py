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
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's merge_utils semantics applied to the dense
  deltas ΔWᵢ (pruning is elementwise, so a dense matrix per module is inherent), then factored back at ``rank``.

The result is a plain PEFT LoRA whose scaling is exactly 1 in every module (lora_alpha = r, with rank_pattern and
alpha_pattern for modules of another rank), targeting exactly the modules in its tensors. IA3 vectors and prompt
embeddings of identical layout are summed directly. Everything else is refused with a suggestion to stack.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hub.composition.lowrank import factor_dense, truncate_product
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


@dataclass(frozen=True)
class MergeResult:
    """A merged adapter and the recipe that reproduces it (for lineage).

    ``recipe`` holds ``strategy``, ``weights``, ``rank``, ``density``, ``majority_sign``, ``seed`` (None where the
    strategy does not use them) and ``parents``: the inputs' digests in the order the weights refer to.
    """

    adapter: Adapter
    recipe: dict[str, Any]


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
    how ties/dare_ties elect each entry's sign. ``seed`` makes DARE's random pruning and the randomized SVD of
    large dense modules reproducible. Whether the adapters share a base is the caller's check.
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
        merged = _merge_low_rank(adapters, weight_list, strategy, svd_rank, density, majority_sign, seed,
                                 explicit_rank=rank is not None)
    elif len(set(kinds)) == 1 and kinds[0].summable:
        _require_plain_sum(strategy, rank, density, kinds[0].name)
        merged = kinds[0].weighted_sum(adapters, weight_list)
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
    return MergeResult(adapter=merged, recipe=recipe)


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
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise Incompatible(f"seed must be an integer, got {seed!r}")


def _require_plain_sum(strategy: str, rank: int | None, density: float | None, what: str) -> None:
    if strategy != "exact" or rank is not None or density is not None:
        raise Incompatible(f"{what} adapters merge only by their exact weighted sum: strategy='exact', no rank/density")


# ---------------------------------------------------------------------------------------------------------------
# Low-rank methods (LoRA, AdaLoRA, LoHa, LoKr): factor pairs from each method's merge_terms


def _merge_low_rank(adapters: list[Adapter], weights: list[float], strategy: str, rank: int | None,
                    density: float | None, majority_sign: str, seed: int, *, explicit_rank: bool) -> Adapter:
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

    prune_generator = torch.Generator().manual_seed(seed)
    sketch_generator = torch.Generator().manual_seed(seed)
    merged: dict[str, Term] = {}
    # Sorted order fixes which random numbers each module's DARE mask uses, so a seed reproduces the merge.
    for path in sorted(by_module):
        terms = [(weights[i], term) for i, term in by_module[path]]
        if strategy in ("exact", "svd"):
            factors = _sum_factored(terms, strategy, rank)
        else:
            factors = _sum_dense(terms, strategy, rank, density, majority_sign, prune_generator, sketch_generator)
        if factors is not None:
            merged[path] = factors
    if not merged:
        raise Incompatible("every adapter with a non-zero weight is empty: nothing to merge")
    merged_adapter = _lora_adapter(adapters, merged, dtype)
    merged_adapter.tensors.update(carried)
    saved = sorted({name for adapter in adapters for name in adapter.config.get("modules_to_save") or ()})
    if saved:
        merged_adapter = Adapter(config={**merged_adapter.config, "modules_to_save": saved},
                                 tensors=merged_adapter.tensors)
    return merged_adapter


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


def _sum_factored(terms: list[tuple[float, Term]], strategy: str, rank: int | None) -> Term | None:
    live = [(weight, term) for weight, term in terms if weight != 0]
    if not live:
        return None
    first = live[0][1]
    b = torch.cat([term.b for _, term in live], dim=1)
    a = torch.cat([weight * term.a for weight, term in live], dim=0)
    full = min(first.shape)
    if strategy == "svd":
        b, a = truncate_product(b, a, min(rank, full))
    elif b.shape[1] > full:
        # A concatenation wider than the matrix itself carries redundant rank: drop it without loss.
        b, a = truncate_product(b, a, full)
    biases = [weight * term.bias for weight, term in live if term.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return Term(b=b, a=a, bias=bias, embedding=first.embedding)


def _sum_dense(terms: list[tuple[float, Term]], strategy: str, rank: int | None, density: float,
               majority_sign: str, prune_generator: torch.Generator,
               sketch_generator: torch.Generator) -> Term | None:
    if not any(weight for weight, _ in terms):
        return None
    first = terms[0][1]
    deltas = [term.b @ term.a for _, term in terms]
    if strategy in ("ties", "magnitude_prune"):
        pruned = torch.stack([_magnitude_prune(delta, density) for delta in deltas])
    else:
        pruned = torch.stack([_random_prune(delta, density, prune_generator) for delta in deltas])
    weighted = pruned * torch.tensor([w for w, _ in terms], dtype=pruned.dtype).view(-1, 1, 1)
    if strategy in SIGN_ELECTING:
        # PEFT's disjoint merge: the sign is elected on the unweighted deltas, then agreeing entries are averaged.
        signs = pruned.sign()
        votes = pruned.sum(0) if majority_sign == "total" else signs.sum(0)
        agree = signs == torch.where(votes >= 0, 1.0, -1.0)
        total = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        total = weighted.sum(0)
    target = rank if rank is not None else sum(term.a.shape[0] for _, term in terms)
    b, a = factor_dense(total, min(target, *first.shape), generator=sketch_generator)
    return Term(b=b, a=a, bias=None, embedding=first.embedding)


def _magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=keep).indices] = 1
    return delta * mask.view_as(delta)


def _random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return delta
    # DARE: keep each entry with probability density and rescale, so the expected delta is unchanged.
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


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
