"""The Registry service: versions of named adapters, their bases, metrics, aliases, lineage, tags and remotes.

Every call is one transaction. Writers serialize per adapter (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the
adapter row is locked ``FOR UPDATE``), so version numbers are gap-free and unique under concurrent registration;
lock waits and races are retried inside (``with_retries``) and never reach the caller.

Queries are SQL: filters become WHERE/EXISTS clauses, a metric sort a correlated subquery, and a list of N
versions costs five round trips (the versions, then their metrics, aliases, tags and parents in batches).
"""

from __future__ import annotations

import difflib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from hub.config import load_settings
from hub.errors import Conflict, IntegrityError, InvalidArtifact, NotFound, QueryError
from hub.fingerprint import Fingerprint
from hub.formats.composition import member_key
from hub.registry.database import check_schema, make_engine, with_retries
from hub.registry.models import (
    READY,
    YANKED,
    AdapterRow,
    AliasRow,
    BaseNameRow,
    BaseRow,
    LineageRow,
    MetricRow,
    RemoteRow,
    TagRow,
    VersionRow,
    utcnow,
)
from hub.registry.records import (
    BaseInfo,
    Deleted,
    LineageEdge,
    Match,
    Metric,
    Parent,
    Registered,
    Remote,
    VersionInfo,
)
from hub.registry.refs import (
    ALIAS_MAX,
    ARCHITECTURE_MAX,
    BASE_NAME_MAX,
    COMMIT_MAX,
    HASH_MAX,
    INT32_MAX,
    INT64_MAX,
    METHOD_MAX,
    REMOTE_TAG_MAX,
    REPO_ID_MAX,
    REVISION_MAX,
    STRATEGY_MAX,
    TAG_MAX,
    Condition,
    check_alias,
    check_dataset,
    check_description,
    check_int,
    check_metric_key,
    check_name,
    check_split,
    check_text,
    check_value,
    parse_condition,
    parse_ref,
    parse_sort,
    shown,
)

if TYPE_CHECKING:
    from hub.formats.spec import AdapterSpec

T = TypeVar("T")

DIGEST = re.compile(r"[0-9a-f]{64}")
COMPOSITIONS = ("stack", "mixture")

V, A, B = VersionRow, AdapterRow, BaseRow

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


