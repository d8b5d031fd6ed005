"""Opening a registry database: engines, SQLite settings, schema revisions (alembic), retries.

Alembic is configured from code (``alembic_config``), so no ``alembic.ini`` is needed at run time. To write a
new migration during development::

    python -c "from alembic import command; from hub.registry.database import alembic_config; \
command.revision(alembic_config('sqlite:///dev.db'), 'what changed', autogenerate=True)"
"""

from __future__ import annotations

import errno
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

import migrations
from hub.errors import Conflict, DatabaseError
from hub.registry.models import Model

T = TypeVar("T")

# __path__, not __file__: an editable install made before migrations/__init__.py existed sees a namespace package.
MIGRATIONS_DIR = Path(next(iter(migrations.__path__))).resolve()
BACKENDS = ("sqlite", "postgresql")
# A writer waits this long inside SQLite for the write lock before the retry loop takes over.
BUSY_TIMEOUT_MS = 5_000
# How long the retry loop keeps trying a transaction that meets locks, deadlocks or races.
RETRY_DEADLINE_S = 120.0
# Any constant: the PostgreSQL advisory lock that serializes schema upgrades.
UPGRADE_LOCK_ID = 0x4855_4244
WRITE = {"hub_write": True}
NEWER = "which this version of the hub does not know (head is {head}); a newer hub upgraded it: upgrade adapter-hub"
NO_REVISION = "has registry tables but no schema revision: it was not made by the hub, so it cannot be upgraded safely"


def safe_url(url: str | URL) -> str:
    """The URL for messages, password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def first_line(exc: BaseException) -> str:
    """The driver's own message, on one line (drivers add hints and SQL on further lines)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0].strip() if text else type(orig).__name__


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL), or DatabaseError naming what is wrong with the URL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"invalid database URL {url!r}: expected e.g. sqlite:///path/registry.db") from None
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise DatabaseError(f"unsupported database {backend!r} in {safe_url(parsed)}: use sqlite or postgresql")
    try:
        if backend == "sqlite":
            return _sqlite_engine(parsed)
        return create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:
        hint = "; for PostgreSQL use postgresql+psycopg://" if backend == "postgresql" else ""
        message = f"cannot load the database driver for {safe_url(parsed)}: {first_line(exc)}{hint}"
        raise DatabaseError(message) from None


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    memory = database in ("", ":memory:") or "mode=memory" in database
    read_only = "mode=ro" in database
    if not memory and not database.startswith("file:"):
        path = Path(database).expanduser()
        if path.is_dir():
            raise DatabaseError(f"{path} is a directory, not a registry database")
        if path.parent.exists() and not path.parent.is_dir():
            raise DatabaseError(f"cannot open the registry {path}: {path.parent} is a file, not a folder")
        if path.is_file() and not _writable(path):
            # A shared registry this user may only read: open it read-only, so reading writes nothing (no
            # journal-mode change, no -wal/-shm files where they cannot be made).
            url, read_only = _read_only_url(path), True
        elif not path.parent.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot create the folder for {path}: {_os_reason(exc)}") from None
    # One shared connection for an in-memory database, or every connection would see its own empty one.
    engine = create_engine(url, poolclass=StaticPool) if memory else create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Take transactions out of the driver's hands so BEGIN is ours to emit (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")  # a write to the file's header
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that upgrades to a writer midway
        # fails at once with "database is locked" instead of waiting its turn.
        immediate = connection.get_execution_options().get("hub_write")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _writable(path: Path) -> bool:
    """Whether this process may write ``path`` and create files beside it (SQLite's -wal and -shm)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _read_only_url(path: Path) -> URL:
    # Without write access to the folder, SQLite cannot create the -shm file a WAL database needs to be read;
    # when none exists (no writer has the database open) the file is opened immutable: read as it is.
    immutable = not os.access(path.parent, os.W_OK) and not path.with_name(path.name + "-wal").exists()
    query = f"mode=ro{'&immutable=1' if immutable else ''}&uri=true"
    return make_url(f"sqlite:///file:{quote(str(path.resolve()))}?{query}")


def _os_reason(exc: OSError) -> str:
    return "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror or str(exc)


UNIQUE_RETRIES = 5


def _is_unique_violation(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "23505" or "unique constraint failed" in str(exc.orig).lower()


def _is_contention(exc: DBAPIError) -> bool:
    """A lock wait that ran out, a deadlock or a serialization failure: the same transaction may pass later."""
    if getattr(exc.orig, "sqlstate", None) in ("40001", "40P01", "55P03"):
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text


def with_retries(engine: Engine, work: Callable[[Connection], T], *, write: bool) -> T:
    """Run ``work`` in one transaction; again, after a jittered backoff, when it meets a lock or a race.

    Contention is retried until ``RETRY_DEADLINE_S``; a uniqueness race (two writers creating the same row)
    a few times only, since one that persists is a real clash, not a race.
    """
    deadline = time.monotonic() + RETRY_DEADLINE_S
    delay = 0.005
    unique_failures = 0
    while True:
        try:
            with engine.connect() as connection:
                if write:
                    connection.execution_options(**WRITE)
                with connection.begin():
                    return work(connection)
        except DBAPIError as exc:
            if _is_unique_violation(exc):
                unique_failures += 1
                if unique_failures >= UNIQUE_RETRIES:
                    raise Conflict(f"a concurrent change kept clashing with this one: {first_line(exc)}") from None
            elif not _is_contention(exc):
                raise DatabaseError(f"registry database {safe_url(engine.url)}: {first_line(exc)}") from None
            elif time.monotonic() > deadline:
                raise DatabaseError(f"registry database {safe_url(engine.url)} stayed busy for "
                                    f"{RETRY_DEADLINE_S:.0f} s (other writers hold it); try again") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


def alembic_config(url: str | URL | None = None, *, connection: Connection | None = None) -> Config:
    """An alembic Config for the packaged migrations, bound to ``connection`` or ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % must be doubled (URL-encoded passwords).
        config.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None, "migrations/versions holds no migration"
    return head


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _has_registry_tables(connection: Connection) -> bool:
    existing = set(inspect(connection).get_table_names())
    return bool(existing & set(Model.metadata.tables))


