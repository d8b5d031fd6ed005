"""One schema contract on SQLite and PostgreSQL: limits checked before the database sees a value, strict refs and
integers, no control characters; the 0003 migration keeps every row; read-only registries; schema status."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from hub.errors import DatabaseError, InvalidArtifact, QueryError
from hub.fingerprint import Fingerprint
from hub.formats import AdapterSpec
from hub.registry import Metric, Parent, Registry, head_revision, schema_status, upgrade
from hub.registry.database import alembic_config
from hub.registry.refs import check_int, parse_ref

BASE = Fingerprint("a" * 64, "s" * 64, "LlamaForCausalLM", 1_000)
LORA8 = AdapterSpec("lora", 8, 16.0, ("q_proj", "v_proj"), "base")


def digest(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()


def add(registry: Registry, name: str, content: str, **options):
    values = dict(digest=digest(content), spec=LORA8, config={"peft_type": "LORA", "r": 8}, size_bytes=1,
                  base=BASE, base_name="models/base")
    values.update(options)
    return registry.register(name, **values)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'registry.db'}" if request.param == "sqlite" else \
        request.getfixturevalue("postgres_database")
    with Registry(url) as reg:
        yield reg


def rows(registry: Registry) -> dict[str, int]:
    with registry.engine.connect() as conn:
        return {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in ("adapters", "versions", "metrics", "aliases", "tags", "lineage", "remotes", "bases",
                              "base_names")}


# ------------------------------------------------------------------------------------------------ the limits

TOO_LONG = [
    ({"metrics": [Metric("accuracy", 1.0, "d" * 201)]}, QueryError, "metric dataset 'ddd.* is 201 characters long; "
     "at most 200"),
    ({"metrics": [Metric("accuracy", 1.0, "gsm8k", "s" * 101)]}, QueryError, "metric split .* at most 100"),
    ({"metrics": [Metric("k" * 101, 1.0)]}, QueryError, "invalid metric name"),
    ({"base_name": "/" + "p" * 500}, QueryError, "base name .* is 501 characters long; at most 500"),
    ({"tags": ["t" * 101]}, InvalidArtifact, "invalid tag"),
    ({"description": "x" * 10_001}, QueryError, "description .* at most 10000"),
    ({"lineage": [Parent("a", 1, strategy="s" * 51)]}, QueryError, "strategy of lineage parent a@1 .* at most 50"),
    ({"spec": AdapterSpec("lora", 2**31, 1.0, ("q",), "b")}, InvalidArtifact, "adapter rank must be between"),
    ({"spec": AdapterSpec("m" * 33, 8, 1.0, ("q",), "b")}, InvalidArtifact, "adapter method .* at most 32"),
    ({"base": Fingerprint("a" * 64, "s" * 64, "A" * 201, 1)}, QueryError, "base architecture .* at most 200"),
    ({"base": Fingerprint("a" * 65, "s" * 64, "A", 1)}, QueryError, "base weights hash .* at most 64"),
    ({"number": 2**31}, QueryError, "version number must be between 1 and 2147483647"),
    ({"size_bytes": 2**63}, InvalidArtifact, "artifact size must be between"),
    ({"config": {"peft_type": "LORA", "revision": "r" * 201}}, QueryError, "base revision .* at most 200"),
]


@pytest.mark.parametrize(("options", "error", "message"), TOO_LONG)
def test_values_past_a_limit_are_refused_on_every_backend(registry: Registry, options: dict, error: type,
                                                          message: str) -> None:
    add(registry, "a", "a")
    before = rows(registry)
    with pytest.raises(error, match=message) as info:
        add(registry, "m", "m", **options)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert rows(registry) == before


def test_values_at_the_limits_are_stored_on_every_backend(registry: Registry) -> None:
    version = add(registry, "n" * 200, "m", base_name="/" + "p" * 499, description="d\n" * 5000,
                  metrics=[Metric("k" * 100, 1e308, "d" * 200, "s" * 100)], tags=["t" * 100],
                  base=Fingerprint("a" * 64, "s" * 64, "A" * 200, 2**63 - 1), number=2**31 - 1).version
    registry.set_alias(version.ref, "a" * 100)
    registry.record_remote(version.ref, repo_id="o/" + "r" * 298, tag="t" * 200, commit="c" * 64)
    got = registry.get(f"{'n' * 200}@{'a' * 100}")
    assert got.number == 2**31 - 1 and got.base_name == "/" + "p" * 499 and got.metrics[0].dataset == "d" * 200


@pytest.mark.parametrize("name", ["date\n", "date\r", "da\x00te", "date\t", "\u2028date", "dáte"])
def test_names_with_control_characters_are_refused(registry: Registry, name: str) -> None:
    with pytest.raises(QueryError, match="invalid adapter name"):
        add(registry, name, "m")
    assert registry.list(include_yanked=True) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tags", ["ok\n"], "invalid tag"),
    ("tags", ["bell\x07"], "invalid tag"),
    ("description", "nul\x00", "description .* contains the control character '\\\\x00'"),
    ("base_name", "models/base\n", "base name .* contains the control character"),
    ("metrics", [Metric("accuracy\n", 1.0)], "invalid metric name"),
    ("metrics", [Metric("accuracy", 1.0, "gsm8k\n")], "metric dataset .* contains"),
    ("metrics", [Metric("accuracy", 1.0, "gsm8k:main")], "metric dataset .* contains ':'"),
    ("metrics", [Metric("accuracy", 1.0, "gsm8k", "te st")], "metric split .* contains whitespace"),
    ("metrics", [Metric("accuracy", 1.0, "\ud800")], "metric dataset .* contains the control character"),
])
def test_control_characters_are_refused_in_every_field(registry: Registry, field: str, value, message: str) -> None:
    with pytest.raises((QueryError, InvalidArtifact), match=message):
        add(registry, "m", "m", **{field: value})
    assert registry.list(include_yanked=True) == []


def test_descriptions_keep_their_newlines(registry: Registry) -> None:
    assert add(registry, "m", "m", description="line one\nline two\ttabbed").version.description == \
        "line one\nline two\ttabbed"


@pytest.mark.parametrize(("alias", "message"), [
    ("v1", "alias 'v1' looks like a version tag"),
    ("v12", "looks like a version tag"),
    ("main", "looks like a git branch"),
    ("HEAD", "looks like a git branch"),
    ("refs/heads/x", "invalid alias"),
    ("a/b", "invalid alias"),
    ("0123456789abcdef0123456789abcdef01234567", "looks like a git branch, ref or commit"),
    ("prod\n", "invalid alias"),
])
def test_aliases_that_read_as_tags_or_refs_are_refused(registry: Registry, alias: str, message: str) -> None:
    add(registry, "m", "m")
    with pytest.raises(QueryError, match=message):
        registry.set_alias("m@1", alias)
    assert registry.get("m@1").aliases == []
    registry.set_alias("m@1", "v1-candidate")  # a word that starts like a tag is fine


@pytest.mark.parametrize(("ref", "message"), [
    ("m@²", "invalid reference"),
    ("m@١", "invalid reference"),
    ("m@99999999999999999999", "version number in 'm@99999999999999999999' must be between 1 and 2147483647"),
    ("m@0", "must be between 1 and"),
    ("m\n", "invalid adapter name"),
    ("m@1\n", "invalid reference"),
])
def test_refs_are_parsed_strictly(registry: Registry, ref: str, message: str) -> None:
    add(registry, "m", "m")
    with pytest.raises(QueryError, match=message):
        registry.get(ref)


def test_rank_filters_and_check_int_are_strict(registry: Registry) -> None:
    add(registry, "m", "m")
    for bad in (-1, 2**31, "١", "1_0", " 7", True, 2.5):
        with pytest.raises(QueryError, match="minimum rank must be"):
            registry.list(min_rank=bad)
    assert [v.ref for v in registry.list(min_rank="8", max_rank=8)] == ["m@1"]
    assert check_int("12", "--min-rank") == 12 and parse_ref("m@007").number == 7
    with pytest.raises(QueryError, match="--min-rank must be a whole number, not '²'"):
        check_int("²", "--min-rank")


def test_remote_records_are_checked(registry: Registry) -> None:
    add(registry, "m", "m")
    for options, message in [({"repo_id": "org/m\n"}, "remote repo id"), ({"tag": "v 1"}, "remote tag"),
                             ({"commit": "c" * 65}, "remote commit")]:
        values = {"repo_id": "org/m", "tag": "v1", "commit": "c" * 40, **options}
        with pytest.raises(QueryError, match=message):
            registry.record_remote("m@1", **values)
    assert registry.remotes("m@1") == []


# --------------------------------------------------------------------------------------------- migration 0003


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0003_keeps_every_row(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}" if backend == "sqlite" else \
        request.getfixturevalue("postgres_database")
    with Registry(url) as registry:
        add(registry, "a", "a1", metrics=[Metric("accuracy", 0.5, "gsm8k", "test")], tags=["x"])
        add(registry, "a", "a2", lineage=[Parent("a", 1, weight=1.0)])
        add(registry, "b", "b1")
        registry.set_alias("b@1", "prod")
        registry.record_remote("b@1", repo_id="org/b", tag="v1", commit="c" * 40)
        before = rows(registry)
    command.downgrade(alembic_config(url), "0002")  # a registry as the previous release left it
    with pytest.raises(DatabaseError, match=f"is at revision 0002, head is {head_revision()}; run `hub db upgrade`"):
        Registry(url)
    assert upgrade(url) == head_revision()
    with Registry(url) as registry:
        assert rows(registry) == before
        assert registry.get("a@2").parents[0].ref == "a@1" and registry.get("b@prod").ref == "b@1"
        assert registry.get("a@1").metrics == [Metric("accuracy", 0.5, "gsm8k", "test")]
        registry.delete("a@2")
        assert add(registry, "a", "a3").version.number == 3  # last_number was backfilled from the versions


# ------------------------------------------------------------------------------------------------- read-only


@pytest.fixture
def read_only_home(tmp_path: Path):
    """A registry on a read-only bind mount: what a shared, mounted registry looks like (root included)."""
    source = tmp_path / "source"
    with Registry(f"sqlite:///{source / 'registry.db'}") as registry:
        add(registry, "m", "m", metrics=[Metric("accuracy", 0.9)])
    mount = tmp_path / "mounted"
    mount.mkdir()
    if os.system(f"mount --bind {source} {mount} 2>/dev/null && mount -o remount,ro,bind {mount} 2>/dev/null"):
        os.system(f"umount {mount} 2>/dev/null")
        pytest.skip("cannot make a read-only bind mount here")
    yield source, mount
    os.system(f"umount {mount}")


def test_a_read_only_registry_reads_and_writes_nothing(read_only_home: tuple[Path, Path]) -> None:
    source, mount = read_only_home
    listing = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in source.iterdir())
    with Registry(f"sqlite:///{mount / 'registry.db'}") as registry:
        assert [v.ref for v in registry.list()] == ["m@1"] and registry.get("m").metrics[0].value == 0.9
        assert "mode=ro" in str(registry.engine.url)
        with pytest.raises(DatabaseError, match="readonly database"):
            add(registry, "n", "n")
    assert sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in source.iterdir()) == listing


def test_reading_a_registry_whose_file_is_not_writable_opens_it_read_only(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mount: a file this process may not write (as os.access says) is opened with mode=ro, and the
    journal mode (a write to the file) is left alone."""
    path = tmp_path / "registry.db"
    with Registry(f"sqlite:///{path}") as registry:
        add(registry, "m", "m")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")  # so a WAL switch on open would show in the header
    header = path.read_bytes()[:100]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode))
    with Registry(f"sqlite:///{path}") as registry:
        assert registry.get("m").ref == "m@1"
    assert path.read_bytes()[:100] == header


# --------------------------------------------------------------------------------------------- schema status


def test_schema_status_says_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    assert schema_status(url).state == "empty"
    upgrade(url)
    assert schema_status(url).advice == "up to date"
    command.downgrade(alembic_config(url), "0002")
    assert schema_status(url).advice == f"head is {head_revision()}; run `hub db upgrade`"
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    status = schema_status(url)
    assert status.state == "newer" and status.advice.startswith(
        "this registry was written by a newer adapter-hub (revision 9999") and status.advice.endswith(
        "upgrade adapter-hub")
    with pytest.raises(DatabaseError, match="at revision 9999, which this version of the hub does not know"):
        upgrade(url)


def test_no_credentials_in_messages() -> None:
    with pytest.raises(DatabaseError) as info:
        Registry("postgresql+psycopg://user:s3cret@127.0.0.1:1/hub")
    assert "s3cret" not in str(info.value)

