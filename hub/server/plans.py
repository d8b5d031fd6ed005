"""What a request runs, and the adapters attached to the served model.

A ``Plan`` names adapters by digest with a weight each (always on: a plain adapter, a merged sum, a stack, a
per-request weighted list) and at most one gated mixture (experts by digest plus the trained gate). Digests, not
names, because the content behind a digest never changes: ``date@prod`` may move to another version between two
requests, but a digest is the same adapter forever, so it is attached once and shared by every plan that uses it.

``Resolver`` turns what a request names (``date``, ``date@3``, ``date@prod``, the base, or ``adapters: [...]``)
into a plan, checking that every version was registered on the served base, and reads the artifacts the model does
not hold yet (from the store, or the version's recorded remote), so the model's thread never waits on a download.

``AdapterCache`` holds the adapters attached to the model, at most ``max_loaded``, least recently used first out.
An adapter that a running or admitted row uses is pinned (reference counted) and never detached under it. It is
touched only by the scheduler's thread, between forwards.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.errors import Incompatible, InvalidArtifact, NotFound
from hub.server.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

    from hub.client import Hub
    from hub.fingerprint import Fingerprint
    from hub.formats import Adapter
    from hub.registry import VersionInfo
    from hub.server.metrics import Metrics

log = logging.getLogger(__name__)

# Resolved versions kept by digest (their members, a mixture's gate): a few KB each, no adapter tensors.
RESOLVED_CACHE_SIZE = 256
# The name an adapter is attached under: its digest, so two references to the same content share one attachment.
ATTACH_PREFIX = "serve-"


@dataclass(frozen=True, eq=False)
class MixturePlan:
    """A gated mixture: experts (digest, member weight) and the gate that weights them per layer, and per token or
    per sequence (``routing``, ``hub.composition.router``)."""

    digest: str
    experts: tuple[tuple[str, float], ...]
    gate: torch.nn.Module
    layers: tuple[str, ...]  # decoder layer paths, in the gate's layer order
    temperature: float
    top_k: int | None
    routing: str = "token"


@dataclass(frozen=True)
class Resolved:
    """One registry version as something to run: always-on members and/or a mixture."""

    members: tuple[tuple[str, float], ...] = ()
    mixture: MixturePlan | None = None


@dataclass(eq=False)
class Plan:
    """What one request runs. ``model`` is the id the client asked for (echoed back); ``artifacts`` holds the
    adapters read for this request that were not attached when it was resolved."""

    model: str
    members: tuple[tuple[str, float], ...] = ()
    mixture: MixturePlan | None = None
    artifacts: dict[str, Adapter] = field(default_factory=dict, repr=False)

    @property
    def digests(self) -> list[str]:
        """Every adapter this plan needs attached, each once."""
        experts = self.mixture.experts if self.mixture is not None else ()
        return list(dict.fromkeys(digest for digest, _ in (*self.members, *experts)))


def attached_name(digest: str) -> str:
    return ATTACH_PREFIX + digest[:24]


class Resolver:
    """Registry references → plans, for one served base. Thread-safe (request handlers run it in worker threads)."""

    def __init__(self, hub: Hub, base: Fingerprint, model_id: str, cache: AdapterCache):
        self.hub, self.base, self.model_id, self.cache = hub, base, model_id, cache
        self._lock = threading.Lock()
        self._resolved: OrderedDict[str, Resolved] = OrderedDict()

    def plan(self, model: str, adapters: Sequence[tuple[str, float]] | None = None) -> Plan:
        """The plan for a request's ``model`` and optional per-request ``adapters`` [(reference, weight)]: those run
        as a weighted stack on the base (``model`` must then name the base). Raises NotFound (404), Incompatible,
        InvalidRequest (400)."""
        if adapters:
            if model != self.model_id:
                raise InvalidRequest(f"with 'adapters', 'model' must name the base {self.model_id!r}, not {model!r}")
            return self._weighted(model, adapters)
        if model == self.model_id:
            return Plan(model=model)
        version = self._version(model)
        resolved = self._resolve(version)
        plan = Plan(model=model, members=resolved.members, mixture=resolved.mixture)
        self._read_artifacts(plan)
        return plan

    def _weighted(self, model: str, adapters: Sequence[tuple[str, float]]) -> Plan:
        members: dict[str, float] = {}
        for ref, weight in adapters:
            resolved = self._resolve(self._version(ref))
            if resolved.mixture is not None:
                raise InvalidRequest(f"{ref} is a gated mixture: a per-request list takes adapters, merged sums and "
                                     "stacks (name the mixture as 'model' to run it)")
            for digest, member_weight in resolved.members:
                if digest in members:
                    raise InvalidRequest(f"{ref} repeats an adapter already in the list; list each adapter once")
                members[digest] = weight * member_weight
        plan = Plan(model=model, members=tuple(members.items()))
        self._read_artifacts(plan)
        return plan

    def _version(self, ref: str) -> VersionInfo:
        try:
            version = self.hub.get(ref)
        except NotFound:
            raise NotFound(f"the model {ref!r} does not exist: it is neither the base {self.model_id!r} nor a "
                           "registered adapter (GET /v1/models lists them)") from None
        if version.base is None or version.base.weights_hash != self.base.weights_hash:
            where = f"base {version.base_name or version.base.weights_hash[:12]}" if version.base else "no known base"
            raise Incompatible(f"{version.ref} is an adapter for {where}; this server serves {self.model_id!r}")
        return version

    def _resolve(self, version: VersionInfo) -> Resolved:
        """The version's members (and gate), cached by digest: immutable content needs reading once."""
        with self._lock:
            cached = self._resolved.get(version.digest)
            if cached is not None:
                self._resolved.move_to_end(version.digest)
                return cached
        resolved = self._read(version)
        with self._lock:
            self._resolved[version.digest] = resolved
            while len(self._resolved) > RESOLVED_CACHE_SIZE:
                self._resolved.popitem(last=False)
        return resolved

    def _read(self, version: VersionInfo) -> Resolved:
        from hub.composition import Mixture, Stack

        if version.method == "stack":
            stack = Stack.from_adapter(self.hub.load(version), hub=self.hub, base=version.base,
                                       base_name=version.base_name)
            return Resolved(members=tuple((m.digest, m.weight) for m in stack.members))
        if version.method == "mixture":
            mixture = Mixture.from_adapter(self.hub.load(version), hub=self.hub, base=version.base,
                                           base_name=version.base_name)
            if mixture.router.kind != "layerwise":
                raise InvalidRequest(f"{version.ref} has a {mixture.router.kind} router; the server runs layerwise "
                                     "mixtures (their gates need no second pass and no second KV cache)")
            gate = mixture.module.eval().requires_grad_(False)
            plan = MixturePlan(digest=version.digest, experts=tuple((m.digest, m.weight) for m in mixture.experts),
                               gate=gate, layers=tuple(mixture.layers), temperature=mixture.router.temperature,
                               top_k=mixture.router.top_k, routing=mixture.router.routing)
            return Resolved(mixture=plan)
        return Resolved(members=((version.digest, 1.0),))

    def _read_artifacts(self, plan: Plan) -> None:
        """Read (or fetch) the adapters the model does not hold yet, here on the request's thread."""
        digests = plan.digests
        if len(digests) > self.cache.max_loaded:
            raise InvalidRequest(f"{plan.model} needs {len(digests)} adapters at once; this server holds at most "
                                 f"{self.cache.max_loaded} (--max-loaded)")
        for digest in digests:
            if not self.cache.holds(digest):
                plan.artifacts[digest] = self.hub.artifact(digest)