class Registry:
    """The versioned registry over one database.

    >>> registry = Registry()                       # $HUB_DATABASE_URL, else SQLite at $HUB_HOME/registry.db
    >>> registry.get("math-lora@prod").digest
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or load_settings().database_url
        self.engine = make_engine(self.url)
        try:
            check_schema(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, work: Callable[[Connection], T]) -> T:
        return with_retries(self.engine, work, write=False)

    def _write(self, work: Callable[[Connection], T]) -> T:
        return with_retries(self.engine, work, write=True)

    # ----------------------------------------------------------------------------------------------- writing

    def check_registration(
        self,
        name: str,
        *,
        digest: str,
        spec: AdapterSpec,
        config: dict[str, Any],
        size_bytes: int,
        base: Fingerprint | None,
        base_name: str | None,
        metrics: Iterable[Metric] = (),
        tags: Iterable[str] = (),
        lineage: Iterable[Parent] = (),
        description: str | None = None,
        number: int | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> tuple[list[Metric], list[str], list[Parent]]:
        """Every check ``register`` makes before it touches the database, with its arguments; the checked metrics,
        tags and parents. Callers run it before storing anything, so a refused registration writes nothing.
        Raises QueryError or InvalidArtifact (one line naming the field)."""
        check_name(name)
        if number is not None:
            check_int(number, "version number", minimum=1)
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise InvalidArtifact(f"digest {shown(digest)} is not a lowercase sha256 hex string")
        _check_spec(spec, size_bytes)
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArtifact(f"adapter config of {name!r} is not plain JSON: {exc}") from None
        try:
            json.dumps(recipe, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise QueryError(f"recipe of {name!r} is not plain JSON: {exc}") from None
        if description is not None:
            check_description(description)
        if base is not None:
            _check_fingerprint(base)
        if base_name is not None:
            check_text(base_name, "base name", BASE_NAME_MAX)
        metric_list = _check_metrics(metrics)
        tag_list = _check_tags(tags)
        parents = [_check_parent(parent) for parent in lineage]
        revision = config.get("revision") if isinstance(config.get("revision"), str) else None
        if revision:
            check_text(revision, "base revision", REVISION_MAX, spaces=False)
        return metric_list, tag_list, parents

    def register(
        self,
        name: str,
        *,
        digest: str,
        spec: AdapterSpec,
        config: dict[str, Any],
        size_bytes: int,
        base: Fingerprint | None,
        base_name: str | None,
        metrics: Iterable[Metric] = (),
        tags: Iterable[str] = (),
        lineage: Iterable[Parent] = (),
        description: str | None = None,
        number: int | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> Registered:
        """Record ``digest`` as the next version of ``name``; the same digest again returns the existing version
        (``created=False``), with any metrics and tags given added to it.

        ``number`` asks for a specific version number (a pull keeps the number the version has upstream); it
        is a Conflict when another artifact already holds it. Without it, the next number after the highest.
        ``recipe`` records how the version was made (plain JSON, e.g. a training recipe).
        """
        metric_list, tag_list, parents = self.check_registration(
            name, digest=digest, spec=spec, config=config, size_bytes=size_bytes, base=base, base_name=base_name,
            metrics=metrics, tags=tags, lineage=lineage, description=description, number=number, recipe=recipe)
        revision = config.get("revision") if isinstance(config.get("revision"), str) else None

        def work(conn: Connection) -> Registered:
            adapter_id = self._lock_adapter(conn, name, description)
            existing = conn.scalar(select(V.id).where(V.adapter_id == adapter_id, V.digest == digest))
            if existing is not None:
                _upsert_metrics(conn, existing, metric_list)
                _add_tags(conn, existing, tag_list)
                return Registered(self._load(conn, [existing])[0], created=False)
            if number is None:
                # After the highest number ever given, deleted versions included: a number never comes back
                # with other content (a pushed repository keeps its tag v<N> for good).
                highest = conn.scalar(select(func.max(V.number)).where(V.adapter_id == adapter_id)) or 0
                chosen = max(highest, conn.scalar(select(A.last_number).where(A.id == adapter_id)) or 0) + 1
                if chosen > INT32_MAX:
                    raise QueryError(f"{name} has used every version number up to {INT32_MAX}")
            else:
                taken = conn.scalar(select(V.digest).where(V.adapter_id == adapter_id, V.number == number))
                if taken is not None:
                    raise Conflict(f"{name}@{number} already exists with another artifact (digest {taken[:12]})")
                chosen = number
            base_id = _base_id(conn, base, base_name, revision) if base is not None else None
            version_id = conn.execute(
                V.__table__.insert().returning(V.id),
                dict(adapter_id=adapter_id, number=chosen, digest=digest, method=spec.method, rank=spec.rank,
                     alpha=spec.alpha, targets=list(spec.targets), config=config, recipe=recipe, base_id=base_id,
                     base_name=base_name, size_bytes=int(size_bytes), created=utcnow(), status=READY),
            ).scalar_one()
            conn.execute(update(A).where(A.id == adapter_id, A.last_number < chosen).values(last_number=chosen))
            _upsert_metrics(conn, version_id, metric_list)
            _add_tags(conn, version_id, tag_list)
            for position, parent in enumerate(parents):
                conn.execute(LineageRow.__table__.insert(), dict(
                    version_id=version_id, parent_id=_parent_id(conn, parent), weight=parent.weight,
                    strategy=parent.strategy, position=position, params=dict(parent.params)))
            return Registered(self._load(conn, [version_id])[0], created=True)

        return self._write(work)

    def _lock_adapter(self, conn: Connection, name: str, description: str | None) -> int:
        """The adapter's id, creating the row if needed, locked until the transaction ends."""
        # FOR UPDATE serializes writers of one adapter on PostgreSQL (SQLite's BEGIN IMMEDIATE already has).
        locked = select(A.id, A.description).where(A.name == name).with_for_update()
        row = conn.execute(locked).first()
        if row is None:
            # Two first registrations at once: one insert wins, the other does nothing and both lock that row.
            _insert_ignore(conn, A, dict(name=name, description=description, created=utcnow()), ["name"])
            row = conn.execute(locked).one()
        adapter_id, current = row
        if description is not None and description != current:
            conn.execute(update(A).where(A.id == adapter_id).values(description=description))
        return adapter_id

    def set_alias(self, ref: str, alias: str) -> VersionInfo:
        """Point ``name@alias`` at the version ``ref``, moving the alias if it pointed elsewhere."""
        check_alias(alias)

        def work(conn: Connection) -> VersionInfo:
            version_id = _resolve_for_update(conn, ref)
            adapter_id = conn.scalar(select(V.adapter_id).where(V.id == version_id))
            _upsert(conn, AliasRow, [dict(adapter_id=adapter_id, alias=alias, version_id=version_id)],
                    ["adapter_id", "alias"], ["version_id"])
            return self._load(conn, [version_id])[0]

        return self._write(work)

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias`` (``hub unalias``); the version it pointed at stays. Raises NotFound."""
        check_name(name)
        check_text(alias, "alias", ALIAS_MAX, spaces=False)  # old registries may hold aliases check_alias refuses

        def work(conn: Connection) -> None:
            deleted = conn.execute(AliasRow.__table__.delete().where(
                AliasRow.alias == alias, AliasRow.adapter_id == select(A.id).where(A.name == name).scalar_subquery()))
            if deleted.rowcount == 0:
                raise NotFound(f"{name} has no alias {alias!r}")

        self._write(work)

    def yank(self, ref: str) -> VersionInfo:
        """Hide a version from lists, ``compatible`` and ``@latest``; it stays reachable by number and alias."""
        return self._set_status(ref, YANKED)

    def unyank(self, ref: str) -> VersionInfo:
        """Undo ``yank``: the version is listed again and may be ``@latest`` (a no-op when it is not yanked)."""
        return self._set_status(ref, READY)

    def _set_status(self, ref: str, status: str) -> VersionInfo:
        def work(conn: Connection) -> VersionInfo:
            version_id = _resolve_for_update(conn, ref)
            conn.execute(update(V).where(V.id == version_id).values(status=status))
            return self._load(conn, [version_id])[0]

        return self._write(work)

    def delete(self, ref: str, *, force: bool = False) -> Deleted:
        """Delete one version (``name@N`` or ``name@alias``: never a bare name, which would mean whichever is
        latest) with its metrics, aliases, tags and records of remotes. Its artifact stays in the store until
        garbage collection finds no version refers to it; copies pushed to a Hub repository stay there.

        Refused (Conflict) while another version's lineage names it as a parent, unless ``force``: then those
        lineage edges are removed and reported in ``Deleted.detached``. Its number is not given out again.
        Raises NotFound, QueryError (a bare name), Conflict.
        """
        parsed = parse_ref(ref)
        if parsed.number is None and parsed.alias is None:
            raise QueryError(f"say which version of {parsed.name} to delete: {parsed.name}@N or {parsed.name}@ALIAS")

        def work(conn: Connection) -> Deleted:
            version_id = _resolve_for_update(conn, ref)
            adapter_id = conn.scalar(select(V.adapter_id).where(V.id == version_id))
            version = self._load(conn, [version_id])[0]
            child_v, child_a = aliased(V), aliased(A)
            children = [f"{row.name}@{row.number}" for row in conn.execute(
                select(child_a.name, child_v.number).select_from(LineageRow)
                .join(child_v, child_v.id == LineageRow.version_id).join(child_a, child_a.id == child_v.adapter_id)
                .where(LineageRow.parent_id == version_id).distinct().order_by(child_a.name, child_v.number))]
            if children and not force:
                raise Conflict(f"{version.ref} is a lineage parent of {', '.join(children)}; delete those first, "
                               "or force it (their lineage then loses this parent)")
            remotes = [Remote(r.repo_id, r.tag, r.commit, r.pushed_at) for r in conn.execute(
                select(RemoteRow.repo_id, RemoteRow.tag, RemoteRow.commit, RemoteRow.pushed_at)
                .where(RemoteRow.version_id == version_id).order_by(RemoteRow.pushed_at, RemoteRow.repo_id))]
            # Explicit deletes rather than ON DELETE CASCADE alone: the same on a connection without foreign keys.
            conn.execute(delete(LineageRow).where(LineageRow.parent_id == version_id))
            for model in (MetricRow, AliasRow, TagRow, RemoteRow, LineageRow):
                conn.execute(delete(model).where(model.version_id == version_id))
            conn.execute(update(A).where(A.id == adapter_id, A.last_number < version.number)
                         .values(last_number=version.number))
            conn.execute(delete(V).where(V.id == version_id))
            still_used = _digest_referenced(conn, version.digest)
            return Deleted(version=version, remotes=remotes, detached=children, artifact_referenced=still_used)

        return self._write(work)

    def add_metrics(self, ref: str, metrics: Iterable[Metric]) -> VersionInfo:
        """Add metrics to a version; a metric with the same key, dataset and split is replaced."""
        metric_list = _check_metrics(metrics)

        def work(conn: Connection) -> VersionInfo:
            version_id = _resolve_for_update(conn, ref)
            _upsert_metrics(conn, version_id, metric_list)
            return self._load(conn, [version_id])[0]

        return self._write(work)

    def record_remote(self, ref: str, *, repo_id: str, tag: str, commit: str) -> Remote:
        """Remember that the version ``ref`` was pushed to ``repo_id`` as ``tag`` at ``commit``."""
        check_text(repo_id, "remote repo id", REPO_ID_MAX, spaces=False)
        check_text(tag, "remote tag", REMOTE_TAG_MAX, spaces=False)
        check_text(commit, "remote commit", COMMIT_MAX, spaces=False)
        now = utcnow()

        def work(conn: Connection) -> Remote:
            version_id = _resolve_for_update(conn, ref)
            _upsert(conn, RemoteRow, [dict(version_id=version_id, repo_id=repo_id, tag=tag, commit=commit,
                                           pushed_at=now)], ["version_id", "repo_id", "tag"], ["commit", "pushed_at"])
            return Remote(repo_id=repo_id, tag=tag, commit=commit, pushed_at=now)

        return self._write(work)

    # ----------------------------------------------------------------------------------------------- reading

    def get(self, ref: str) -> VersionInfo:
        """``name`` or ``name@latest`` (highest version not yanked), ``name@3``, ``name@prod``."""
        return self._read(lambda conn: self._load(conn, [_resolve(conn, ref)])[0])

    def list(
        self,
        *,
        name: str | None = None,
        method: str | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        where: Sequence[str] = (),
        tags: Sequence[str] = (),
        sort: str | None = None,
        weights_hash: str | None = None,
        include_yanked: bool = False,
        limit: int | None = None,
    ) -> list[VersionInfo]:
        """Versions matching every filter given.

        ``where``: metric conditions such as ``accuracy>=0.8`` or ``accuracy@gsm8k:test>=0.8`` (operators
        ``>= <= > < = !=``); a version matches when one of its metrics satisfies each; a version without the
        metric never does. ``tags``: all of them. ``sort``: a metric name, highest first by each version's best
        (largest) value, or ``-name`` for lowest first by its smallest; versions without it come last. Without a
        sort: by name, then number.
        """
        stmt = select(*VERSION_COLUMNS)
        if weights_hash is not None:
            stmt = stmt.where(B.weights_hash == check_text(weights_hash, "weights hash", HASH_MAX, spaces=False))
        stmt = _filter(stmt, name=name, method=method, min_rank=min_rank, max_rank=max_rank, where=where,
                       tags=tags, include_yanked=include_yanked)
        stmt = stmt.order_by(*_order(sort), A.name, V.number)
        if limit is not None:
            stmt = stmt.limit(_check_limit(limit))
        return self._read(lambda conn: self._load_rows(conn, conn.execute(stmt).all()))

    def compatible(
        self,
        fingerprint: Fingerprint,
        *,
        name: str | None = None,
        method: str | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        where: Sequence[str] = (),
        tags: Sequence[str] = (),
        sort: str | None = None,
        include_yanked: bool = False,
        limit: int | None = None,
    ) -> list[Match]:
        """Versions whose base has the same weights (exact) or the same tensor names and shapes (structural).

        Exact matches first; within each group the order of ``list`` (``sort``, else name and number).
        """
        same_weights = B.weights_hash == fingerprint.weights_hash
        bases = select(B.id).where(or_(same_weights, B.shape_hash == fingerprint.shape_hash))
        exact = case((same_weights, 1), else_=0).label("exact")
        stmt = select(*VERSION_COLUMNS, exact).where(V.base_id.in_(bases.scalar_subquery()))
        stmt = _filter(stmt, name=name, method=method, min_rank=min_rank, max_rank=max_rank, where=where,
                       tags=tags, include_yanked=include_yanked)
        stmt = stmt.order_by(exact.desc(), *_order(sort), A.name, V.number)
        if limit is not None:
            stmt = stmt.limit(_check_limit(limit))

        def work(conn: Connection) -> list[Match]:
            rows = conn.execute(stmt).all()
            versions = self._load_rows(conn, rows)
            return [Match(version, exact=bool(row.exact)) for version, row in zip(versions, rows, strict=True)]

        return self._read(work)

    def find_digest(self, digest: str) -> list[VersionInfo]:
        """Every version, under any name and yanked or not, whose artifact is ``digest``."""
        stmt = _joined(select(*VERSION_COLUMNS)).where(V.digest == digest).order_by(A.name, V.number)
        return self._read(lambda conn: self._load_rows(conn, conn.execute(stmt).all()))

    def referenced_digests(self) -> set[str]:
        """Every digest the registry needs in the store: each version's artifact, and the members that stack and
        mixture artifacts name (which need not be registered versions themselves)."""

        def work(conn: Connection) -> set[str]:
            found = set(conn.scalars(select(V.digest).distinct()))
            for method, config in conn.execute(select(V.method, V.config).where(V.method.in_(COMPOSITIONS))):
                found.update(member_digests(method, config))
            return found

        return self._read(work)

    def is_referenced(self, digest: str) -> bool:
        """Whether any version is ``digest`` or names it as a composition member (see ``referenced_digests``)."""
        return self._read(lambda conn: _digest_referenced(conn, digest))

    def remotes(self, ref: str) -> list[Remote]:
        def work(conn: Connection) -> list[Remote]:
            version_id = _resolve(conn, ref)
            rows = conn.execute(select(RemoteRow.repo_id, RemoteRow.tag, RemoteRow.commit, RemoteRow.pushed_at)
                                .where(RemoteRow.version_id == version_id)
                                .order_by(RemoteRow.pushed_at, RemoteRow.repo_id, RemoteRow.tag)).all()
            return [Remote(r.repo_id, r.tag, r.commit, r.pushed_at) for r in rows]

        return self._read(work)

    def lineage(self, ref: str) -> list[LineageEdge]:
        """Every ancestor edge of ``ref``, nearest first: its parents (depth 1), their parents (depth 2), ..."""

        def work(conn: Connection) -> list[LineageEdge]:
            root = _resolve(conn, ref)
            L = LineageRow
            edges = select(L.version_id, L.parent_id, L.position, literal(1).label("depth")).where(
                L.version_id == root).cte("edges", recursive=True)
            edges = edges.union_all(
                select(L.version_id, L.parent_id, L.position, edges.c.depth + 1).join(
                    edges, L.version_id == edges.c.parent_id))
            child_v, child_a, parent_v, parent_a = aliased(V), aliased(A), aliased(V), aliased(A)
            stmt = (
                select(edges.c.depth, edges.c.position, child_a.name.label("child_name"),
                       child_v.number.label("child_number"), parent_a.name, parent_v.number, parent_v.digest,
                       L.weight, L.strategy, L.params)
                .join(L, and_(L.version_id == edges.c.version_id, L.position == edges.c.position))
                .join(child_v, child_v.id == edges.c.version_id).join(child_a, child_a.id == child_v.adapter_id)
                .join(parent_v, parent_v.id == edges.c.parent_id).join(parent_a, parent_a.id == parent_v.adapter_id)
                .order_by(edges.c.depth, child_a.name, child_v.number, edges.c.position)
            )
            result, seen = [], set()
            for row in conn.execute(stmt):
                child = f"{row.child_name}@{row.child_number}"
                if (child, row.position) in seen:  # an ancestor reached along two paths: keep the nearest
                    continue
                seen.add((child, row.position))
                parent = Parent(row.name, row.number, row.digest, row.weight, row.strategy, row.params or {})
                result.append(LineageEdge(child=child, parent=parent, position=row.position, depth=row.depth))
            return result

        return self._read(work)

    def bases(self) -> list[BaseInfo]:
        """Every known base with the names it was registered under and its number of versions."""

        def work(conn: Connection) -> list[BaseInfo]:
            counts = select(V.base_id, func.count().label("n")).group_by(V.base_id).subquery()
            rows = conn.execute(
                select(B.id, B.weights_hash, B.shape_hash, B.architecture, B.num_parameters, B.created,
                       func.coalesce(counts.c.n, 0).label("n"))
                .outerjoin(counts, counts.c.base_id == B.id).order_by(B.created, B.id)).all()
            names: dict[int, list[str]] = defaultdict(list)
            for base_id, base_name, revision in conn.execute(
                    select(BaseNameRow.base_id, BaseNameRow.name, BaseNameRow.revision)
                    .order_by(BaseNameRow.base_id, BaseNameRow.id)):
                names[base_id].append(f"{base_name}@{revision}" if revision else base_name)
            return [BaseInfo(Fingerprint(r.weights_hash, r.shape_hash, r.architecture, r.num_parameters),
                             names[r.id], r.n, r.created) for r in rows]

        return self._read(work)

    # ------------------------------------------------------------------------------------------ hydration

    def _load(self, conn: Connection, version_ids: list[int]) -> list[VersionInfo]:
        stmt = _joined(select(*VERSION_COLUMNS)).where(_among(conn, V.id, version_ids))
        by_id = {row.id: row for row in conn.execute(stmt)}
        return self._load_rows(conn, [by_id[i] for i in version_ids])

    def _load_rows(self, conn: Connection, rows: Sequence[Any]) -> list[VersionInfo]:
        """VersionInfos for version rows, their related rows fetched in a few batched queries (no N+1)."""
        metrics: dict[int, list[Metric]] = defaultdict(list)
        aliases: dict[int, list[str]] = defaultdict(list)
        tags: dict[int, list[str]] = defaultdict(list)
        parents: dict[int, list[Parent]] = defaultdict(list)
        ids = [row.id for row in rows]
        if ids:
            for vid, key, value, dataset, split in conn.execute(
                    select(MetricRow.version_id, MetricRow.key, MetricRow.value, MetricRow.dataset, MetricRow.split)
                    .where(_among(conn, MetricRow.version_id, ids))
                    .order_by(MetricRow.version_id, MetricRow.key, MetricRow.dataset, MetricRow.split)):
                metrics[vid].append(Metric(key, value, dataset or None, split or None))
            for vid, alias in conn.execute(select(AliasRow.version_id, AliasRow.alias)
                                           .where(_among(conn, AliasRow.version_id, ids)).order_by(AliasRow.alias)):
                aliases[vid].append(alias)
            for vid, tag in conn.execute(select(TagRow.version_id, TagRow.tag)
                                         .where(_among(conn, TagRow.version_id, ids)).order_by(TagRow.tag)):
                tags[vid].append(tag)
            parent_v, parent_a = aliased(V), aliased(A)
            for row in conn.execute(
                    select(LineageRow.version_id, parent_a.name, parent_v.number, parent_v.digest, LineageRow.weight,
                           LineageRow.strategy, LineageRow.params)
                    .join(parent_v, parent_v.id == LineageRow.parent_id)
                    .join(parent_a, parent_a.id == parent_v.adapter_id)
                    .where(_among(conn, LineageRow.version_id, ids))
                    .order_by(LineageRow.version_id, LineageRow.position)):
                parents[row.version_id].append(
                    Parent(row.name, row.number, row.digest, row.weight, row.strategy, row.params or {}))
        return [
            VersionInfo(
                name=r.name, number=r.number, digest=r.digest, method=r.method, rank=r.rank, alpha=r.alpha,
                targets=list(r.targets or []), config=r.config or {}, recipe=r.recipe,
                base=Fingerprint(r.weights_hash, r.shape_hash, r.architecture, r.num_parameters)
                if r.shape_hash is not None else None,
                base_name=r.base_name, size_bytes=r.size_bytes, created=r.created, status=r.status,
                metrics=metrics[r.id], aliases=aliases[r.id], tags=tags[r.id], parents=parents[r.id],
                description=r.description,
            )
            for r in rows
        ]


# ------------------------------------------------------------------------------------------------ SQL pieces


def _among(conn: Connection, column: Any, ids: list[int]) -> ColumnElement[bool]:
    """``column IN ids`` with the ids as ONE parameter (a JSON array on SQLite, an array on PostgreSQL): no limit
    on their number, and none of the per-parameter cost of an expanded ``IN (?, ?, ...)`` for thousands of rows."""
    if conn.dialect.name == "postgresql":
        return column == func.any(bindparam("ids", ids, type_=postgresql.ARRAY(Integer)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(json.dumps(ids))))


def _joined(stmt: Select[Any]) -> Select[Any]:
    return stmt.select_from(V).join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)


def _filter(stmt: Select[Any], *, name: str | None, method: str | None, min_rank: int | None,
            max_rank: int | None, where: Sequence[str], tags: Sequence[str], include_yanked: bool) -> Select[Any]:
    conditions: list[Condition] = [parse_condition(text) for text in _strings(where)]
    stmt = _joined(stmt)
    if name is not None:
        stmt = stmt.where(A.name == check_name(name))
    if method is not None:
        stmt = stmt.where(V.method == check_text(method, "method", METHOD_MAX, spaces=False).lower())
    if min_rank is not None:
        stmt = stmt.where(V.rank >= check_int(min_rank, "minimum rank"))
    if max_rank is not None:
        stmt = stmt.where(V.rank <= check_int(max_rank, "maximum rank"))
    # Uncorrelated IN (subquery): computed once from the (key, value) index and probed per version. A correlated
    # EXISTS made SQLite walk that index range once per version, quadratic in the registry's size.
    for cond in conditions:
        clauses = [MetricRow.key == cond.key, OPERATORS[cond.op](MetricRow.value, cond.value)]
        if cond.dataset is not None:
            clauses.append(MetricRow.dataset == cond.dataset)
        if cond.split is not None:
            clauses.append(MetricRow.split == cond.split)
        stmt = stmt.where(V.id.in_(select(MetricRow.version_id).where(*clauses)))
    for tag in _check_tags(_strings(tags)):
        stmt = stmt.where(V.id.in_(select(TagRow.version_id).where(TagRow.tag == tag)))
    if not include_yanked:
        stmt = stmt.where(V.status == READY)
    return stmt


def _strings(values: Sequence[str]) -> list[str]:
    # A bare string would be iterated character by character: a likely slip, caught here.
    return [values] if isinstance(values, str) else list(values)


def _order(sort: str | None) -> list[Any]:
    """ORDER BY terms for ``sort``: each version's best value of the metric, found through uq_metrics."""
    if sort is None:
        return []
    key, descending = parse_sort(sort)
    best = (func.max if descending else func.min)(MetricRow.value)
    # Correlated, so it runs only for the rows that passed the filters, and must look them up by version_id.
    # `key || ''` keeps SQLite (without statistics) from answering max(value) WHERE key=? by walking
    # ix_metrics_key_value backwards over every version's rows, which made a sort quadratic.
    score = select(best).where(MetricRow.version_id == V.id, MetricRow.key + "" == key).scalar_subquery()
    return [score.desc().nulls_last() if descending else score.asc().nulls_last()]


