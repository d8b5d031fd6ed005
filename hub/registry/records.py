"""What the registry returns: plain dataclasses, detached from the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from hub.fingerprint import Fingerprint

if TYPE_CHECKING:
    from hub.formats.spec import AdapterSpec


@dataclass(frozen=True)
class Metric:
    """One measured value; ``dataset`` and ``split`` tell what it was measured on (both optional)."""

    key: str
    value: float
    dataset: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "dataset": self.dataset, "split": self.split}


@dataclass(frozen=True)
class Parent:
    """A version that went into a composed one, with the weight and strategy that combined it.

    As input to ``Registry.register(lineage=...)`` the parent is found by ``name`` and ``number``; a ``digest``,
    when given, must match (it guards against recording the wrong parent).
    """

    name: str
    number: int
    digest: str | None = None
    weight: float | None = None
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "number": self.number, "ref": self.ref, "digest": self.digest,
                "weight": self.weight, "strategy": self.strategy, "params": self.params}


@dataclass(frozen=True)
class VersionInfo:
    name: str
    number: int
    digest: str
    method: str
    rank: int | None
    alpha: float | None
    targets: list[str]
    config: dict[str, Any]
    base: Fingerprint | None
    base_name: str | None
    size_bytes: int
    created: datetime
    status: str
    metrics: list[Metric] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    parents: list[Parent] = field(default_factory=list)
    description: str | None = None
    recipe: dict[str, Any] | None = None
    # Variants and initializations of the method (``rslora``, ``pissa``...): ``hub.methods.base.Method.variants``.
    variants: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    def metric(self, key: str, *, dataset: str | None = None, split: str | None = None) -> float | None:
        """The value of ``key`` (on ``dataset``/``split`` when given; else the first one recorded), or None."""
        for m in self.metrics:
            if m.key == key and dataset in (None, m.dataset) and split in (None, m.split):
                return m.value
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``--json`` output)."""
        base = None
        if self.base is not None:
            base = {"weights_hash": self.base.weights_hash, "shape_hash": self.base.shape_hash,
                    "architecture": self.base.architecture, "num_parameters": self.base.num_parameters}
        return {
            "ref": self.ref,
            "name": self.name,
            "number": self.number,
            "digest": self.digest,
            "method": self.method,
            "variants": list(self.variants),
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "config": self.config,
            "base": base,
            "base_name": self.base_name,
            "size_bytes": self.size_bytes,
            "created": self.created.isoformat(),
            "status": self.status,
            "description": self.description,
            "recipe": self.recipe,
            "metrics": [m.to_dict() for m in self.metrics],
            "aliases": list(self.aliases),
            "tags": list(self.tags),
            "parents": [p.to_dict() for p in self.parents],
        }


@dataclass(frozen=True)
class NewVersion:
    """One version to record (``Registry.register_many``); the fields are ``Registry.register``'s arguments.
    ``revision`` is filled in by the registry (the base revision its config names)."""

    name: str
    digest: str
    spec: AdapterSpec
    config: dict[str, Any]
    size_bytes: int
    base: Fingerprint | None
    base_name: str | None
    metrics: tuple[Metric, ...] = ()
    tags: tuple[str, ...] = ()
    lineage: tuple[Parent, ...] = ()
    description: str | None = None
    number: int | None = None
    recipe: dict[str, Any] | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Registered:
    version: VersionInfo
    created: bool


@dataclass(frozen=True)
class Match:
    """A compatible version: ``exact`` when its base has the same weights, else structural (same shapes)."""

    version: VersionInfo
    exact: bool


@dataclass(frozen=True)
class Remote:
    """A Hub repository tag and commit that hold a version."""

    repo_id: str
    tag: str
    commit: str
    pushed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "tag": self.tag, "commit": self.commit,
                "pushed_at": self.pushed_at.isoformat()}


@dataclass(frozen=True)
class Deleted:
    """What ``Registry.delete`` removed: the version as it was, the Hub copies that remain (``remotes``), the
    versions whose lineage lost it as a parent (``detached``, only when forced), and whether another version
    still uses its artifact (else garbage collection may remove the artifact)."""

    version: VersionInfo
    remotes: list[Remote]
    detached: list[str]
    artifact_referenced: bool

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.version.ref, "digest": self.version.digest, "size_bytes": self.version.size_bytes,
                "remotes": [r.to_dict() for r in self.remotes], "detached": list(self.detached),
                "artifact_referenced": self.artifact_referenced}


@dataclass(frozen=True)
class LineageEdge:
    """``child`` was composed from ``parent``; ``depth`` 1 for the version asked about, 2 for its grandparents..."""

    child: str
    parent: Parent
    position: int
    depth: int


@dataclass(frozen=True)
class BaseInfo:
    """A known base model, the names it was registered under and how many versions sit on it."""

    fingerprint: Fingerprint
    names: list[str]
    versions: int
    created: datetime
