"""Listing queries that stay fast at a million versions: walks along indexes, and keyset pages.

The order of every listing (``Registry.list`` and ``Registry.compatible``):

1. ``compatible`` only: exact matches (same weights) before structural ones (same shapes);
2. with ``sort=K``: versions that have metric K, by their best value (highest; lowest for ``-K``), then those
   without it;
3. then adapter name, then version number.

Each block of that order is a *phase*, answered by one SQL query that walks an index already in the phase's
order, so a page of 20 reads about 20 rows however large the registry is:

* a **metric phase** walks ``ix_metrics_key_value`` (key K, by value), keeping each version's best row only;
* a **name phase** walks adapters by name (their unique index) and each adapter's versions by number.

A page runs the phases in order, from the cursor's, until it has ``limit + 1`` rows (the extra one tells whether
another page follows). Filters are checked per row along the walk (an EXISTS probe per metric condition and tag).

SQLite's planner has no reliable statistics (a registry that grew from empty has none, or stale ones), and with or
without them it sometimes drives these queries from a filter's index and sorts everything afterwards. So on
SQLite an ``+ 0`` or ``|| ''`` on a column takes that column's index out of the planner's hands, leaving the walk
described above as the only cheap plan. PostgreSQL plans from its own statistics (autovacuum analyzes).

A cursor (``after``) is the position of the last row returned: phase, score, name, number, as url-safe base64
of JSON, with a digest of the query it came from (a cursor from another query is refused). A later search can
use the same format: its relevance as the score, its own phases.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    exists,
    literal,
    null,
    or_,
    select,
)

from hub.errors import QueryError
from hub.registry.models import READY, AdapterRow, BaseRow, MetricRow, TagRow, VariantRow, VersionRow
from hub.registry.refs import (
    HASH_MAX,
    INT64_MAX,
    METHOD_MAX,
    Condition,
    check_int,
    check_name,
    check_text,
    parse_condition,
    parse_sort,
    shown,
)

T = TypeVar("T")

V, A, B = VersionRow, AdapterRow, BaseRow
M = MetricRow.__table__

VERSION_COLUMNS = (
    V.id, A.name, V.number, V.digest, V.method, V.rank, V.alpha, V.targets, V.config, V.recipe, B.weights_hash,
    B.shape_hash, B.architecture, B.num_parameters, V.base_name, V.size_bytes, V.created, V.status, A.description,
)

OPERATORS: dict[str, Callable[[Any, float], ColumnElement[bool]]] = {
    ">=": lambda column, value: column >= value,
    "<=": lambda column, value: column <= value,
    ">": lambda column, value: column > value,
    "<": lambda column, value: column < value,
    "=": lambda column, value: column == value,
    "!=": lambda column, value: column != value,
}
CURSOR_VERSION = 1


class Page(list[T], Generic[T]):
    """One page of results: a list, plus ``next_after``, the cursor to pass as ``after`` for the page that
    follows (None when this page is the last)."""

    def __init__(self, items: Sequence[T] = (), next_after: str | None = None) -> None:
        super().__init__(items)
        self.next_after = next_after


@dataclass(frozen=True)
class Filters:
    """What a listing keeps, checked once (every argument as ``Registry.list`` documents it)."""

    name: str | None = None
    method: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    conditions: tuple[Condition, ...] = ()
    tags: tuple[str, ...] = ()
    include_yanked: bool = False

    @classmethod
    def checked(cls, *, name: str | None, method: str | None, min_rank: int | str | None,
                max_rank: int | str | None, where: Sequence[str], tags: Sequence[str], include_yanked: bool,
                check_tags: Callable[[Sequence[str]], list[str]]) -> Filters:
        """Raises QueryError (InvalidArtifact for a malformed tag, as registration does)."""
        return cls(
            name=check_name(name) if name is not None else None,
            method=check_text(method, "method", METHOD_MAX, spaces=False).lower() if method is not None else None,
            min_rank=check_int(min_rank, "minimum rank") if min_rank is not None else None,
            max_rank=check_int(max_rank, "maximum rank") if max_rank is not None else None,
            conditions=tuple(parse_condition(text) for text in strings(where)),
            tags=tuple(check_tags(strings(tags))),
            include_yanked=bool(include_yanked),
        )


@dataclass(frozen=True)
class Position:
    """Where a row sits in a listing's order; a cursor is the Position of the last row of a page."""

    phase: int
    score: float | None
    name: str
    number: int


@dataclass(frozen=True)
class Phase:
    """One block of a listing's order: versions on ``base_ids`` (None: any base); with ``metric`` (key,
    descending) those that have it, by its best value; with ``without`` those lacking that metric."""

    base_ids: tuple[int, ...] | None
    exact: bool = False
    metric: tuple[str, bool] | None = None
    without: str | None = None


@dataclass(frozen=True)
class Listing:
    """A listing's phases, its filters, and the digest that ties its cursors to it."""

    phases: tuple[Phase, ...]
    filters: Filters
    digest: str


