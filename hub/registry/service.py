"""The Registry service: versions of named adapters, their bases, metrics, aliases, lineage, tags and remotes.

Every call is one transaction. Writers serialize per adapter (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the
adapter row is locked ``FOR UPDATE``), so version numbers are gap-free and unique under concurrent registration;
lock waits and races are retried inside (``with_retries``) and never reach the caller.

Listings walk indexes and come in keyset pages (``hub.registry.queries`` explains how); a page of N versions costs
five round trips (the versions, then their metrics, aliases, tags and parents in batches).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    and_,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
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
    VariantRow,
    VersionRow,
    utcnow,
)
from hub.registry.queries import (
    VERSION_COLUMNS,
    Filters,
    Page,
    base_ids,
    check_limit,
    fetch,
    matching_bases,
    plan,
)
from hub.registry.records import (
    BaseInfo,
    Deleted,
    LineageEdge,
    Match,
    Metric,
    NewVersion,
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
    check_alias,
    check_dataset,
    check_description,
    check_int,
    check_metric_key,
    check_name,
    check_split,
    check_text,
    check_value,
    parse_ref,
    shown,
)

if TYPE_CHECKING:
    from hub.formats.spec import AdapterSpec

T = TypeVar("T")

DIGEST = re.compile(r"[0-9a-f]{64}")
COMPOSITIONS = ("stack", "mixture")

V, A, B = VersionRow, AdapterRow, BaseRow


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

    def check_registration(self, entry: NewVersion) -> NewVersion:
        """Every check ``register_many`` makes of ``entry`` before it touches the database; the entry with its
        values normalized. Callers run it before storing anything, so a refused registration writes nothing.
        Raises QueryError or InvalidArtifact (one line naming the field)."""
        return _checked(entry)

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
        Raises what ``check_registration`` raises, Conflict, NotFound (a lineage parent), IntegrityError.
        """
        return self.register_many([NewVersion(
            name, digest=digest, spec=spec, config=config, size_bytes=size_bytes, base=base, base_name=base_name,
            metrics=tuple(metrics), tags=tuple(_check_tags(tags)), lineage=tuple(lineage), description=description,
            number=number, recipe=recipe)])[0]

    def register_many(self, entries: Sequence[NewVersion]) -> list[Registered]:
        """``register`` for many versions in ONE transaction: all of them are recorded, or (on any error) none.

        Entries of one name get consecutive numbers in the order given. Raises what ``register`` raises, for the
        first entry at fault (its name says which).
        """
        checked = [_checked(entry) for entry in entries]

        def work(conn: Connection) -> list[Registered]:
            # Adapters locked in name order, so two batches that share names cannot deadlock each other.
            descriptions = {entry.name: entry.description for entry in checked}
            adapters = {name: self._lock_adapter(conn, name, descriptions[name]) for name in sorted(descriptions)}
            bases: dict[tuple[Any, ...], int] = {}  # a batch is usually all on one base: looked up once
            results = [self._insert(conn, entry, adapters[entry.name], bases) for entry in checked]
            versions = self._load(conn, [version_id for version_id, _ in results])
            return [Registered(version, created) for version, (_, created) in zip(versions, results, strict=True)]

        return self._write(work) if checked else []

    def _insert(self, conn: Connection, entry: NewVersion, adapter_id: int | None = None,
                bases: dict[tuple[Any, ...], int] | None = None) -> tuple[int, bool]:
        """Record one checked entry inside the caller's transaction: (version id, whether it is new).
        ``adapter_id``: the adapter's row, already locked; ``bases``: base ids found so far in this transaction."""
        name, number, digest = entry.name, entry.number, entry.digest
        if adapter_id is None:
            adapter_id = self._lock_adapter(conn, name, entry.description)
        existing = conn.scalar(select(V.id).where(V.adapter_id == adapter_id, V.digest == digest))
        if existing is not None:
            _upsert_metrics(conn, existing, list(entry.metrics))
            _add_tags(conn, existing, list(entry.tags))
            return existing, False
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
        spec = entry.spec
        base_id = None
        if entry.base is not None:
            bases = {} if bases is None else bases
            key = (entry.base, entry.base_name, entry.revision)
            if key not in bases:
                bases[key] = _base_id(conn, entry.base, entry.base_name, entry.revision)
            base_id = bases[key]
        version_id = conn.execute(
            V.__table__.insert().returning(V.id),
            dict(adapter_id=adapter_id, number=chosen, digest=digest, method=spec.method, rank=spec.rank,
                 alpha=spec.alpha, targets=list(spec.targets), config=entry.config, recipe=entry.recipe,
                 base_id=base_id, base_name=entry.base_name, size_bytes=int(entry.size_bytes), created=utcnow(),
                 status=READY),
        ).scalar_one()
        conn.execute(update(A).where(A.id == adapter_id, A.last_number < chosen).values(last_number=chosen))
        _upsert_metrics(conn, version_id, list(entry.metrics))
        _add_tags(conn, version_id, list(entry.tags))
        for variant in dict.fromkeys(spec.variants):
            conn.execute(VariantRow.__table__.insert(), dict(version_id=version_id, variant=variant))
        for position, parent in enumerate(entry.lineage):
            conn.execute(LineageRow.__table__.insert(), dict(
                version_id=version_id, parent_id=_parent_id(conn, parent), weight=parent.weight,
                strategy=parent.strategy, position=position, params=dict(parent.params)))
        return version_id, True

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
            for model in (MetricRow, AliasRow, TagRow, VariantRow, RemoteRow, LineageRow):
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
        after: str | None = None,
    ) -> Page[VersionInfo]:
        """Versions matching every filter given, at most ``limit`` of them, from after the cursor ``after``.

        ``where``: metric conditions such as ``accuracy>=0.8`` or ``accuracy@gsm8k:test>=0.8`` (operators
        ``>= <= > < = !=``); a version matches when one of its metrics satisfies each; a version without the
        metric never does. ``tags``: all of them. ``sort``: a metric name, highest first by each version's best
        (largest) value, or ``-name`` for lowest first by its smallest; versions without it come last. Without a
        sort: by name, then number.

        The result is a list (``Page``) whose ``next_after`` is the cursor of the next page, None after the last:
        pages joined end to end are exactly the unpaged result. Raises QueryError (a malformed filter, or a
        cursor that is malformed or was made by another query).
        """
        filters = self._filters(name, method, min_rank, max_rank, where, tags, include_yanked)
        limit = check_limit(limit)

        def work(conn: Connection) -> Page[VersionInfo]:
            group = None if weights_hash is None else base_ids(conn, weights_hash)
            listing = plan("list", filters, sort, [(group, False)], {"weights_hash": weights_hash})
            rows, next_after = fetch(conn, listing, after, limit)
            return Page(self._load_rows(conn, rows), next_after)

        return self._read(work)

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
        after: str | None = None,
    ) -> Page[Match]:
        """Versions whose base has the same weights (exact) or the same tensor names and shapes (structural).

        Exact matches first; within each group the order of ``list`` (``sort``, else name and number). Paged as
        ``list`` is (``limit``, ``after``, ``next_after``). Raises QueryError.
        """
        filters = self._filters(name, method, min_rank, max_rank, where, tags, include_yanked)
        limit = check_limit(limit)

        def work(conn: Connection) -> Page[Match]:
            exact, structural = matching_bases(conn, fingerprint.weights_hash, fingerprint.shape_hash)
            listing = plan("compatible", filters, sort, [(exact, True), (structural, False)],
                           {"weights_hash": fingerprint.weights_hash, "shape_hash": fingerprint.shape_hash})
            rows, next_after = fetch(conn, listing, after, limit)
            versions = self._load_rows(conn, rows)
            return Page([Match(version, exact=bool(row.exact)) for version, row in zip(versions, rows, strict=True)],
                        next_after)

        return self._read(work)

    @staticmethod
    def _filters(name: str | None, method: str | None, min_rank: int | str | None, max_rank: int | str | None,
                 where: Sequence[str], tags: Sequence[str], include_yanked: bool) -> Filters:
        return Filters.checked(name=name, method=method, min_rank=min_rank, max_rank=max_rank, where=where,
                               tags=tags, include_yanked=include_yanked, check_tags=_check_tags)

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

    def commits_from(self, repo_id: str) -> set[str]:
        """The commits of the Hub repository ``repo_id`` (``ORG/NAME`` or ``ORG/NAME/FOLDER``) that versions of
        this registry were pushed to or pulled from."""
        stmt = select(RemoteRow.commit).where(RemoteRow.repo_id == repo_id).distinct()
        return self._read(lambda conn: set(conn.scalars(stmt)))

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
        by_id = {row.id: row for row in conn.execute(_hydration(conn.dialect.name).versions, _ids(conn, version_ids))}
        return self._load_rows(conn, [by_id[i] for i in version_ids])

    def _load_rows(self, conn: Connection, rows: Sequence[Any]) -> list[VersionInfo]:
        """VersionInfos for version rows, their related rows fetched in a few batched queries (no N+1)."""
        metrics: dict[int, list[Metric]] = defaultdict(list)
        aliases: dict[int, list[str]] = defaultdict(list)
        tags: dict[int, list[str]] = defaultdict(list)
        variants: dict[int, list[str]] = defaultdict(list)
        parents: dict[int, list[Parent]] = defaultdict(list)
        if rows:
            statements, ids = _hydration(conn.dialect.name), _ids(conn, [row.id for row in rows])
            for vid, key, value, dataset, split in conn.execute(statements.metrics, ids):
                metrics[vid].append(Metric(key, value, dataset or None, split or None))
            for vid, alias in conn.execute(statements.aliases, ids):
                aliases[vid].append(alias)
            for vid, tag in conn.execute(statements.tags, ids):
                tags[vid].append(tag)
            for vid, variant in conn.execute(statements.variants, ids):
                variants[vid].append(variant)
            for row in conn.execute(statements.parents, ids):
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
                description=r.description, variants=variants[r.id],
            )
            for r in rows
        ]


