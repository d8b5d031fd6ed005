"""The inputs of a composition: registered versions or in-memory adapters, each with its weight.

Shared by every kind of composition: resolving references through a Hub, checking the weights and that the inputs
share a base, reading members back from a composition artifact, and registering a result with its lineage.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.errors import Incompatible, NotFound
from hub.fingerprint import Fingerprint
from hub.formats import Adapter, adapter_digest
from hub.formats.composition import member_entry
from hub.formats.spec import COMPOSITION_METHODS
from hub.registry import Metric, Parent, Registered

if TYPE_CHECKING:
    from hub.client import Hub

Input = str | Adapter  # a registry reference ("math", "math@2", "math@prod") or an adapter in memory


@dataclass
class Member:
    """One input of a composition: its adapter and weight, and which registered version it is (when it is one)."""

    adapter: Adapter
    weight: float = 1.0
    name: str | None = None
    number: int | None = None
    base: Fingerprint | None = None
    base_name: str | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = adapter_digest(self.adapter)

    @property
    def label(self) -> str:
        """``name@number`` for a registered version, else the method and a digest prefix."""
        if self.name is not None and self.number is not None:
            return f"{self.name}@{self.number}"
        return f"{self.adapter.method}-{self.digest[:8]}"

    def to_dict(self) -> dict[str, Any]:
        return member_entry(name=self.name, number=self.number, digest=self.digest, weight=self.weight)

    def parent(self, strategy: str, params: Mapping[str, Any] | None = None) -> Parent | None:
        """This member as a lineage parent, or None when it is not a registered version."""
        if self.name is None or self.number is None:
            return None
        return Parent(name=self.name, number=self.number, digest=self.digest, weight=self.weight, strategy=strategy,
                      params=dict(params or {}))


def default_hub(hub: Hub | None) -> Hub:
    if hub is not None:
        return hub
    from hub.client import Hub

    return Hub()


def check_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """One finite weight per input, not all zero; ``None`` means 1.0 each."""
    if count == 0:
        raise Incompatible("nothing to compose: the list of adapters is empty")
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise Incompatible(f"weights must be a list of numbers, not {weights!r}")
    if len(weights) != count:
        raise Incompatible(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
    values = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise Incompatible(f"weight #{index} is {weight!r}, not a finite number")
        values.append(float(weight))
    if not any(values):
        raise Incompatible("all weights are zero: the composition would do nothing")
    return values


def resolve(inputs: Sequence[Input], weights: Sequence[float] | None, *, hub: Hub | None) -> list[Member]:
    """Members for ``inputs`` (registry references and/or adapters) with their weights; refs load through ``hub``
    (default: ``Hub()`` from the environment)."""
    if isinstance(inputs, (str, Adapter)) or not isinstance(inputs, Sequence):
        raise Incompatible("compose takes a list of adapters, e.g. compose(['math@2', 'code'])")
    values = check_weights(len(inputs), weights)
    members = []
    for item, weight in zip(inputs, values, strict=True):
        if isinstance(item, Adapter):
            member = Member(item, weight)
        elif isinstance(item, str):
            hub = default_hub(hub)
            version = hub.get(item)
            member = Member(hub.artifact(version.digest), weight, version.name, version.number,
                            version.base, version.base_name)
        else:
            raise Incompatible(f"cannot compose a {type(item).__name__}: give registry references or Adapters")
        if member.adapter.method in COMPOSITION_METHODS:
            raise Incompatible(
                f"{member.label} is a {member.adapter.method}; compositions do not nest: compose its members directly"
            )
        members.append(member)
    return members


def check_distinct(members: Sequence[Member], what: str) -> None:
    """A stack or mixture runs each adapter once: the same adapter twice is a mistake, not a double weight."""
    seen: dict[str, Member] = {}
    for member in members:
        if member.digest in seen:
            raise Incompatible(f"{member.label} appears twice in the {what}; list each adapter once")
        seen[member.digest] = member


def common_base(members: Iterable[Member]) -> Fingerprint | None:
    """The base every member was registered on (None when none says); refuses members of different bases."""
    first: Member | None = None
    for member in members:
        if member.base is None:
            continue
        if first is None:
            first = member
        elif member.base.weights_hash != first.base.weights_hash:
            raise Incompatible(
                f"{first.label} is an adapter for base {_describe(first.base)} but {member.label} is for "
                f"{_describe(member.base)}: compose adapters of one base"
            )
    return first.base if first is not None else None


def _describe(base: Fingerprint) -> str:
    return f"{base.weights_hash[:12]} ({base.architecture})"


def load_members(
    entries: Iterable[Mapping[str, Any]], *, hub: Hub, base: Fingerprint | None = None, base_name: str | None = None
) -> list[Member]:
    """Members from their ``to_dict()`` entries (as a composition artifact lists them), read from ``hub``'s store
    by digest, on the composition's base."""
    members = []
    for entry in entries:
        digest = entry["digest"]
        try:
            adapter = hub.artifact(digest)  # fetched from a recorded remote when this machine lacks it
        except NotFound:
            who = f"{entry['name']}@{entry['number']}" if entry["name"] else digest[:12]
            raise NotFound(f"member {who} (digest {digest[:12]}) is not in the store: register or pull it first"
                           ) from None
        member = Member(adapter, entry["weight"], entry["name"], entry["number"], base,
                        base_name)
        members.append(member)
    return members


def register_composition(
    hub: Hub | None,
    artifact: Adapter,
    members: Sequence[Member],
    *,
    name: str,
    strategy: str,
    params: Mapping[str, Any],
    recipe: Mapping[str, Any],
    store_members: bool,
    base: Fingerprint | Any | None,
    metrics: Mapping[str, float] | Iterable[Metric],
    tags: Iterable[str],
    description: str | None,
) -> Registered:
    """Register a composition's artifact with its members as lineage parents (the registered ones).

    ``store_members``: the artifact refers to its members by digest (stack, mixture), so they must be in the store
    too, also when they were given in memory. ``base`` defaults to the members' common base.
    """
    hub = default_hub(hub)
    if base is None:
        base = common_base(members)
    # The members' base name (a folder or Hub id), so a composition can be evaluated without naming its base.
    base_name = next((m.base_name for m in members if m.base_name), None) if isinstance(base, Fingerprint) else None
    lineage = [p for p in (m.parent(strategy, params) for m in members) if p is not None]
    # The members' locks are held from their store writes until the composition's version commits: a garbage
    # collection in between would see them unreferenced.
    with hub.store.reserve(*(m.digest for m in members if store_members)):
        if store_members:
            for member in members:
                hub.store.put(member.adapter, digest=member.digest)
        return hub.register(artifact, name=name, base=base, base_name=base_name, metrics=metrics, tags=tags,
                            lineage=lineage, description=description, recipe=dict(recipe))
