"""Full-text search over the registry, with the database's own full-text index (migration 0005).

What a version is found by: its adapter's name and description, its tags, its metric names and datasets, and its
card text (method and target modules). The index is kept in step by triggers, so a search sees every committed
write at once.

**Words.** A word is a maximal run of ASCII letters and digits and non-ASCII characters; ASCII letters are
lowercased (``words``). The migration builds the index with the same rule on SQLite (FTS5's ``ascii`` tokenizer)
and PostgreSQL (tsvectors built from those words, no parser or dictionary), so both backends find the same
versions. Every word of the search text must match: the last one as a prefix, so a search box finds as one
types (``math lor`` finds ``math-lora``), the others whole (a prefix of a common word would make the index read
every version that has it).

**Order.** Three tiers, then newest version first within each:

1. the versions of the adapter whose name is the search text (ASCII case ignored);
2. versions whose adapter name holds every word;
3. versions that hold every word anywhere else.

Each tier is one indexed query walked in version-id order (FTS5 reads its index in rowid order; PostgreSQL's GIN
index gives the matching rows), so a page reads about a page of rows past the filters. Relevance scores (bm25,
ts_rank) are not used: they differ between the backends, and these tiers are what a registry search needs.

**Pages.** ``limit`` and ``after`` as in ``Registry.list``: ``Page.next_after`` is the cursor of the next page, tied
to the query that made it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, Select, bindparam, cast, column, func, select, table, text
from sqlalchemy.dialects.postgresql import TSQUERY

from hub.errors import QueryError
from hub.registry.models import AdapterRow, BaseRow, VersionRow
from hub.registry.queries import VERSION_COLUMNS, Filters, Page, _filtered, base_ids, check_limit
from hub.registry.records import VersionInfo
from hub.registry.refs import NAME, shown
from hub.registry.service import _check_tags

if TYPE_CHECKING:
    from hub.registry.service import Registry

V, A, B = VersionRow, AdapterRow, BaseRow

# Longer search texts are refused (a search box is not a document), and so are texts of more words.
MAX_TEXT = 500
MAX_WORDS = 16
# The search index's own objects (migration 0005): not part of the models, which describe the registry's data.
SQLITE_TABLE = "search_fts"
POSTGRES_TABLE = "search_documents"
CURSOR_VERSION = 1
TIERS = ("exact name", "name", "text")

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# The complement of ASCII letters and digits within ASCII: what separates words (NUL cannot occur in stored text).
_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")


@dataclass(frozen=True)
class SearchHit:
    """A version the search found, and why: ``match`` is ``exact name``, ``name`` (its adapter's name holds every
    word) or ``text`` (its description, tags, metrics or card do)."""

    version: VersionInfo
    match: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.version.to_dict(), "match": self.match}


def words(text: str) -> list[str]:
    """The words of ``text`` as the index sees them (see the module docstring), in order, repeats kept."""
    return [word for word in _SEPARATORS.split(text.translate(_ASCII_LOWER)) if word]


def search_words(text: object) -> list[str]:
    """The distinct words of a search text. Raises QueryError for a text that is not a string, too long, without
    words or with too many."""
    if not isinstance(text, str):
        raise QueryError(f"search text must be a string, not {shown(text)}")
    if len(text) > MAX_TEXT:
        raise QueryError(f"search text is {len(text)} characters long; at most {MAX_TEXT}")
    found = list(dict.fromkeys(words(text)))
    if not found:
        raise QueryError(f"search text {shown(text)} has no words to search for (letters or digits)")
    if len(found) > MAX_WORDS:
        raise QueryError(f"search text has {len(found)} different words; at most {MAX_WORDS}")
    return found


def is_search_object(name: str | None) -> bool:
    """Whether a database object belongs to the search index (for schema comparisons against the models, which
    leave it out): the FTS5 table and its shadow tables, or the PostgreSQL documents table and its indexes."""
    return bool(name) and (name.startswith(SQLITE_TABLE) or name.startswith(POSTGRES_TABLE)
                           or name.startswith(f"ix_{POSTGRES_TABLE}"))


def search(
    registry: Registry,
    text: str,
    *,
    method: str | None = None,
    min_rank: int | str | None = None,
    max_rank: int | str | None = None,
    where: Sequence[str] = (),
    tags: Sequence[str] = (),
    weights_hash: str | None = None,
    include_yanked: bool = False,
    limit: int | None = 50,
    after: str | None = None,
) -> Page[SearchHit]:
    """Versions matching ``text`` (see the module docstring) and every filter, as ``Registry.list`` takes them.

    Raises QueryError: a malformed text, filter or cursor (one made by another search).
    """
    terms = search_words(text)
    filters = Filters.checked(name=None, method=method, min_rank=min_rank, max_rank=max_rank, where=where,
                              tags=tags, include_yanked=include_yanked, check_tags=_check_tags)
    limit = check_limit(limit)
    exact = text.strip().translate(_ASCII_LOWER)
    exact = exact if NAME.fullmatch(exact) else None
    described = json.dumps({"terms": terms, "exact": exact, "filters": asdict(filters),
                            "weights_hash": weights_hash}, sort_keys=True)
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    start = _decode_cursor(after, digest) if after is not None else None

    def work(conn: Connection) -> Page[SearchHit]:
        group = None if weights_hash is None else base_ids(conn, weights_hash=weights_hash)
        # The adapters named ``exact`` (ASCII case ignored): a scan of the adapters, far fewer than the versions.
        named = [] if exact is None else list(conn.scalars(select(A.id).where(func.lower(A.name) == exact)))
        wanted = None if limit is None else limit + 1
        found: list[tuple[int, Any]] = []
        for tier in range(len(TIERS)):
            if start is not None and tier < start[0]:
                continue
            if tier == 0 and not named:
                continue
            stmt = _tier(conn, tier, terms, named)
            if group is not None:
                stmt = stmt.where(V.base_id.in_(group))
            if start is not None and tier == start[0]:
                stmt = stmt.where(V.id < start[1])
            stmt = _filtered(stmt, filters, conn.dialect.name == "sqlite")
            if wanted is not None:
                stmt = stmt.limit(wanted - len(found))
            found.extend((tier, row) for row in conn.execute(stmt))
            if wanted is not None and len(found) >= wanted:
                break
        next_after = None
        if limit is not None and len(found) > limit:
            found = found[:limit]
            next_after = _encode_cursor(digest, found[-1][0], found[-1][1].id) if found else None
        versions = registry._load_rows(conn, [row for _, row in found])
        return Page([SearchHit(v, TIERS[tier]) for v, (tier, _) in zip(versions, found, strict=True)], next_after)

    return registry._read(work)


def _tier(conn: Connection, tier: int, terms: list[str], named: list[int]) -> Select[Any]:
    """The versions of one tier, newest first, without the filters; ``named``: the ids of the adapters whose name
    is the search text (tier 0, and left out of the others)."""
    if tier == 0:
        return (select(*VERSION_COLUMNS).select_from(V).join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)
                .where(V.adapter_id.in_(named)).order_by(V.id.desc()))
    not_exact: list[ColumnElement[bool]] = [V.adapter_id.not_in(named)] if named else []
    if conn.dialect.name == "postgresql":
        documents = table(POSTGRES_TABLE, column("version_id"), column("name"), column("document"))
        query = cast(bindparam("search_query", " & ".join(f"'{term}'" for term in terms[:-1])
                               + f"{' & ' if len(terms) > 1 else ''}'{terms[-1]}':*"), TSQUERY)
        found = documents.c.name.op("@@")(query)
        if tier == 2:
            found = documents.c.document.op("@@")(query) & ~found
        return (select(*VERSION_COLUMNS).select_from(documents).join(V, V.id == documents.c.version_id)
                .join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)
                .where(found, *not_exact).order_by(documents.c.version_id.desc()))
    # FTS5's query language: "word"* is a prefix; `name : (...)` restricts the words to the name column. Words hold
    # no quotes or operators (ASCII punctuation separates words), so quoting them is enough.
    every = " AND ".join([*(f'"{term}"' for term in terms[:-1]), f'"{terms[-1]}"*'])
    fts_query = f"name : ({every})" if tier == 1 else f"({every}) NOT (name : ({every}))"
    index = table(SQLITE_TABLE, column("rowid"))
    return (select(*VERSION_COLUMNS).select_from(index).join(V, V.id == index.c.rowid)
            .join(A, A.id == V.adapter_id).outerjoin(B, B.id == V.base_id)
            .where(text(f"{SQLITE_TABLE} MATCH :search_query").bindparams(search_query=fts_query), *not_exact)
            .order_by(index.c.rowid.desc()))


def _encode_cursor(digest: str, tier: int, version_id: int) -> str:
    data = {"c": CURSOR_VERSION, "q": digest, "t": tier, "id": version_id}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: object, digest: str) -> tuple[int, int]:
    """(tier, version id) of a cursor of the search ``digest``. Raises QueryError."""
    invalid = QueryError(f"invalid cursor {shown(cursor)}: pass the value a previous page gave as its next cursor")
    if not isinstance(cursor, str):
        raise invalid
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
        tier, version_id, query = data["t"], data["id"], data["q"]
        valid = (data["c"] == CURSOR_VERSION and type(tier) is int and 0 <= tier < len(TIERS)
                 and type(version_id) is int)
    except (TypeError, ValueError, KeyError, UnicodeDecodeError, binascii.Error):
        valid = False
    if not valid:
        raise invalid
    if query != digest:
        raise QueryError("that cursor belongs to another search: page on with the same text and filters")
    return tier, version_id