# ------------------------------------------------------------------------------------------------ SQL pieces


def _among(dialect: str, column: Any) -> ColumnElement[bool]:
    """``column IN :ids`` with the ids as ONE parameter (a JSON array on SQLite, an array on PostgreSQL; see
    ``_ids``): no limit on their number, and none of the per-parameter cost of an expanded ``IN (?, ?, ...)``."""
    if dialect == "postgresql":
        return column == func.any(bindparam("ids", type_=postgresql.ARRAY(Integer)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(bindparam("ids"))))


def _ids(conn: Connection, ids: list[int]) -> dict[str, Any]:
    return {"ids": ids if conn.dialect.name == "postgresql" else json.dumps(ids)}


@dataclass(frozen=True)
class _Hydration:
    """The statements that turn version ids into VersionInfos, each taking the ids as one parameter."""

    versions: Select[Any]
    metrics: Select[Any]
    aliases: Select[Any]
    tags: Select[Any]
    variants: Select[Any]
    parents: Select[Any]


@functools.cache
def _hydration(dialect: str) -> _Hydration:
    # Built once per backend: building SQLAlchemy statements costs more than running them for a page of rows.
    parent_v, parent_a = aliased(V), aliased(A)
    return _Hydration(
        versions=_joined(select(*VERSION_COLUMNS)).where(_among(dialect, V.id)),
        metrics=select(MetricRow.version_id, MetricRow.key, MetricRow.value, MetricRow.dataset, MetricRow.split)
        .where(_among(dialect, MetricRow.version_id))
        .order_by(MetricRow.version_id, MetricRow.key, MetricRow.dataset, MetricRow.split),
        aliases=select(AliasRow.version_id, AliasRow.alias).where(_among(dialect, AliasRow.version_id))
        .order_by(AliasRow.alias),
        tags=select(TagRow.version_id, TagRow.tag).where(_among(dialect, TagRow.version_id)).order_by(TagRow.tag),
        variants=select(VariantRow.version_id, VariantRow.variant).where(_among(dialect, VariantRow.version_id))
        .order_by(VariantRow.variant),
        parents=select(LineageRow.version_id, parent_a.name, parent_v.number, parent_v.digest, LineageRow.weight,
                       LineageRow.strategy, LineageRow.params)
        .join(parent_v, parent_v.id == LineageRow.parent_id).join(parent_a, parent_a.id == parent_v.adapter_id)
        .where(_among(dialect, LineageRow.version_id)).order_by(LineageRow.version_id, LineageRow.position),
    )


