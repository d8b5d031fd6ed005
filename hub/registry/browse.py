"""Small read queries the registry's web pages need beside ``Registry``'s own: counts, the newest versions, one
adapter's summary and metric history, and the versions composed from a version (its lineage children).

Each is one or two indexed queries, so a page stays fast on a registry of a million versions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import aliased

from hub.errors import NotFound
from hub.registry.models import READY, AdapterRow, BaseRow, LineageRow, MetricRow, TagRow, VersionRow
from hub.registry.refs import check_name

if TYPE_CHECKING:
    from hub.registry.service import Registry

V, A = VersionRow, AdapterRow


@dataclass(frozen=True)
class Counts:
    adapters: int
    versions: int
    bases: int


@dataclass(frozen=True)
class Brief:
    """A version in a short list: its reference, method, rank and when it was registered."""

    name: str
    number: int
    method: str
    rank: int | None
    created: datetime
    status: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


@dataclass(frozen=True)
class AdapterSummary:
    """One adapter line: its description, when it began, how many versions it has (yanked included), every tag
    any of its versions carries, and its newest version not yanked (None when all are)."""

    name: str
    description: str | None
    created: datetime
    versions: int
    tags: list[str]
    latest: int | None


@dataclass(frozen=True)
class Point:
    """One version's value of one metric."""

    number: int
    value: float


def counts(registry: Registry) -> Counts:
    def work(conn: Connection) -> Counts:
        return Counts(conn.scalar(select(func.count()).select_from(A)) or 0,
                      conn.scalar(select(func.count()).select_from(V)) or 0,
                      conn.scalar(select(func.count()).select_from(BaseRow)) or 0)

    return registry._read(work)


def recent(registry: Registry, limit: int = 10) -> list[Brief]:
    """The newest versions not yanked, newest first (walks ix_versions_created backwards)."""
    stmt = (select(A.name, V.number, V.method, V.rank, V.created, V.status).join(A, A.id == V.adapter_id)
            .where(V.status == READY).order_by(V.created.desc(), V.id.desc()).limit(limit))
    return registry._read(lambda conn: [Brief(*row) for row in conn.execute(stmt)])


def adapter_summary(registry: Registry, name: str) -> AdapterSummary:
    """Raises NotFound (QueryError for a malformed name)."""
    check_name(name)

    def work(conn: Connection) -> AdapterSummary:
        row = conn.execute(select(A.id, A.description, A.created).where(A.name == name)).first()
        if row is None:
            raise NotFound(f"no adapter named {name!r}")
        versions = conn.scalar(select(func.count()).select_from(V).where(V.adapter_id == row.id)) or 0
        tags = list(conn.scalars(select(TagRow.tag).distinct().join(V, V.id == TagRow.version_id)
                                 .where(V.adapter_id == row.id).order_by(TagRow.tag)))
        latest = conn.scalar(select(func.max(V.number)).where(V.adapter_id == row.id, V.status == READY))
        return AdapterSummary(name, row.description, row.created, versions, tags, latest)

    return registry._read(work)


def metric_history(registry: Registry, name: str, *, limit: int = 2000
                   ) -> dict[tuple[str, str | None, str | None], list[Point]]:
    """Every metric of the adapter ``name`` over its versions (yanked ones too), by (key, dataset, split), in
    version order: the values of its newest ``limit`` metric rows, so a line of many versions stays cheap."""

    def work(conn: Connection) -> dict[tuple[str, str | None, str | None], list[Point]]:
        rows = conn.execute(
            select(MetricRow.key, MetricRow.dataset, MetricRow.split, V.number, MetricRow.value)
            .join(V, V.id == MetricRow.version_id).join(A, A.id == V.adapter_id).where(A.name == name)
            .order_by(V.number.desc()).limit(limit)).all()
        series: dict[tuple[str, str | None, str | None], list[Point]] = defaultdict(list)
        for key, dataset, split, number, value in reversed(rows):
            series[(key, dataset or None, split or None)].append(Point(number, value))
        return dict(sorted(series.items(), key=lambda item: tuple(part or "" for part in item[0])))

    return registry._read(work)


def children(registry: Registry, name: str, number: int) -> list[tuple[str, float | None, str | None]]:
    """The versions composed from ``name@number``: (child ref, weight, strategy), by name and number."""
    parent_v, child_v, child_a = aliased(V), aliased(V), aliased(A)
    stmt = (select(child_a.name, child_v.number, LineageRow.weight, LineageRow.strategy)
            .select_from(LineageRow).join(parent_v, parent_v.id == LineageRow.parent_id)
            .join(A, A.id == parent_v.adapter_id).join(child_v, child_v.id == LineageRow.version_id)
            .join(child_a, child_a.id == child_v.adapter_id)
            .where(A.name == name, parent_v.number == number).order_by(child_a.name, child_v.number))
    return registry._read(lambda conn: [(f"{r[0]}@{r[1]}", r[2], r[3]) for r in conn.execute(stmt)])