def _resolve(conn: Connection, ref: str) -> int:
    """The version id ``ref`` names, or NotFound saying which part is missing."""
    parsed = parse_ref(ref)
    stmt = select(V.id).join(A, A.id == V.adapter_id).where(A.name == parsed.name)
    if parsed.number is not None:
        stmt = stmt.where(V.number == parsed.number)
    elif parsed.alias is not None:
        stmt = stmt.join(AliasRow, and_(AliasRow.version_id == V.id, AliasRow.adapter_id == A.id)).where(
            AliasRow.alias == parsed.alias)
    else:
        stmt = stmt.where(V.status == READY).order_by(V.number.desc()).limit(1)
    version_id = conn.scalar(stmt)
    if version_id is not None:
        return version_id
    adapter_id = conn.scalar(select(A.id).where(A.name == parsed.name))
    if adapter_id is None:
        names = conn.scalars(select(A.name)).all()
        close = difflib.get_close_matches(parsed.name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise NotFound(f"no adapter named {parsed.name!r}{hint}")
    if parsed.number is not None:
        highest = conn.scalar(select(func.max(V.number)).where(V.adapter_id == adapter_id))
        raise NotFound(f"{parsed.name} has no version {parsed.number} (versions 1..{highest})")
    if parsed.alias is not None:
        known = conn.scalars(select(AliasRow.alias).where(AliasRow.adapter_id == adapter_id)
                             .order_by(AliasRow.alias)).all()
        listed = f"aliases: {', '.join(known)}" if known else "it has no aliases"
        raise NotFound(f"{parsed.name} has no alias {parsed.alias!r} ({listed})")
    raise NotFound(f"{parsed.name} has no version that is not yanked (ask for one by number: {parsed.name}@N)")


def _resolve_for_update(conn: Connection, ref: str) -> int:
    """``_resolve`` for a write: the adapter's row is locked first (as registrations lock it), then ``ref`` is
    resolved again, so a version another transaction deleted or moved meanwhile is not written to (PostgreSQL's
    READ COMMITTED would otherwise let the first lookup go stale; SQLite's BEGIN IMMEDIATE already serializes)."""
    version_id = _resolve(conn, ref)
    adapter_id = conn.scalar(select(V.adapter_id).where(V.id == version_id))
    conn.execute(select(A.id).where(A.id == adapter_id).with_for_update()).first()
    return _resolve(conn, ref)


def _parent_id(conn: Connection, parent: Parent) -> int:
    row = conn.execute(select(V.id, V.digest).join(A, A.id == V.adapter_id)
                       .where(A.name == parent.name, V.number == parent.number)).first()
    if row is None:
        raise NotFound(f"lineage parent {parent.ref} is not registered")
    if parent.digest is not None and parent.digest != row.digest:
        raise IntegrityError(f"lineage parent {parent.ref} has digest {row.digest[:12]}, not {parent.digest[:12]}")
    return row.id


def _base_id(conn: Connection, base: Fingerprint, base_name: str | None, revision: str | None) -> int:
    """The base's id (created on first sight), and ``base_name`` recorded as one of its names."""
    values = dict(weights_hash=base.weights_hash or None, shape_hash=base.shape_hash,
                  architecture=base.architecture, num_parameters=int(base.num_parameters or 0), created=utcnow())
    if values["weights_hash"] is not None:
        _insert_ignore(conn, B, values, ["weights_hash"])
        base_id = conn.scalar(select(B.id).where(B.weights_hash == values["weights_hash"]))
    else:
        # Known by shapes only: one row per shape hash.
        base_id = conn.scalar(select(B.id).where(B.weights_hash.is_(None), B.shape_hash == base.shape_hash))
        if base_id is None:
            base_id = conn.execute(B.__table__.insert().returning(B.id), values).scalar_one()
    if base_name:
        _insert_ignore(conn, BaseNameRow, dict(base_id=base_id, name=base_name, revision=revision or ""),
                       ["base_id", "name", "revision"])
    return base_id


def _check_metrics(metrics: Iterable[Metric]) -> list[Metric]:
    result = []
    for metric in metrics:
        check_metric_key(metric.key)
        value = check_value(metric.value, f"metric {metric.key!r}")
        if metric.dataset:
            check_dataset(metric.dataset)
        if metric.split:
            check_split(metric.split)
        result.append(Metric(metric.key, value, metric.dataset or None, metric.split or None))
    return result


def _check_spec(spec: AdapterSpec, size_bytes: int) -> None:
    """What an artifact's spec puts in columns, bounded like those columns (the artifact may be untrusted)."""
    try:
        check_text(spec.method, "adapter method", METHOD_MAX, spaces=False)
        if spec.rank is not None:
            check_int(spec.rank, "adapter rank")
        if spec.alpha is not None:
            check_value(spec.alpha, "adapter alpha")
        check_int(size_bytes, "artifact size", maximum=INT64_MAX)
    except QueryError as exc:
        raise InvalidArtifact(str(exc)) from None


def _check_fingerprint(base: Fingerprint) -> None:
    """A base fingerprint's columns (it may come from a pulled model card)."""
    if base.weights_hash:
        check_text(base.weights_hash, "base weights hash", HASH_MAX, spaces=False)
    check_text(base.shape_hash, "base shape hash", HASH_MAX, spaces=False)
    if base.architecture is not None:
        check_text(base.architecture, "base architecture", ARCHITECTURE_MAX)
    check_int(int(base.num_parameters or 0), "base parameter count", maximum=INT64_MAX)


def member_digests(method: str, config: Any) -> list[str]:
    """The member digests a stack or mixture config names (its artifact was validated when read); [] for any
    other method."""
    if method not in COMPOSITIONS:
        return []
    members = config.get(member_key(method)) if isinstance(config, dict) else None
    return [m["digest"] for m in members or [] if isinstance(m, dict) and isinstance(m.get("digest"), str)]


def _digest_referenced(conn: Connection, digest: str) -> bool:
    if conn.scalar(select(V.id).where(V.digest == digest).limit(1)) is not None:
        return True
    # Composition configs are few; a JSON path query would differ between SQLite and PostgreSQL.
    return any(digest in member_digests(method, config)
               for method, config in conn.execute(select(V.method, V.config).where(V.method.in_(COMPOSITIONS))))


def _check_limit(limit: int) -> int:
    return check_int(limit, "limit", maximum=INT64_MAX)


def _check_parent(parent: Parent) -> Parent:
    check_name(parent.name)
    if isinstance(parent.number, bool) or not isinstance(parent.number, int) or not 1 <= parent.number <= INT32_MAX:
        raise QueryError(f"lineage parent {parent.name!r} needs a version number >= 1, not {shown(parent.number)}")
    if parent.weight is not None:
        check_value(parent.weight, f"weight of lineage parent {parent.ref}")
    if parent.strategy is not None:
        check_text(parent.strategy, f"strategy of lineage parent {parent.ref}", STRATEGY_MAX)
    try:
        json.dumps(parent.params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"params of lineage parent {parent.ref} are not plain JSON: {exc}") from None
    return parent


def _check_tags(tags: Iterable[str]) -> list[str]:
    result = []
    for tag in [tags] if isinstance(tags, str) else tags:
        try:
            result.append(check_text(tag, "tag", TAG_MAX, forbid=",", spaces=False))
        except QueryError:
            raise InvalidArtifact(f"invalid tag {shown(tag)}: 1 to {TAG_MAX} characters, no spaces, commas or "
                                  "control characters") from None
    return sorted(set(result))


def _upsert_metrics(conn: Connection, version_id: int, metrics: list[Metric]) -> None:
    # The last value given for a (key, dataset, split) wins, in the batch as in the table.
    unique = {(m.key, m.dataset or "", m.split or ""): m.value for m in metrics}
    rows = [dict(version_id=version_id, key=key, dataset=dataset, split=split, value=value)
            for (key, dataset, split), value in unique.items()]
    _upsert(conn, MetricRow, rows, ["version_id", "key", "dataset", "split"], ["value"])


def _add_tags(conn: Connection, version_id: int, tags: list[str]) -> None:
    for tag in tags:
        _insert_ignore(conn, TagRow, dict(version_id=version_id, tag=tag), ["version_id", "tag"])


def _dialect_insert(conn: Connection, model: type) -> Any:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return insert(model)


def _insert_ignore(conn: Connection, model: type, values: dict[str, Any], keys: list[str]) -> None:
    conn.execute(_dialect_insert(conn, model).values(**values).on_conflict_do_nothing(index_elements=keys))


def _upsert(conn: Connection, model: type, rows: list[dict[str, Any]], keys: list[str], updates: list[str]) -> None:
    if not rows:
        return
    stmt = _dialect_insert(conn, model)
    conn.execute(stmt.on_conflict_do_update(index_elements=keys,
                                            set_={column: stmt.excluded[column] for column in updates}), rows)
