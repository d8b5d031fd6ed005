"""What differs between two versions: fields, config, recipe, metrics, tags, and the weight updates themselves.

The weight comparison works in ΔW space, per adapted module, without forming any ΔW (the cosine of flattened
factors is meaningless: B·Q and Q⁻¹·A give the same ΔW). Each module's update comes from its method as an exact
factor pair ``ΔW = B·A`` (``Method.merge_terms``: LoRA, rsLoRA, AdaLoRA; LoHa as its Khatri–Rao pair of rank r₁·r₂;
LoKr as kron(U₁, U₂)·kron(V₁, V₂)), and for two such pairs::

    ‖B·A‖²_F          = tr((BᵀB)(AAᵀ))               = Σ (BᵀB) ⊙ (AAᵀ)
    ⟨B₁A₁, B₂A₂⟩_F     = tr((B₁ᵀB₂)(A₂A₁ᵀ))           = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)
    ‖ΔW₁ − ΔW₂‖²_F     = ‖ΔW₁‖² + ‖ΔW₂‖² − 2⟨ΔW₁, ΔW₂⟩

at O((d + k)·r₁·r₂) for a d×k module. Two LoKr modules with factors of the same shapes use the Kronecker identity
⟨W₁ ⊗ W₂, W₁' ⊗ W₂'⟩ = ⟨W₁, W₁'⟩·⟨W₂, W₂'⟩ instead. A pair whose factored cost would exceed forming both dense
matrices (small modules with high-rank factors, e.g. LoKr with whole factors against another method) is computed
densely; every module says which way it went (``via``: ``gram``, ``kronecker``, ``dense``). A LoRA bias counts as
one more column of the update. Everything is computed in float64, and the difference norm is clamped at zero
(rounding can make the expansion above slightly negative for identical updates).

A module only one side adapts has a zero update on the other side: it counts fully in the difference, and its
cosine is undefined. Methods without an additive weight update (IA3 and OFT are multiplicative, prompt and
prefix tuning act on inputs, bottleneck adapters add a nonlinear block, DoRA renormalizes by the base weight...)
are not compared; the reason is given instead (``Diff.weights_refused``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.errors import HubError, Incompatible

if TYPE_CHECKING:
    import torch

    from hub.formats import Adapter
    from hub.methods.base import Term
    from hub.registry import VersionInfo

Kron = tuple["torch.Tensor", "torch.Tensor", float]


@dataclass(frozen=True)
class Change:
    """A field, config or recipe key whose value differs (None: absent on that side)."""

    key: str
    a: Any
    b: Any

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class MetricDelta:
    """One metric (key, dataset, split) on both sides; ``delta`` = b − a when both have it."""

    key: str
    dataset: str | None
    split: str | None
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "dataset": self.dataset, "split": self.split, "a": self.a, "b": self.b,
                "delta": self.delta}


@dataclass(frozen=True)
class ModuleDiff:
    """One module's updates compared. ``norm_a``/``norm_b`` are ‖ΔW‖_F (0 on a side that does not adapt it),
    ``norm_diff`` is ‖ΔW_a − ΔW_b‖_F, ``cosine`` their cosine (None when either is zero), ``via`` how it was
    computed (``gram``, ``kronecker``, ``dense``; ``a only``/``b only`` for a one-sided module)."""

    module: str
    shape: tuple[int, int]
    norm_a: float
    norm_b: float
    norm_diff: float
    cosine: float | None
    via: str

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "shape": list(self.shape), "norm_a": self.norm_a, "norm_b": self.norm_b,
                "norm_diff": self.norm_diff, "cosine": self.cosine, "via": self.via}


@dataclass(frozen=True)
class WeightDiff:
    """The updates of two adapters compared over all their modules (each adapter as one long vector of its
    modules' ΔW), and per module, the ones that differ most first."""

    norm_a: float
    norm_b: float
    norm_diff: float
    cosine: float | None
    modules: list[ModuleDiff]

    @property
    def only_a(self) -> list[str]:
        return sorted(m.module for m in self.modules if m.via == "a only")

    @property
    def only_b(self) -> list[str]:
        return sorted(m.module for m in self.modules if m.via == "b only")

    def to_dict(self) -> dict[str, Any]:
        return {"norm_a": self.norm_a, "norm_b": self.norm_b, "norm_diff": self.norm_diff, "cosine": self.cosine,
                "only_a": self.only_a, "only_b": self.only_b, "modules": [m.to_dict() for m in self.modules]}


@dataclass(frozen=True)
class Diff:
    """Two versions compared (``hub diff A B``): metric deltas are b − a."""

    a: VersionInfo
    b: VersionInfo
    fields: list[Change]
    config: list[Change]
    recipe: list[Change]
    metrics: list[MetricDelta]
    tags_only_a: list[str]
    tags_only_b: list[str]
    weights: WeightDiff | None = None
    weights_refused: str | None = None  # why the weights were not compared
    same_artifact: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "same_artifact", self.a.digest == self.b.digest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.ref, "b": self.b.ref, "same_artifact": self.same_artifact,
            "fields": [c.to_dict() for c in self.fields], "config": [c.to_dict() for c in self.config],
            "recipe": [c.to_dict() for c in self.recipe], "metrics": [m.to_dict() for m in self.metrics],
            "tags_only_a": self.tags_only_a, "tags_only_b": self.tags_only_b,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "weights_refused": self.weights_refused,
        }