@dataclass
class _Entry:
    handle: Any
    users: int = 0  # rows (and pins) using it: never detached while above zero


class AdapterCache:
    """The adapters attached to the served model, by digest, least recently used first. See the module docstring.

    ``names()`` is the order of the gate columns: every attached adapter, so the route's adapter set (and the
    stacked factors each site caches for it) changes only when an adapter is attached or detached.
    """

    def __init__(self, model: torch.nn.Module, hub: Hub, max_loaded: int, metrics: Metrics):
        self.model, self.hub, self.max_loaded, self.metrics = model, hub, max_loaded, metrics
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def holds(self, digest: str) -> bool:
        # Read from request threads: a stale answer only means an artifact is read that was not needed, or read
        # again on the scheduler's thread (acquire), never a wrong result.
        return digest in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(attached_name(digest) for digest in self._entries)

    def acquire(self, plan: Plan) -> bool:
        """Attach what ``plan`` needs (detaching unused adapters for room) and pin it. False when there is no room
        while other rows use the adapters attached: the request waits. Raises what attaching raises."""
        needed = plan.digests
        missing = [digest for digest in needed if digest not in self._entries]
        if not self._make_room(len(missing), keep=set(needed)):
            return False
        for digest in needed:
            if digest in self._entries:
                self.metrics.adapter_cache.labels("hit").inc()
                continue
            self.metrics.adapter_cache.labels("miss").inc()
            self._attach(digest, plan.artifacts.get(digest))
        for digest in needed:
            self._entries[digest].users += 1
            self._entries.move_to_end(digest)
        plan.artifacts.clear()  # attached now: the request no longer holds the CPU copies
        return True

    def release(self, plan: Plan) -> None:
        for digest in plan.digests:
            entry = self._entries.get(digest)
            if entry is not None:
                entry.users -= 1

    def pin(self, plan: Plan) -> None:
        """Keep the plan's adapters attached until ``release(plan)`` (vLLM's load_lora_adapter): one use each, like
        a running row's, so adapters loaded under several names stay until the last of them is unloaded. Raises
        InvalidRequest when every attached adapter is in use."""
        if not self.acquire(plan):
            raise InvalidRequest(f"no room to load {plan.model}: every attached adapter is in use (--max-loaded "
                                 f"{self.max_loaded}); try again later")

    def _make_room(self, count: int, keep: set[str]) -> bool:
        free = self.max_loaded - len(self._entries)
        idle = [d for d, entry in self._entries.items() if entry.users == 0 and d not in keep]
        if free + len(idle) < count:
            return False
        for digest in idle[: max(0, count - free)]:  # least recently used first
            self._detach(digest)
        return True

    def _attach(self, digest: str, adapter: Adapter | None) -> None:
        from hub.runtime import attach

        if adapter is None:  # detached since the request was resolved: read it again (from the local store now)
            adapter = self.hub.artifact(digest)
        try:
            # Every version was checked against the served base when resolved; attach checks shapes and targets.
            handle = attach(self.model, adapter, name=attached_name(digest))
        except (Incompatible, InvalidArtifact) as exc:
            raise InvalidRequest(f"adapter {digest[:12]} does not fit the served model: {exc}") from None
        self._entries[digest] = _Entry(handle)
        self.metrics.loaded_adapters.set(len(self._entries))
        log.info("attached adapter %s (%d of at most %d attached)", digest[:12], len(self._entries), self.max_loaded)

    def _detach(self, digest: str) -> None:
        entry = self._entries.pop(digest)
        entry.handle.detach()
        self.metrics.adapter_cache.labels("eviction").inc()
        self.metrics.loaded_adapters.set(len(self._entries))
        log.info("detached adapter %s (least recently used)", digest[:12])

    def digests(self) -> Iterable[str]:
        return list(self._entries)
