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
from hub.formats import Adapter, adapter_digest, pattern_value, validate
from hub.formats.peft import KEY_PREFIX, split_key

STRATEGIES = ("exact", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_STRATEGIES = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
SIGN_ELECTING = frozenset({"ties", "dare_ties"})
MAJORITY_SIGNS = ("total", "frequency")
LOW_RANK_METHODS = frozenset({"lora", "adalora", "loha", "lokr"})
SUMMED_PROMPT_METHODS = frozenset({"prompt_tuning", "p_tuning"})
# PEFT's defaults for r and alpha (LoraConfig, LoHaConfig, LoKrConfig) when a config omits them.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

# LoRA options under which a module's effect is not B·A·scaling, so it cannot enter a sum of deltas.
LORA_VARIANTS = {
    "use_dora": "DoRA renormalizes by the base weight's column norms, so a sum of DoRA deltas is not a LoRA",
    "alora_invocation_tokens": "aLoRA acts only after its invocation tokens",
    "use_qalora": "QALoRA pools its inputs by groups",
    "use_bdlora": "BD-LoRA's block-diagonal factors",
    "arrow_config": "Arrow routes between LoRA experts per token",
    "kasa_config": "KaSA depends on the base weight's singular values",
    "monteclora_config": "MonteCLoRA samples its factors",
    "layer_replication": "layer replication changes the model's layers",
    "target_parameters": "it targets nn.Parameters rather than modules",
}
# init_lora_weights values that rewrite the base weights: an unconverted adapter is a delta from that other base.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
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


@dataclass
class _Term:
    """A delta at one module (one adapter's, or the merged one): ΔW = b @ a, scaling folded into a, plus a LoRA bias."""

    b: torch.Tensor
    a: torch.Tensor
    bias: torch.Tensor | None
    embedding: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


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
    methods = [adapter.method for adapter in adapters]
    if set(methods) <= LOW_RANK_METHODS:
        if strategy == "svd" and rank is None:
            rank = _default_svd_rank(adapters)
        merged = _merge_low_rank(adapters, weight_list, strategy, rank, density, majority_sign, seed)
    elif set(methods) == {"ia3"}:
        _require_plain_sum(strategy, rank, density, "IA3")
        merged = _merge_ia3(adapters, weight_list)
    elif len(set(methods)) == 1 and methods[0] in SUMMED_PROMPT_METHODS:
        _require_plain_sum(strategy, rank, density, methods[0])
        merged = _merge_prompts(adapters, weight_list)
    else:
        raise Incompatible(
            f"cannot merge {' + '.join(methods)}: weighted sums exist for LoRA/LoHa/LoKr together, IA3 with IA3, and "
            "prompt tuning or P-tuning with the same method; stack these adapters instead"
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


def _check_only_module_tensors(adapter: Adapter, index: int, *, allow_base_copies: bool = False) -> None:
    # modules_to_save copies, trainable tokens and bias="all" biases replace base tensors: they are not deltas.
    for key in adapter.tensors:
        if split_key(adapter.method, key) is None and not (allow_base_copies and BASE_COPY in key):
            raise Incompatible(
                f"adapter #{index} carries {key}, which is not a {adapter.method} delta (modules_to_save, trainable "
                "tokens or biases replace base weights and cannot be summed); stack it instead"
            )


def _common(adapters: list[Adapter], key: str) -> Any:
    values = {adapter.config.get(key) for adapter in adapters} - {None}
    if len(values) > 1:
        raise Incompatible(f"the adapters disagree on {key} ({', '.join(sorted(map(str, values)))})")
    return values.pop() if values else None


# ---------------------------------------------------------------------------------------------------------------
# LoRA / LoHa / LoKr


def _merge_low_rank(adapters: list[Adapter], weights: list[float], strategy: str, rank: int | None,
                    density: float | None, majority_sign: str, seed: int) -> Adapter:
    dtype = _common_dtype(adapters)
    # Scalings, sums and factorizations run in at least float32, whatever the inputs' precision.
    work = torch.promote_types(dtype, torch.float32)
    by_module: dict[str, list[tuple[int, _Term]]] = {}
    for index, adapter in enumerate(adapters):
        _check_only_module_tensors(adapter, index, allow_base_copies=True)
        for path, term in _terms(adapter, index, work).items():
            by_module.setdefault(path, []).append((index, term))
    base_copies = _base_copies(adapters)
    for path, terms in by_module.items():
        _check_same_layout(path, terms)

    if strategy == "svd":
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
    merged: dict[str, _Term] = {}
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
    merged_adapter.tensors.update(base_copies)
    return merged_adapter


def _base_copies(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """The saved base layers, kept as they are: loading the inputs together in PEFT applies them the same way."""
    copies: dict[str, tuple[int, torch.Tensor]] = {}
    for index, adapter in enumerate(adapters):
        for key, tensor in adapter.tensors.items():
            if BASE_COPY not in key:
                continue
            if key in copies and not torch.equal(copies[key][1], tensor):
                raise Incompatible(
                    f"adapters #{copies[key][0]} and #{index} carry different copies of base weight {key} (a resized "
                    "vocabulary?): they do not share a base"
                )
            copies.setdefault(key, (index, tensor))
    return {key: tensor for key, (_, tensor) in copies.items()}


def _terms(adapter: Adapter, index: int, work: torch.dtype) -> dict[str, _Term]:
    config = adapter.config
    if adapter.method == "adalora":
        return _adalora_terms(adapter, work)
    if adapter.method == "lora":
        _refuse_lora_variants(config, index)
    default_r = config.get("r") or PEFT_DEFAULT_R
    alpha_key = "lora_alpha" if adapter.method == "lora" else "alpha"
    default_alpha = config.get(alpha_key)
    default_alpha = PEFT_DEFAULT_ALPHA if default_alpha is None else default_alpha
    terms = {}
    for path, params in adapter.modules().items():
        params = {name: tensor.to(work) for name, tensor in params.items()}
        r = pattern_value(config.get("rank_pattern"), path, default_r)
        alpha = pattern_value(config.get("alpha_pattern"), path, default_alpha)
        rslora = adapter.method == "lora" and config.get("use_rslora")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if adapter.method == "lora":
            terms[path] = _lora_term(params, scale)
        elif adapter.method == "loha":
            terms[path] = _loha_term(path, params, scale)
        else:
            terms[path] = _lokr_term(path, params, scale)
    return terms


def _adalora_terms(adapter: Adapter, work: torch.dtype) -> dict[str, _Term]:
    # PEFT's AdaLoRA scales by alpha / (ranknum + 1e-5) with ranknum = init_r for every module, even after the
    # budget cut a module's tensors to fewer ranks (and by the module's rank when lora_alpha <= 0).
    alpha = float(adapter.config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    init_r = adapter.config.get("init_r", adapter.config.get("r")) or PEFT_DEFAULT_R
    terms = {}
    for path, params in adapter.modules().items():
        a, e, b = (params[name].to(work) for name in ("lora_A", "lora_E", "lora_B"))
        if a.shape[0] == 0:
            continue  # the budget pruned every rank of this module
        scale = (alpha if alpha > 0 else a.shape[0]) / (init_r + 1e-5)
        terms[path] = _Term(b=b, a=(a * e) * scale, bias=None, embedding=False)
    return terms


def _refuse_lora_variants(config: dict[str, Any], index: int) -> None:
    for option, reason in LORA_VARIANTS.items():
        if config.get(option):
            raise Incompatible(
                f"adapter #{index} uses {option} ({reason}): its delta is not B·A·scaling, so it cannot be merged; "
                "stack it instead"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise Incompatible(
            f"adapter #{index} was initialized with {init!r}, which rewrites the base weights, and was saved without "
            "converting it back (path_initial_model_for_weight_conversion): its delta is not from the shared base"
        )


def _lora_term(params: dict[str, torch.Tensor], scale: float) -> _Term:
    embedding = "lora_embedding_A" in params
    a = params["lora_embedding_A" if embedding else "lora_A.weight"]
    b = params["lora_embedding_B" if embedding else "lora_B.weight"]
    bias = params.get("lora_B.bias")
    # PEFT scales lora_B's bias along with its output: lora_B(lora_A(x)) * scaling.
    return _Term(b=b, a=a * scale, bias=None if bias is None else bias * scale, embedding=embedding)


def _loha_term(path: str, params: dict[str, torch.Tensor], scale: float) -> _Term:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if "hada_t1" in params or any(name not in params or params[name].dim() != 2 for name in names):
        raise Incompatible(f"LoHa module {path} is convolutional (CP-decomposed); only linear modules can be merged")
    w1a, w1b, w2a, w2b = (params[name] for name in names)
    # (w1a·w1b) ⊙ (w2a·w2b) = B·A with B[i, (p,q)] = w1a[i,p]·w2a[i,q] and A[(p,q), j] = w1b[p,j]·w2b[q,j].
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return _Term(b=b, a=a * scale, bias=None, embedding=False)


def _lokr_term(path: str, params: dict[str, torch.Tensor], scale: float) -> _Term:
    if "lokr_t2" in params or any(tensor.dim() != 2 for tensor in params.values()):
        raise Incompatible(f"LoKr module {path} is convolutional; only linear modules can be merged")
    u1, v1 = _factor_pair(params, "lokr_w1")
    u2, v2 = _factor_pair(params, "lokr_w2")
    # Mixed-product property: kron(U1·V1, U2·V2) = kron(U1, U2)·kron(V1, V2).
    return _Term(b=torch.kron(u1, u2), a=torch.kron(v1, v2) * scale, bias=None, embedding=False)


def _factor_pair(params: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in params:
        full = params[name]
        rows, cols = full.shape
        eye = torch.eye(min(rows, cols), dtype=full.dtype)
        # A full matrix W is W·I or I·W, whichever has the smaller inner dimension.
        return (full, eye) if cols <= rows else (eye, full)
    return params[f"{name}_a"], params[f"{name}_b"]


def _check_same_layout(path: str, terms: list[tuple[int, _Term]]) -> None:
    first_index, first = terms[0]
    for index, term in terms[1:]:
        if term.shape != first.shape or term.embedding != first.embedding:
            raise Incompatible(
                f"module {path} is {_describe(first)} in adapter #{first_index} but {_describe(term)} in adapter "
                f"#{index}: the adapters were made for different bases"
            )


def _describe(term: _Term) -> str:
    return f"{'an embedding' if term.embedding else 'a linear'} {term.shape[0]}×{term.shape[1]}"


def _common_dtype(adapters: list[Adapter]) -> torch.dtype:
    dtype = None
    for adapter in adapters:
        for tensor in adapter.tensors.values():
            if tensor.is_floating_point():
                dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
    return dtype or torch.float32


def _default_svd_rank(adapters: list[Adapter]) -> int:
    # PEFT's default for its svd combination: the largest input rank.
    return max(adapter.spec.rank or PEFT_DEFAULT_R for adapter in adapters)


def _sum_factored(terms: list[tuple[float, _Term]], strategy: str, rank: int | None) -> _Term | None:
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
    return _Term(b=b, a=a, bias=bias, embedding=first.embedding)


def _sum_dense(terms: list[tuple[float, _Term]], strategy: str, rank: int | None, density: float,
               majority_sign: str, prune_generator: torch.Generator,
               sketch_generator: torch.Generator) -> _Term | None:
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
    return _Term(b=b, a=a, bias=None, embedding=first.embedding)


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


def _lora_adapter(adapters: list[Adapter], merged: dict[str, _Term], dtype: torch.dtype) -> Adapter:
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
    lora_adapters = [adapter for adapter in adapters if adapter.method == "lora"]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _common(adapters, "task_type"),
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
        "fan_in_fan_out": bool(_common(lora_adapters, "fan_in_fan_out")),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return Adapter(config=config, tensors=tensors)


# ---------------------------------------------------------------------------------------------------------------
# IA3 and prompts


def _merge_ia3(adapters: list[Adapter], weights: list[float]) -> Adapter:
    for index, adapter in enumerate(adapters):
        _check_only_module_tensors(adapter, index)
    first = adapters[0]
    layout = {key: tuple(tensor.shape) for key, tensor in first.tensors.items()}
    for index, adapter in enumerate(adapters[1:], start=1):
        other = {key: tuple(tensor.shape) for key, tensor in adapter.tensors.items()}
        if other != layout:
            differing = sorted(set(layout) ^ set(other)) or sorted(k for k in layout if layout[k] != other[k])
            raise Incompatible(
                f"IA3 adapters #0 and #{index} differ at {differing[0]}: they must scale the same modules with the "
                "same shapes (a missing IA3 vector means 1, not 0, so the sum would be ambiguous); stack them instead"
            )
    _common(adapters, "task_type")
    dtype = _common_dtype(adapters)
    work = torch.promote_types(dtype, torch.float32)
    tensors = {
        key: sum(w * adapter.tensors[key].to(work) for w, adapter in zip(weights, adapters, strict=True)).to(dtype)
        for key in first.tensors
    }
    return Adapter(config={**first.config, "inference_mode": True}, tensors=tensors)


def _merge_prompts(adapters: list[Adapter], weights: list[float]) -> Adapter:
    first = adapters[0]
    shape = tuple(first.tensors["prompt_embeddings"].shape)
    for index, adapter in enumerate(adapters[1:], start=1):
        other = tuple(adapter.tensors["prompt_embeddings"].shape)
        if other != shape:
            raise Incompatible(
                f"prompt embeddings of adapter #0 are {shape[0]}×{shape[1]} but #{index}'s are {other[0]}×{other[1]}: "
                "only prompts of the same length and width can be summed; stack them instead"
            )
    _common(adapters, "task_type")
    dtype = _common_dtype(adapters)
    work = torch.promote_types(dtype, torch.float32)
    total = sum(w * adapter.tensors["prompt_embeddings"].to(work) for w, adapter in zip(weights, adapters, strict=True))
    config = {**first.config, "inference_mode": True}
    if config.get("peft_type", "").upper() == "PROMPT_TUNING":
        # The embeddings are loaded from the file: a TEXT init would make PEFT fetch a tokenizer for nothing.
        config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None)
    return Adapter(config=config, tensors={"prompt_embeddings": total.to(dtype)})