def strings(values: Sequence[str]) -> list[str]:
    # A bare string would be iterated character by character: a likely slip, caught here.
    return [values] if isinstance(values, str) else list(values)


def check_limit(limit: int | None) -> int | None:
    return None if limit is None else check_int(limit, "limit", maximum=INT64_MAX)


def plan(kind: str, filters: Filters, sort: str | None, base_groups: Sequence[tuple[tuple[int, ...] | None, bool]],
         identity: dict[str, Any]) -> Listing:
    """The phases of a listing over ``base_groups`` ((base ids or None for any, exact?) in the order they come).

    ``identity``: what else selects the rows (the base asked about, a weights hash), for the cursor digest.
    Raises QueryError for a malformed sort.
    """
    metric = parse_sort(sort) if sort is not None else None
    # A condition on the sort key means every matching version has it: no "without" phase to walk.
    required = metric is not None and any(c.key == metric[0] for c in filters.conditions)
    phases = []
    for base_ids, exact in base_groups:
        if metric is None:
            phases.append(Phase(base_ids, exact))
            continue
        phases.append(Phase(base_ids, exact, metric=metric))
        if not required:
            phases.append(Phase(base_ids, exact, without=metric[0]))
    described = json.dumps({"kind": kind, "filters": asdict(filters), "sort": sort, **identity}, sort_keys=True)
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    return Listing(tuple(phases), filters, digest)


