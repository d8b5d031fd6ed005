"""Full-text search over versions, kept in step with the data by triggers.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

One search document per version: its adapter's name and description, its tags, its metric names and datasets,
and its card text (method and target modules). Triggers on adapters, versions, tags and metrics rebuild the
document of every version a write touches, inside the writing transaction, so search never lags behind the data
and no code path (the service, a migration, a hand-written UPDATE) can forget it. An upgrade of a populated
registry builds every version's document.

Words are the same on both backends: maximal runs of ASCII letters and digits and non-ASCII characters, ASCII
letters lowercased (``hub.registry.search.words`` is the Python side of this rule; keep them in step):

* SQLite: an FTS5 table ``search_fts`` (rowid = version id) with FTS5's ``ascii`` tokenizer, which is that rule;
* PostgreSQL: a table ``search_documents`` (version id, a tsvector of the name, a tsvector of the whole document)
  with GIN indexes. The tsvectors are built from the words by ``array_to_tsvector`` (no parser, no dictionary),
  so the database's locale and text-search configuration cannot change what a word is.

No table of the registry is altered: only new objects are created, and dropped again by the downgrade.
"""

from __future__ import annotations

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# ------------------------------------------------------------------------------------------------------ SQLite

# The document of each version selected by ``{where}`` (a condition on v), as the FTS5 columns.
SQLITE_DOCUMENTS = """
INSERT INTO search_fts (rowid, name, description, tags, metrics, card)
SELECT v.id, a.name, coalesce(a.description, ''),
       coalesce((SELECT group_concat(t.tag, ' ') FROM tags t WHERE t.version_id = v.id), ''),
       coalesce((SELECT group_concat(m.key || ' ' || m.dataset, ' ') FROM metrics m WHERE m.version_id = v.id), ''),
       v.method || ' ' || coalesce((SELECT group_concat(j.value, ' ') FROM json_each(v.targets) j), '')
FROM versions v JOIN adapters a ON a.id = v.adapter_id
WHERE {where};
"""


def _sqlite_refresh(version_id: str) -> str:
    """Trigger statements that rebuild the document of the version ``version_id`` (gone if the version is)."""
    return (f"DELETE FROM search_fts WHERE rowid = {version_id};\n"
            + SQLITE_DOCUMENTS.format(where=f"v.id = {version_id}"))


SQLITE_TRIGGERS = {
    "search_versions_insert": ("AFTER INSERT ON versions", _sqlite_refresh("NEW.id")),
    "search_versions_update": ("AFTER UPDATE OF adapter_id, method, targets ON versions",
                               _sqlite_refresh("OLD.id") + _sqlite_refresh("NEW.id")),
    "search_versions_delete": ("AFTER DELETE ON versions", "DELETE FROM search_fts WHERE rowid = OLD.id;"),
    "search_adapters_update": (
        "AFTER UPDATE OF name, description ON adapters",
        "DELETE FROM search_fts WHERE rowid IN (SELECT id FROM versions WHERE adapter_id = NEW.id);\n"
        + SQLITE_DOCUMENTS.format(where="v.adapter_id = NEW.id")),
    **{f"search_{table}_insert": (f"AFTER INSERT ON {table}", _sqlite_refresh("NEW.version_id"))
       for table in ("tags", "metrics")},
    **{f"search_{table}_delete": (f"AFTER DELETE ON {table}", _sqlite_refresh("OLD.version_id"))
       for table in ("tags", "metrics")},
    "search_tags_update": ("AFTER UPDATE ON tags",
                           _sqlite_refresh("OLD.version_id") + _sqlite_refresh("NEW.version_id")),
    # Metric upserts change only the value, which is not searched: no trigger fires for them.
    "search_metrics_update": ("AFTER UPDATE OF version_id, key, dataset ON metrics",
                              _sqlite_refresh("OLD.version_id") + _sqlite_refresh("NEW.version_id")),
}


def _upgrade_sqlite() -> None:
    # "ascii": ASCII letters and digits plus every non-ASCII character make words; only ASCII is case-folded.
    op.execute("CREATE VIRTUAL TABLE search_fts USING fts5(name, description, tags, metrics, card, "
               "tokenize = 'ascii')")
    for name, (when, body) in SQLITE_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW BEGIN\n{body}\nEND")
    op.execute(SQLITE_DOCUMENTS.format(where="1"))


def _downgrade_sqlite() -> None:
    for name in SQLITE_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DROP TABLE IF EXISTS search_fts")


# -------------------------------------------------------------------------------------------------- PostgreSQL

