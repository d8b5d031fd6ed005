"""The front door: ``compose`` builds a composition from registry references or adapters, ``activate`` puts any
registered version (plain adapter, merged adapter, stack or mixture) or composition onto a model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from hub.composition.auto import SearchConfig, fit_weights
from hub.composition.members import Input, default_hub, resolve
from hub.composition.mixture import Mixture
from hub.composition.router import RouterConfig
from hub.composition.stack import Stack
from hub.composition.weighted import WeightedSum
from hub.errors import Incompatible
from hub.formats import Adapter

if TYPE_CHECKING:
    from torch import nn

    from hub.client import Hub
    from hub.data import Example

KINDS = ("sum", "stack", "mixture")
Composition = WeightedSum | Stack | Mixture


class Active(Protocol):
    """What ``activate`` returns: something attached to a model that ``detach()`` removes again."""

    name: str
    method: str

    def detach(self) -> None: ...


def compose(
    inputs: Sequence[Input],
    weights: Sequence[float] | Literal["auto"] | None = None,
    *,
    kind: str = "sum",
    strategy: str = "exact",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    router: RouterConfig | None = None,
    examples: Sequence[Example] = (),
    data: str | os.PathLike[str] | None = None,
    search: SearchConfig | Mapping[str, Any] | str | None = None,
    base: str | os.PathLike[str] | Any | None = None,
    quantize: str | None = "nf4",
    device: str | None = None,
    hub: Hub | None = None,
) -> Composition:
    """Compose adapters: ``inputs`` are registry references (``"math"``, ``"math@2"``, ``"math@prod"``, read
    through ``hub``, default ``Hub()``) or in-memory ``Adapter`` objects; ``weights`` one number each (default 1.0).

    * ``kind="sum"``: a ``WeightedSum``, one new adapter Σ wᵢ·adapterᵢ by ``strategy`` ("exact", "svd", "ties",
      "dare_linear", "dare_ties", "magnitude_prune"; ``rank``, ``density``, ``majority_sign``, ``seed`` as in
      ``hub.composition.merge.merge``);
    * ``kind="stack"``: a ``Stack``, the adapters (any methods) active together at their weights;
    * ``kind="mixture"``: a ``Mixture``, the adapters as experts behind a gate (``router``) to ``fit``.

    ``weights="auto"`` (sums of LoRA-family adapters only) fits the weights on ``examples`` plus a JSONL file
    ``data`` first: each input scored alone per example, then a search over the weights of those best on the most
    examples, from the best (LoraHub's search from 0 with ``start="zero"``; see ``hub.composition.auto``).
    ``search`` is a SearchConfig, its fields as a dict, or its method, "cma" (default) or "gradient". It runs on
    ``base`` (a loaded ``hub.runtime.Base``, or a folder / Hub id loaded once with ``quantize`` on ``device``;
    default the members' base); then the sum is made by ``strategy`` with the weights found, and its recipe
    records them with the search settings, the examples' sha256 and the score (``WeightedSum.search``). The search
    scores the exact sum (for "svd", "ties"... the merge made afterwards approximates it). Raises Incompatible (no
    examples, another kind, an adapter listed twice or not of the LoRA family, a search that keeps every weight at
    0, a budget too small to score every input), InvalidArtifact (a malformed data file).

    Every result can ``attach(model)`` and ``register(hub, name=...)`` (with lineage); ``activate`` puts a
    registered one back on a model.

    >>> merged = compose(["math@2", "code"], [0.7, 0.3], strategy="svd", rank=16)
    >>> merged.register(name="math-code")
    """
    if kind not in KINDS:
        raise Incompatible(f"unknown composition kind {kind!r} (known: {', '.join(KINDS)})")
    if kind != "sum" and (strategy != "exact" or rank is not None or density is not None):
        raise Incompatible(f"strategy, rank and density apply to weighted sums (kind='sum'), not to a {kind}")
    if kind != "mixture" and router is not None:
        raise Incompatible(f"router applies to kind='mixture', not to a {'weighted sum' if kind == 'sum' else kind}")
    auto = isinstance(weights, str) and weights == "auto"
    if auto and kind != "sum":
        raise Incompatible(f"weights='auto' fits a weighted sum (kind='sum'), not a {kind}")
    if not auto and (examples or data is not None or search is not None or base is not None):
        raise Incompatible("examples, data, search and base apply to fitting the weights (weights='auto')")
    settings = _search_config(search)
    members = resolve(inputs, None if auto else weights, hub=hub)
    if kind == "sum":
        options = {"strategy": strategy, "rank": rank, "density": density, "majority_sign": majority_sign,
                   "seed": seed}
        summed = WeightedSum(members, **options)  # with "auto": the strategy's own checks, before any search
        if not auto:
            return summed
        found = fit_weights(members, examples=examples, data=data, settings=settings, base=base,
                            quantize=quantize, device=device, hub=hub)
        if not any(found.weights):
            raise Incompatible("the weight search found nothing better than the base alone (every weight 0) on "
                               "these examples")
        for member, weight in zip(members, found.weights, strict=True):
            member.weight = weight
        return WeightedSum(members, **options, search=found)
    if kind == "stack":
        return Stack(members)
    return Mixture(members, router or RouterConfig())


def _search_config(search: SearchConfig | Mapping[str, Any] | str | None) -> SearchConfig:
    if search is None or isinstance(search, SearchConfig):
        return search or SearchConfig()
    if isinstance(search, str):
        return SearchConfig(method=search)
    if isinstance(search, Mapping):
        known = {f.name for f in dataclasses.fields(SearchConfig)}
        unknown = sorted(str(key) for key in search if key not in known)
        if unknown:
            raise Incompatible(f"unknown search setting {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return SearchConfig(**search)
    raise Incompatible(f"search is a SearchConfig, its fields as a dict or a method name, not a "
                       f"{type(search).__name__}")


def activate(model: nn.Module, source: str | Adapter | Composition, *, hub: Hub | None = None,
             name: str | None = None, allow_structural: bool = False) -> Active:
    """Put ``source`` onto ``model`` and return its handle (``detach()`` takes it off again).

    ``model``: any causal LM, loaded by ``hub.runtime.load_base`` or by the caller with transformers (fp32, bf16,
    fp16, bitsandbytes nf4/int8, a ``device_map`` placement, CPU or CUDA). ``source``: a registry reference
    (checked against the base it was registered on: see ``hub.runtime.identity``; the check made is logged and
    kept as the handle's ``base_check``), an artifact read from disk or the store (a PEFT adapter, or a
    stack/mixture artifact whose members are read from ``hub``'s store), or a composition from ``compose``.
    ``name`` defaults to the reference, or the method. ``allow_structural``: accept a base that matches the
    adapter's in shapes but not in weights. Raises Incompatible (another base), NotFound.
    """
    if isinstance(source, (WeightedSum, Stack, Mixture)):
        if name is None:
            return source.attach(model, allow_structural=allow_structural)
        return source.attach(model, name=name, allow_structural=allow_structural)
    base = base_name = None
    if isinstance(source, str):
        hub = default_hub(hub)
        version = hub.get(source)
        artifact = hub.load(version)
        base, base_name, name = version.base, version.base_name, name or version.ref
    elif isinstance(source, Adapter):
        artifact = source
    else:
        raise Incompatible(f"cannot activate a {type(source).__name__}: give a reference, an Adapter or a composition")
    if artifact.method == "stack":
        stack = Stack.from_adapter(artifact, hub=default_hub(hub), base=base, base_name=base_name)
        return stack.attach(model, name=name or "stack", allow_structural=allow_structural)
    if artifact.method == "mixture":
        mixture = Mixture.from_adapter(artifact, hub=default_hub(hub), base=base, base_name=base_name)
        return mixture.attach(model, name=name or "mixture", allow_structural=allow_structural)
    from hub.runtime import attach

    return attach(model, artifact, name=name, base_fingerprint=base, allow_structural=allow_structural)