def _joined(stmt: Select[Any]) -> Select[Any]:
    return stmt.select_from(V).join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)


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


def _checked(entry: NewVersion) -> NewVersion:
    """``entry`` with its values checked and normalized (metrics, tags sorted, the base revision from its config).
    Raises QueryError, InvalidArtifact."""
    name = entry.name
    check_name(name)
    if entry.number is not None:
        check_int(entry.number, "version number", minimum=1)
    if not isinstance(entry.digest, str) or not DIGEST.fullmatch(entry.digest):
        raise InvalidArtifact(f"digest {shown(entry.digest)} is not a lowercase sha256 hex string")
    _check_spec(entry.spec, entry.size_bytes)
    try:
        json.dumps(entry.config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArtifact(f"adapter config of {name!r} is not plain JSON: {exc}") from None
    try:
        json.dumps(entry.recipe, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"recipe of {name!r} is not plain JSON: {exc}") from None
    if entry.description is not None:
        check_description(entry.description)
    if entry.base is not None:
        _check_fingerprint(entry.base)
    if entry.base_name is not None:
        check_text(entry.base_name, "base name", BASE_NAME_MAX)
    revision = entry.config.get("revision") if isinstance(entry.config.get("revision"), str) else None
    if revision:
        check_text(revision, "base revision", REVISION_MAX, spaces=False)
    return dataclasses.replace(entry, metrics=tuple(_check_metrics(entry.metrics)), tags=tuple(_check_tags(entry.tags)),
                               lineage=tuple(_check_parent(parent) for parent in entry.lineage), revision=revision)


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