# The document of each version selected by ``{where}`` (a condition on v): its name, and everything.
POSTGRES_DOCUMENTS = """
INSERT INTO search_documents (version_id, name, document)
SELECT v.id, hub_search_vector(a.name),
       hub_search_vector(concat_ws(' ', a.name, a.description,
         (SELECT string_agg(t.tag, ' ') FROM tags t WHERE t.version_id = v.id),
         (SELECT string_agg(m.key || ' ' || m.dataset, ' ') FROM metrics m WHERE m.version_id = v.id),
         v.method,
         (SELECT string_agg(target, ' ') FROM json_array_elements_text(v.targets) AS target)))
FROM versions v JOIN adapters a ON a.id = v.adapter_id
WHERE {where};
"""

POSTGRES_FUNCTIONS = [
    # The words of a text as a tsvector (see the module docstring); words are cut at 200 characters, well under
    # PostgreSQL's limit of 2047 bytes per lexeme.
    r"""
    CREATE FUNCTION hub_search_vector(body text) RETURNS tsvector LANGUAGE sql IMMUTABLE AS $$
      SELECT coalesce(array_to_tsvector(array_agg(left(word, 200))), ''::tsvector)
      FROM regexp_split_to_table(
             translate(coalesce(body, ''), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'),
             '[\x01-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+') AS word
      WHERE word <> ''
    $$
    """,
    # Rebuild the documents of the versions ``ids`` (a version that no longer exists loses its document).
    """
    CREATE FUNCTION hub_search_refresh(ids integer[]) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
      DELETE FROM search_documents WHERE version_id = ANY(ids);
    """ + POSTGRES_DOCUMENTS.format(where="v.id = ANY(ids)") + """
    END
    $$
    """,
    """
    CREATE FUNCTION hub_search_version_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN PERFORM hub_search_refresh(ARRAY[NEW.id]);
      ELSIF TG_OP = 'DELETE' THEN PERFORM hub_search_refresh(ARRAY[OLD.id]);
      ELSE PERFORM hub_search_refresh(ARRAY[OLD.id, NEW.id]);
      END IF;
      RETURN NULL;
    END
    $$
    """,
    # Tags and metrics: the document of the version the row belongs (or belonged) to.
    """
    CREATE FUNCTION hub_search_row_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN PERFORM hub_search_refresh(ARRAY[NEW.version_id]);
      ELSIF TG_OP = 'DELETE' THEN PERFORM hub_search_refresh(ARRAY[OLD.version_id]);
      ELSE PERFORM hub_search_refresh(ARRAY[OLD.version_id, NEW.version_id]);
      END IF;
      RETURN NULL;
    END
    $$
    """,
    """
    CREATE FUNCTION hub_search_adapter_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM hub_search_refresh(ARRAY(SELECT id FROM versions WHERE adapter_id = NEW.id));
      RETURN NULL;
    END
    $$
    """,
]
POSTGRES_TRIGGERS = {
    "search_versions": ("AFTER INSERT OR DELETE OR UPDATE OF adapter_id, method, targets ON versions",
                        "hub_search_version_changed"),
    "search_adapters": ("AFTER UPDATE OF name, description ON adapters", "hub_search_adapter_changed"),
    "search_tags": ("AFTER INSERT OR DELETE OR UPDATE ON tags", "hub_search_row_changed"),
    # Metric upserts change only the value, which is not searched: no trigger fires for them.
    "search_metrics": ("AFTER INSERT OR DELETE OR UPDATE OF version_id, key, dataset ON metrics",
                       "hub_search_row_changed"),
}
POSTGRES_FUNCTION_NAMES = ("hub_search_adapter_changed()", "hub_search_row_changed()",
                           "hub_search_version_changed()", "hub_search_refresh(integer[])",
                           "hub_search_vector(text)")


def _upgrade_postgres() -> None:
    op.execute("CREATE TABLE search_documents (version_id integer PRIMARY KEY, name tsvector NOT NULL, "
               "document tsvector NOT NULL)")
    op.execute("CREATE INDEX ix_search_documents_name ON search_documents USING gin (name)")
    op.execute("CREATE INDEX ix_search_documents_document ON search_documents USING gin (document)")
    for function in POSTGRES_FUNCTIONS:
        op.execute(function)
    for name, (when, function) in POSTGRES_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {function}()")
    op.execute(POSTGRES_DOCUMENTS.format(where="true"))


def _downgrade_postgres() -> None:
    for name, (when, _) in POSTGRES_TRIGGERS.items():
        table = when.rsplit(" ON ", 1)[1]
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    for signature in POSTGRES_FUNCTION_NAMES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
    op.execute("DROP TABLE IF EXISTS search_documents")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgres()
    else:
        _upgrade_sqlite()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _downgrade_postgres()
    else:
        _downgrade_sqlite()