def encode_cursor(listing: Listing, position: Position) -> str:
    data = {"c": CURSOR_VERSION, "q": listing.digest, **asdict(position)}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(listing: Listing, cursor: str) -> Position:
    """The Position a cursor of ``listing`` holds. Raises QueryError for a malformed cursor or another query's."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        data = json.loads(text)
        position = Position(phase=data["phase"], score=data["score"], name=data["name"], number=data["number"])
        valid = (data["c"] == CURSOR_VERSION and isinstance(position.phase, int) and isinstance(position.name, str)
                 and isinstance(position.number, int) and (position.score is None or
                                                           isinstance(position.score, (int, float))))
    except (TypeError, ValueError, KeyError, UnicodeDecodeError, binascii.Error):
        valid = False
    if not isinstance(cursor, str) or not valid:
        raise QueryError(f"invalid cursor {shown(cursor)}: pass the value a previous page gave as its next cursor")
    if data["q"] != listing.digest:
        raise QueryError("that cursor belongs to another query: page on with the same filters, sort and base")
    if not 0 <= position.phase < len(listing.phases) or (listing.phases[position.phase].metric is not None) != (
            position.score is not None):
        raise QueryError(f"invalid cursor {shown(cursor)}: pass the value a previous page gave as its next cursor")
    return position


def fetch(conn: Connection, listing: Listing, after: str | None, limit: int | None) -> tuple[list[Any], str | None]:
    """The rows of one page (VERSION_COLUMNS, ``score`` and ``exact``) and the cursor of the next page."""
    start = decode_cursor(listing, after) if after is not None else None
    if limit == 0:
        return [], None
    wanted = None if limit is None else limit + 1
    found: list[tuple[int, Any]] = []
    for index, phase in enumerate(listing.phases):
        if start is not None and index < start.phase:
            continue
        resumed = start is not None and index == start.phase
        stmt = _statement(phase, listing.filters, resumed=resumed, limited=wanted is not None,
                          sqlite=conn.dialect.name == "sqlite")
        params: dict[str, Any] = {"limit": wanted - len(found)} if wanted is not None else {}
        if resumed:
            assert start is not None
            params.update(after_score=start.score, after_name=start.name, after_number=start.number)
        found.extend((index, row) for row in conn.execute(stmt, params))
        if wanted is not None and len(found) >= wanted:
            break
    if limit is None or len(found) <= limit:
        return [row for _, row in found], None
    index, last = found[limit - 1]
    position = Position(index, last.score, last.name, last.number)
    return [row for _, row in found[:limit]], encode_cursor(listing, position)


# ------------------------------------------------------------------------------------------------ statements


@functools.lru_cache(maxsize=512)
def _statement(phase: Phase, filters: Filters, *, resumed: bool, limited: bool, sqlite: bool) -> Select[Any]:
    """The query of one phase; the cursor's position (``resumed``) and the limit are bound at execution.
    Cached: building a statement costs SQLAlchemy more than SQLite takes to run it for a page."""
    score, name, number = (bindparam("after_score", type_=Float), bindparam("after_name", type_=String),
                           bindparam("after_number", type_=Integer))
    exact = literal(phase.exact).label("exact")
    if phase.metric is None:
        stmt = select(*VERSION_COLUMNS, null().label("score"), exact).select_from(A)
        # adapters by name, then each one's versions by number: A.id + 0 forbids the reverse on SQLite.
        stmt = stmt.join(V, V.adapter_id == (A.id + 0 if sqlite else A.id)).outerjoin(B, B.id == V.base_id)
        if phase.without is not None:
            stmt = stmt.where(~exists().where(M.c.version_id == V.id, _unindexed(sqlite, M.c.key) == phase.without))
        if resumed:
            stmt = stmt.where(A.name >= name, _after_name(name, number))
        stmt = stmt.order_by(A.name, V.number)
    else:
        key, descending = phase.metric
        m, other = M.alias("sort_metric"), M.alias("better_metric")
        stmt = select(*VERSION_COLUMNS, m.c.value.label("score"), exact).select_from(m)
        if filters.name is None:
            # Walk ix_metrics_key_value in value order; `+ 0` stops SQLite from driving from the versions instead.
            stmt = stmt.join(V, V.id == (m.c.version_id + 0 if sqlite else m.c.version_id)).where(m.c.key == key)
        else:
            # One adapter's versions are few: find them by name and sort them; `|| ''` keeps SQLite off the walk.
            stmt = stmt.join(V, V.id == m.c.version_id).where(_unindexed(sqlite, m.c.key) == key)
        stmt = stmt.join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)
        # Each version once, at its best row: no row of the same key is better (ties: the lowest row id).
        better = other.c.value > m.c.value if descending else other.c.value < m.c.value
        stmt = stmt.where(~exists().where(
            other.c.version_id == m.c.version_id, _unindexed(sqlite, other.c.key) == m.c.key,
            or_(better, and_(other.c.value == m.c.value, other.c.id < m.c.id))))
        if resumed:
            # (value, name, number) after the cursor's; the first term lets the walk start at the cursor's value.
            if descending:
                stmt = stmt.where(m.c.value <= score, or_(m.c.value < score, and_(m.c.value == score,
                                                                                  _after_name(name, number))))
            else:
                stmt = stmt.where(m.c.value >= score, or_(m.c.value > score, and_(m.c.value == score,
                                                                                  _after_name(name, number))))
        stmt = stmt.order_by(m.c.value.desc() if descending else m.c.value.asc(), A.name, V.number)
    if phase.base_ids is not None:
        stmt = stmt.where(V.base_id.in_(phase.base_ids))
    if limited:
        stmt = stmt.limit(bindparam("limit", type_=Integer))
    return _filtered(stmt, filters, sqlite)


def _after_name(name: Any, number: Any) -> ColumnElement[bool]:
    return or_(A.name > name, and_(A.name == name, V.number > number))


def _unindexed(sqlite: bool, column: Any) -> Any:
    """``column || ''`` on SQLite: the same value, but SQLite cannot use an index on it for this term. Keeps a
    per-version metric probe on uq_metrics (version_id, ...) instead of walking ix_metrics_key_value."""
    return column + "" if sqlite else column


def _filtered(stmt: Select[Any], filters: Filters, sqlite: bool) -> Select[Any]:
    if filters.name is not None:
        stmt = stmt.where(A.name == filters.name)
    if filters.method is not None:
        # The method the registry records (``dora``) or one of its variants (``rslora``, ``pissa``).
        variant = exists().where(VariantRow.version_id == V.id, VariantRow.variant == filters.method)
        stmt = stmt.where(or_(V.method == filters.method, variant))
    if filters.min_rank is not None:
        stmt = stmt.where(V.rank >= filters.min_rank)
    if filters.max_rank is not None:
        stmt = stmt.where(V.rank <= filters.max_rank)
    # A probe per walked version (uq_metrics, the tags primary key): the walk stops after a page's rows.
    for cond in filters.conditions:
        clauses = [M.c.version_id == V.id, _unindexed(sqlite, M.c.key) == cond.key,
                   OPERATORS[cond.op](M.c.value, cond.value)]
        if cond.dataset is not None:
            clauses.append(M.c.dataset == cond.dataset)
        if cond.split is not None:
            clauses.append(M.c.split == cond.split)
        stmt = stmt.where(exists().where(*clauses))
    for tag in filters.tags:
        stmt = stmt.where(exists().where(TagRow.version_id == V.id, TagRow.tag == tag))
    if not filters.include_yanked:
        stmt = stmt.where(V.status == READY)
    return stmt


def base_ids(conn: Connection, weights_hash: str) -> tuple[int, ...]:
    """Ids of the bases with these weights (one, or none): versions are then filtered by ``base_id IN (...)``."""
    check_text(weights_hash, "weights hash", HASH_MAX, spaces=False)
    return tuple(conn.scalars(select(B.id).where(B.weights_hash == weights_hash).order_by(B.id)))


def matching_bases(conn: Connection, weights_hash: str | None, shape_hash: str) -> tuple[tuple[int, ...],
                                                                                         tuple[int, ...]]:
    """(exact, structural): ids of the bases with these weights, and of the others with these shapes. A base known
    by its shapes only (no ``weights_hash``) has no exact matches. One query over the few bases."""
    rows = conn.execute(select(B.id, B.weights_hash).where(
        or_(B.shape_hash == shape_hash, B.weights_hash == weights_hash) if weights_hash else B.shape_hash == shape_hash,
    ).order_by(B.id)).all()
    exact = tuple(row.id for row in rows if weights_hash and row.weights_hash == weights_hash)
    return exact, tuple(row.id for row in rows if row.id not in exact)