# ------------------------------------------------------------------------------------------------- metadata


def delta_refusal(version: VersionInfo) -> str | None:
    """Why ``version``'s weights cannot be compared (its method has no additive ΔW), or None when they can."""
    from hub.methods.table import lookup

    try:
        why = lookup(version.config.get("peft_type")).delta_refusal(version.config)
    except HubError:  # a type this hub does not know: stored, never compared
        why = f"the hub computes no weight update for {version.method} adapters"
    return None if why is None else f"{version.ref}: {why}"


def compare(a: VersionInfo, b: VersionInfo, *, adapters: tuple[Adapter, Adapter] | None = None) -> Diff:
    """Compare two versions; their weights too when ``adapters`` (their artifacts, a's first) are given. A method
    without an additive update, or adapters made for different bases, fill ``weights_refused`` instead of
    raising."""
    refused = delta_refusal(a) or delta_refusal(b)
    weights = None
    if refused is None and adapters is not None:
        try:
            weights = compare_weights(*adapters)
        except Incompatible as exc:
            refused = str(exc)
    return Diff(a=a, b=b, fields=_fields(a, b), config=_changes(a.config, b.config),
                recipe=_changes(a.recipe or {}, b.recipe or {}), metrics=_metrics(a, b),
                tags_only_a=sorted(set(a.tags) - set(b.tags)), tags_only_b=sorted(set(b.tags) - set(a.tags)),
                weights=weights, weights_refused=refused)


def _fields(a: VersionInfo, b: VersionInfo) -> list[Change]:
    def base(version: VersionInfo) -> str | None:
        return version.base.weights_hash if version.base is not None else None

    pairs = {"method": (a.method, b.method), "rank": (a.rank, b.rank), "alpha": (a.alpha, b.alpha),
             "targets": (sorted(a.targets), sorted(b.targets)), "base": (base(a), base(b)),
             "digest": (a.digest, b.digest), "size_bytes": (a.size_bytes, b.size_bytes),
             "status": (a.status, b.status), "description": (a.description, b.description)}
    return [Change(key, x, y) for key, (x, y) in pairs.items() if x != y]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``training.lr``); lists and other values stay whole."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Change]:
    flat_a, flat_b = _flatten(a), _flatten(b)
    return [Change(key, flat_a.get(key), flat_b.get(key)) for key in sorted(flat_a.keys() | flat_b.keys())
            if flat_a.get(key) != flat_b.get(key)]


def _metrics(a: VersionInfo, b: VersionInfo) -> list[MetricDelta]:
    values: dict[tuple[str, str, str], list[float | None]] = {}
    for side, version in enumerate((a, b)):
        for metric in version.metrics:
            values.setdefault((metric.key, metric.dataset or "", metric.split or ""), [None, None])[side] = metric.value
    return [MetricDelta(key, dataset or None, split or None, x, y)
            for (key, dataset, split), (x, y) in sorted(values.items())]


# -------------------------------------------------------------------------------------------------- weights