def _state(connection: Connection) -> tuple[str | None, bool]:
    """The revision, and whether the database is fresh (no revision, none of our tables)."""
    revision = _revision(connection)
    return revision, revision is None and not _has_registry_tables(connection)


def _upgrade(connection: Connection) -> None:
    """Upgrade to head inside the caller's write transaction."""
    if connection.dialect.name == "postgresql":
        # Two processes opening a new database at once: the second waits, then finds it at head.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK_ID})")
    start = _revision(connection)
    where = safe_url(connection.engine.url)
    if start is None and _has_registry_tables(connection):
        raise DatabaseError(f"registry database {where} {NO_REVISION}")
    if start is not None and not _is_known(start):
        raise DatabaseError(f"registry database {where} is at revision {start}, {NEWER.format(head=head_revision())}")
    if start != head_revision():
        command.upgrade(alembic_config(connection=connection), "head")


def check_schema(engine: Engine) -> None:
    """Make a new or empty database current; refuse one at another revision, with what to do about it."""
    head = head_revision()
    revision, fresh = with_retries(engine, _state, write=False)
    if revision == head:
        return
    where = safe_url(engine.url)
    if fresh and "mode=ro" in str(engine.url):
        raise DatabaseError(f"registry database {where} is empty and read-only: there is nothing to read yet")
    if fresh:
        with_retries(engine, _upgrade, write=True)
        return
    if revision is None:
        raise DatabaseError(f"registry database {where} {NO_REVISION}")
    if _is_known(revision):
        raise DatabaseError(f"registry database {where} is at revision {revision}, head is {head}; "
                            "run `hub db upgrade`")
    raise DatabaseError(f"registry database {where} is at revision {revision}, {NEWER.format(head=head)}")


def _is_known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(url: str | URL) -> str:
    """Bring the database at ``url`` to the head revision (``hub db upgrade``); returns the head revision."""
    engine = make_engine(url)
    try:
        with_retries(engine, _upgrade, write=True)
        return head_revision()
    finally:
        engine.dispose()


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands (``hub db current``): ``state`` is ``current``, ``behind`` (run
    ``hub db upgrade``), ``newer`` (written by a newer adapter-hub: upgrade the package), ``empty`` (made on first
    use) or ``foreign`` (tables without a revision); ``advice`` says so in one line."""

    revision: str | None
    head: str
    state: str
    advice: str

    def to_dict(self) -> dict[str, str | None]:
        return {"revision": self.revision, "head": self.head, "state": self.state, "advice": self.advice}


def schema_status(url: str | URL) -> SchemaStatus:
    """The schema state of the database at ``url``, read without changing it."""
    engine = make_engine(url)
    try:
        revision, fresh = with_retries(engine, _state, write=False)
    finally:
        engine.dispose()
    head = head_revision()
    if revision == head:
        return SchemaStatus(revision, head, "current", "up to date")
    if fresh:
        return SchemaStatus(None, head, "empty", "empty; the hub creates the schema on first use")
    if revision is None:
        return SchemaStatus(None, head, "foreign", NO_REVISION)
    if _is_known(revision):
        return SchemaStatus(revision, head, "behind", f"head is {head}; run `hub db upgrade`")
    return SchemaStatus(revision, head, "newer", f"this registry was written by a newer adapter-hub (revision "
                                                 f"{revision}, this one knows up to {head}); upgrade adapter-hub")


def current_revision(url: str | URL) -> str | None:
    """The database's schema revision (``hub db current``); None for a database without one."""
    engine = make_engine(url)
    try:
        return with_retries(engine, _revision, write=False)
    finally:
        engine.dispose()