def compare_weights(a: Adapter, b: Adapter) -> WeightDiff:
    """The weight updates of two adapters compared per module (see the module docstring).

    Raises Incompatible when either adapter has no additive update, or a module has different shapes on the two
    sides (adapters made for different bases).
    """
    import torch

    terms, krons = [], []
    for adapter in (a, b):
        why = adapter.kind.delta_refusal(adapter.config)
        if why is not None:
            raise Incompatible(why)
        terms.append(adapter.kind.merge_terms(adapter, torch.float64))
        krons.append(adapter.kind.kronecker_factors(adapter))
    (terms_a, terms_b), (kron_a, kron_b) = terms, krons
    modules = []
    for path in sorted(terms_a.keys() | terms_b.keys()):
        ta, tb = terms_a.get(path), terms_b.get(path)
        if ta is not None and tb is not None and ta.shape != tb.shape:
            raise Incompatible(f"module {path} is {ta.shape[0]}×{ta.shape[1]} in one adapter and "
                               f"{tb.shape[0]}×{tb.shape[1]} in the other: they were made for different bases")
        if tb is None or ta is None:
            term, side = (ta, "a only") if tb is None else (tb, "b only")
            norm = math.sqrt(max(_inner(term, term), 0.0))
            norms = (norm, 0.0) if side == "a only" else (0.0, norm)
            modules.append(ModuleDiff(path, term.shape, *norms, norm_diff=norm, cosine=None, via=side))
            continue
        modules.append(_compare_module(path, ta, tb, kron_a.get(path), kron_b.get(path)))
    total_a = math.sqrt(sum(m.norm_a ** 2 for m in modules))
    total_b = math.sqrt(sum(m.norm_b ** 2 for m in modules))
    total_diff = math.sqrt(sum(m.norm_diff ** 2 for m in modules))
    # Σ⟨ΔW_a, ΔW_b⟩ over shared modules, recovered from each module's norms and cosine.
    inner = sum(m.cosine * m.norm_a * m.norm_b for m in modules if m.cosine is not None)
    cosine = inner / (total_a * total_b) if total_a > 0 and total_b > 0 else None
    modules.sort(key=lambda m: (-m.norm_diff, m.module))
    return WeightDiff(total_a, total_b, total_diff, cosine, modules)


def _compare_module(path: str, ta: Term, tb: Term, kron_a: Kron | None, kron_b: Kron | None) -> ModuleDiff:
    rows, cols = ta.shape
    rank_a, rank_b = ta.a.shape[0], tb.a.shape[0]
    if kron_a is not None and kron_b is not None and (kron_a[0].shape, kron_a[1].shape) == (kron_b[0].shape,
                                                                                            kron_b[1].shape):
        # Frobenius products factor over Kronecker products: O(size of the factors).
        (w1a, w2a, sa), (w1b, w2b, sb) = kron_a, kron_b
        aa = float((w1a * w1a).sum() * (w2a * w2a).sum()) * sa * sa
        bb = float((w1b * w1b).sum() * (w2b * w2b).sum()) * sb * sb
        ab = float((w1a * w1b).sum() * (w2a * w2b).sum()) * sa * sb
        via = "kronecker"
    elif (rows + cols) * (rank_a + rank_b) ** 2 <= rows * cols * (rank_a + rank_b):
        aa, bb, ab = _inner(ta, ta), _inner(tb, tb), _inner(ta, tb)
        via = "gram"
    else:
        dense_a, dense_b = _dense(ta), _dense(tb)
        aa, bb, ab = (float((x * y).sum()) for x, y in ((dense_a, dense_a), (dense_b, dense_b), (dense_a, dense_b)))
        via = "dense"
    norm_a, norm_b = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    cosine = ab / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None
    if cosine is not None:
        cosine = min(1.0, max(-1.0, cosine))
    return ModuleDiff(path, ta.shape, norm_a, norm_b, math.sqrt(max(aa + bb - 2 * ab, 0.0)), cosine, via)


def _inner(x: Term, y: Term) -> float:
    """⟨ΔW_x, ΔW_y⟩_F from the factors: Σ (BxᵀBy) ⊙ (AxAyᵀ), plus the biases' dot product."""
    value = float(((x.b.T @ y.b) * (x.a @ y.a.T)).sum())
    if x.bias is not None and y.bias is not None:
        value += float(x.bias @ y.bias)
    return value


def _dense(term: Term) -> torch.Tensor:
    import torch

    dense = term.b @ term.a
    return dense if term.bias is None else torch.cat([dense, term.bias[:, None]], dim=1)

