"""The registry service on real databases: the core suite on SQLite and PostgreSQL, then SQLite specifics,
schema revisions and bad URLs. Concurrency is in test_registry_concurrency.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from hub.errors import Conflict, DatabaseError, IntegrityError, InvalidArtifact, NotFound, QueryError
from hub.fingerprint import Fingerprint
from hub.formats import Adapter, AdapterSpec, adapter_digest, read_adapter, write_adapter
from hub.registry import Metric, Parent, Registry, current_revision, head_revision, upgrade
from hub.registry.database import MIGRATIONS_DIR, alembic_config
from hub.registry.models import Model
from hub.registry.search import is_search_object

BASE = Fingerprint("a" * 64, "s" * 64, "LlamaForCausalLM", 1_000)
SAME_SHAPES = Fingerprint("b" * 64, "s" * 64, "LlamaForCausalLM", 1_000)  # fine-tuned sibling: same shapes
OTHER = Fingerprint("c" * 64, "t" * 64, "BertModel", 500)
LORA8 = AdapterSpec("lora", 8, 16.0, ("q_proj", "v_proj"), "base")


def digest(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


def spec(method: str = "lora", rank: int | None = 8) -> AdapterSpec:
    return AdapterSpec(method, rank, None if rank is None else 2.0 * rank, ("q_proj", "v_proj"), "base")


def add(registry: Registry, name: str, content: str, **options):
    """Register a version whose artifact is identified by ``content``."""
    options.setdefault("spec", LORA8)
    options.setdefault("config", {"peft_type": options["spec"].method.upper(), "r": options["spec"].rank})
    options.setdefault("size_bytes", 1234)
    options.setdefault("base", BASE)
    options.setdefault("base_name", "models/base")
    return registry.register(name, digest=digest(content), **options)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def registry(db_url: str):
    with Registry(db_url) as reg:
        yield reg


@pytest.fixture
def sqlite_registry(tmp_path: Path):
    with Registry(f"sqlite:///{tmp_path / 'registry.db'}") as reg:
        yield reg


# ------------------------------------------------------------------------------------- core suite, both backends


def test_versions_are_numbered_and_same_digest_is_not_a_new_version(registry: Registry) -> None:
    first = add(registry, "math", "one", metrics=[Metric("accuracy", 0.7)], tags=["gsm8k"], description="math")
    second = add(registry, "math", "two")
    assert (first.created, first.version.ref, second.version.ref) == (True, "math@1", "math@2")
    v = first.version
    assert (v.digest, v.method, v.rank, v.alpha, v.targets) == (digest("one"), "lora", 8, 16.0, ["q_proj", "v_proj"])
    assert v.base == BASE and v.base_name == "models/base" and v.size_bytes == 1234 and v.status == "ready"
    assert v.config == {"peft_type": "LORA", "r": 8} and v.description == "math"
    assert v.created.tzinfo is not None

    again = add(registry, "math", "one", metrics=[Metric("f1", 0.5)], tags=["extra"])
    assert again.created is False and again.version.ref == "math@1"
    assert {m.key: m.value for m in again.version.metrics} == {"accuracy": 0.7, "f1": 0.5}
    assert again.version.tags == ["extra", "gsm8k"]
    assert [v.ref for v in registry.list(name="math")] == ["math@1", "math@2"]
    # The same content under another name is that name's own version 1.
    assert add(registry, "math-copy", "one").version.ref == "math-copy@1"


def test_explicit_numbers_keep_upstream_numbering(registry: Registry) -> None:
    """A pull registers a version under the number it has upstream, whatever order versions arrive in."""
    assert add(registry, "m", "three", number=3).version.ref == "m@3"
    assert add(registry, "m", "one", number=1).version.ref == "m@1"
    assert registry.get("m").ref == "m@3"
    assert add(registry, "m", "next").version.ref == "m@4"
    assert add(registry, "m", "one", number=2).version.ref == "m@1"  # the same content is the same version
    with pytest.raises(Conflict, match="m@3 already exists with another artifact"):
        add(registry, "m", "other", number=3)
    with pytest.raises(QueryError, match="version number"):
        add(registry, "m", "zero", number=0)
    assert [v.number for v in registry.list(name="m")] == [1, 3, 4]


def test_refs_resolve_numbers_aliases_and_latest(registry: Registry) -> None:
    for content in ("a", "b", "c"):
        add(registry, "math", content)
    assert registry.get("math@2").digest == digest("b")
    assert registry.get("math").ref == registry.get("math@latest").ref == "math@3"

    assert registry.set_alias("math@2", "prod").aliases == ["prod"]
    assert registry.get("math@prod").ref == "math@2"
    registry.set_alias("math@1", "prod")  # moves
    assert registry.get("math@prod").ref == "math@1"
    assert registry.get("math@2").aliases == []

    yanked = registry.yank("math@3")
    assert yanked.status == "yanked"
    assert registry.get("math").ref == "math@2"  # latest skips yanked versions
    assert registry.get("math@3").status == "yanked"  # still reachable by number

    registry.remove_alias("math", "prod")
    with pytest.raises(NotFound, match="math has no alias 'prod'"):
        registry.get("math@prod")
    with pytest.raises(NotFound, match="math has no alias 'prod'"):
        registry.remove_alias("math", "prod")


def test_unknown_refs_say_what_is_missing(registry: Registry) -> None:
    add(registry, "math-lora", "a")
    registry.set_alias("math-lora@1", "prod")
    with pytest.raises(NotFound, match=r"no adapter named 'math-lorra' \(did you mean math-lora\?\)"):
        registry.get("math-lorra")
    with pytest.raises(NotFound, match=r"math-lora has no version 7 \(versions 1\.\.1\)"):
        registry.get("math-lora@7")
    with pytest.raises(NotFound, match=r"has no alias 'staging' \(aliases: prod\)"):
        registry.get("math-lora@staging")
    registry.yank("math-lora@1")
    with pytest.raises(NotFound, match="no version that is not yanked"):
        registry.get("math-lora")
    for bad in ("math-lora@", "@3", "math lora", "-x"):
        with pytest.raises(QueryError):
            registry.get(bad)


def test_aliases_refuse_latest_and_numbers(registry: Registry) -> None:
    add(registry, "math", "a")
    with pytest.raises(QueryError, match="reserved"):
        registry.set_alias("math@1", "latest")
    with pytest.raises(QueryError, match="would shadow version 3"):
        registry.set_alias("math@1", "3")
    with pytest.raises(QueryError):
        registry.set_alias("math@1", "has space")
    assert registry.get("math@1").aliases == []


def test_list_filters_and_sorts_in_sql(registry: Registry) -> None:
    add(registry, "a", "a1", spec=spec("lora", 4), metrics=[Metric("accuracy", 0.60), Metric("loss", 1.2)])
    add(registry, "a", "a2", spec=spec("lora", 16), metrics=[Metric("accuracy", 0.90), Metric("loss", 0.4)],
        tags=["math", "prod-ready"])
    add(registry, "b", "b1", spec=spec("ia3", None), metrics=[Metric("accuracy", 0.80)], tags=["math"])
    add(registry, "c", "c1", spec=spec("lora", 32), base=OTHER)  # no metrics at all

    def refs(**filters) -> list[str]:
        return [v.ref for v in registry.list(**filters)]

    assert refs() == ["a@1", "a@2", "b@1", "c@1"]
    assert refs(method="lora") == ["a@1", "a@2", "c@1"]
    assert refs(method="LORA", min_rank=8) == ["a@2", "c@1"]
    assert refs(max_rank=16) == ["a@1", "a@2"]  # ia3 has no rank: outside any rank range
    assert refs(where=["accuracy>=0.8"]) == ["a@2", "b@1"]
    assert refs(where=["accuracy>0.8"]) == ["a@2"]
    assert refs(where=["accuracy<0.8"]) == ["a@1"]
    assert refs(where=["accuracy<=0.8"]) == ["a@1", "b@1"]
    assert refs(where=["accuracy=0.8"]) == refs(where=["accuracy==0.8"]) == ["b@1"]
    assert refs(where=["accuracy!=0.8"]) == ["a@1", "a@2"]  # c@1 has no accuracy: never matches
    assert refs(where=["accuracy>=0.5", "loss<1"]) == ["a@2"]
    assert refs(tags=["math"]) == ["a@2", "b@1"]
    assert refs(tags=["math", "prod-ready"]) == ["a@2"]
    assert refs(sort="accuracy") == ["a@2", "b@1", "a@1", "c@1"]  # best first, versions without it last
    assert refs(sort="-accuracy") == ["a@1", "b@1", "a@2", "c@1"]
    assert refs(sort="-loss", limit=1) == ["a@2"]
    assert refs(weights_hash=OTHER.weights_hash) == ["c@1"]
    assert refs(name="b") == ["b@1"] and refs(name="nobody") == []

    registry.yank("a@2")
    assert refs(where=["accuracy>=0.8"]) == ["b@1"]
    assert refs(where=["accuracy>=0.8"], include_yanked=True) == ["a@2", "b@1"]


def test_metric_conditions_on_datasets_and_splits(registry: Registry) -> None:
    add(registry, "m", "1", metrics=[Metric("accuracy", 0.9, "gsm8k", "test"), Metric("accuracy", 0.5, "mmlu")])
    add(registry, "m", "2", metrics=[Metric("accuracy", 0.6, "gsm8k", "test"), Metric("accuracy", 0.95, "mmlu")])
    assert [v.ref for v in registry.list(where=["accuracy@gsm8k>=0.8"])] == ["m@1"]
    assert [v.ref for v in registry.list(where=["accuracy@gsm8k:test>=0.8"])] == ["m@1"]
    assert [v.ref for v in registry.list(where=["accuracy@gsm8k:validation>=0.1"])] == []
    assert [v.ref for v in registry.list(where=["accuracy@mmlu>=0.8"])] == ["m@2"]
    version = registry.get("m@1")
    assert version.metric("accuracy", dataset="mmlu") == 0.5 and version.metric("accuracy", split="test") == 0.9


@pytest.mark.parametrize("condition", ["accuracy>>0.8", "accuracy", ">=0.8", "accuracy>=high", "acc uracy>1",
                                       "accuracy>=nan"])
def test_malformed_conditions_are_query_errors(sqlite_registry: Registry, condition: str) -> None:
    with pytest.raises(QueryError, match="invalid metric condition"):
        sqlite_registry.list(where=[condition])


def test_malformed_sort_and_limit_are_query_errors(sqlite_registry: Registry) -> None:
    with pytest.raises(QueryError, match="invalid sort"):
        sqlite_registry.list(sort="-")
    with pytest.raises(QueryError, match="limit must be"):
        sqlite_registry.compatible(BASE, limit=-1)
    with pytest.raises(QueryError, match="remote commit must be a non-empty string"):
        sqlite_registry.record_remote("m", repo_id="org/m", tag="v1", commit="")


def test_compatible_puts_exact_matches_first(registry: Registry) -> None:
    add(registry, "exact", "e1", metrics=[Metric("accuracy", 0.5)])
    add(registry, "exact", "e2", spec=spec("loha", 8), metrics=[Metric("accuracy", 0.7)])
    add(registry, "sibling", "s1", base=SAME_SHAPES, base_name="models/base-ft", metrics=[Metric("accuracy", 0.9)])
    add(registry, "bert", "b1", base=OTHER)
    add(registry, "unknown-base", "u1", base=None, base_name="someone/base")  # a pulled plain PEFT adapter

    matches = registry.compatible(BASE)
    assert [(m.version.ref, m.exact) for m in matches] == [("exact@1", True), ("exact@2", True),
                                                            ("sibling@1", False)]
    # From the sibling's side, the original base is structural.
    assert [(m.version.ref, m.exact) for m in registry.compatible(SAME_SHAPES)][0] == ("sibling@1", True)
    assert [m.version.ref for m in registry.compatible(BASE, method="lora")] == ["exact@1", "sibling@1"]
    assert [m.version.ref for m in registry.compatible(BASE, sort="accuracy")] == ["exact@2", "exact@1",
                                                                                   "sibling@1"]
    assert [m.version.ref for m in registry.compatible(BASE, where=["accuracy>=0.6"])] == ["exact@2", "sibling@1"]
    assert [m.version.ref for m in registry.compatible(BASE, limit=1)] == ["exact@1"]
    assert registry.compatible(Fingerprint("d" * 64, "u" * 64)) == []


def test_lineage_records_parents_and_ancestry(registry: Registry) -> None:
    a = add(registry, "a", "a").version
    b = add(registry, "b", "b").version
    merged = add(registry, "merged", "m", lineage=[
        Parent("a", 1, digest=a.digest, weight=0.7, strategy="ties", params={"density": 0.5}),
        Parent("b", 1, weight=0.3, strategy="ties", params={"density": 0.5}),
    ]).version
    assert [(p.ref, p.digest, p.weight, p.strategy, p.params) for p in merged.parents] == [
        ("a@1", a.digest, 0.7, "ties", {"density": 0.5}), ("b@1", b.digest, 0.3, "ties", {"density": 0.5})]
    add(registry, "remix", "r", lineage=[Parent("merged", 1, weight=1.0, strategy="svd"), Parent("a", 1)])

    edges = registry.lineage("remix")
    assert [(e.depth, e.child, e.parent.ref, e.position) for e in edges] == [
        (1, "remix@1", "merged@1", 0), (1, "remix@1", "a@1", 1), (2, "merged@1", "a@1", 0),
        (2, "merged@1", "b@1", 1)]
    assert registry.lineage("a") == []


def test_bad_lineage_writes_nothing(registry: Registry) -> None:
    add(registry, "a", "a")
    with pytest.raises(NotFound, match="lineage parent a@2 is not registered"):
        add(registry, "child", "c", lineage=[Parent("a", 2)])
    with pytest.raises(IntegrityError, match="lineage parent a@1 has digest"):
        add(registry, "child", "c", lineage=[Parent("a", 1, digest=digest("something else"))])
    with pytest.raises(NotFound):
        registry.get("child")
    assert registry.find_digest(digest("c")) == []


def test_metrics_are_upserted(registry: Registry) -> None:
    add(registry, "m", "1", metrics=[Metric("accuracy", 0.5), Metric("accuracy", 0.6, "gsm8k")])
    updated = registry.add_metrics("m@1", [Metric("accuracy", 0.55), Metric("bleu", 30.0, "wmt", "test")])
    assert [(m.key, m.value, m.dataset, m.split) for m in updated.metrics] == [
        ("accuracy", 0.55, None, None), ("accuracy", 0.6, "gsm8k", None), ("bleu", 30.0, "wmt", "test")]


def test_remotes_are_recorded_per_repo_and_tag(registry: Registry) -> None:
    add(registry, "m", "1")
    registry.record_remote("m@1", repo_id="org/m", tag="v1", commit="a" * 40)
    registry.record_remote("m@1", repo_id="org/m", tag="v1", commit="b" * 40)  # re-push replaces
    registry.record_remote("m", repo_id="mirror/m", tag="v1", commit="c" * 40)
    remotes = registry.remotes("m@1")
    assert sorted((r.repo_id, r.tag, r.commit) for r in remotes) == [("mirror/m", "v1", "c" * 40),
                                                                      ("org/m", "v1", "b" * 40)]
    assert all(r.pushed_at.tzinfo is not None for r in remotes)


def test_find_digest_and_bases(registry: Registry) -> None:
    add(registry, "x", "shared")
    add(registry, "y", "shared", base_name="HuggingFaceTB/SmolLM2-135M", config={"revision": "main"})
    registry.yank("y@1")
    assert [v.ref for v in registry.find_digest(digest("shared"))] == ["x@1", "y@1"]
    assert registry.find_digest(digest("nothing")) == []
    add(registry, "z", "z", base=OTHER, base_name=None)
    bases = registry.bases()
    assert [(b.fingerprint, b.names, b.versions) for b in bases] == [
        (BASE, ["models/base", "HuggingFaceTB/SmolLM2-135M@main"], 2), (OTHER, [], 1)]


def test_to_dict_is_json(registry: Registry) -> None:
    add(registry, "a", "a")
    version = add(registry, "m", "m", metrics=[Metric("accuracy", 0.9, "gsm8k", "test")], tags=["t"],
                  lineage=[Parent("a", 1, weight=1.0, strategy="linear")]).version
    registry.set_alias("m@1", "prod")
    data = json.loads(json.dumps(registry.get("m@prod").to_dict()))
    assert data["ref"] == "m@1" and data["digest"] == version.digest and data["aliases"] == ["prod"]
    assert data["base"]["weights_hash"] == BASE.weights_hash and data["tags"] == ["t"]
    assert data["metrics"] == [{"key": "accuracy", "value": 0.9, "dataset": "gsm8k", "split": "test"}]
    assert data["parents"][0]["ref"] == "a@1" and data["parents"][0]["strategy"] == "linear"


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"name": "bad name"}, QueryError, "invalid adapter name"),
    ({"name": "-dash"}, QueryError, "invalid adapter name"),
    ({"digest": "abc"}, InvalidArtifact, "not a lowercase sha256"),
    ({"metrics": [Metric("accuracy", math.nan)]}, QueryError, "not a finite number"),
    ({"metrics": [Metric("acc>", 1.0)]}, QueryError, "invalid metric name"),
    ({"tags": ["has space"]}, InvalidArtifact, "invalid tag"),
    ({"config": {"x": object()}}, InvalidArtifact, "not plain JSON"),
    ({"lineage": [Parent("a", 0)]}, QueryError, "needs a version number >= 1"),
    ({"lineage": [Parent("a", 1, weight=math.inf)]}, QueryError, "weight of lineage parent a@1"),
    ({"lineage": [Parent("a", 1, params={"f": print})]}, QueryError, "params of lineage parent a@1"),
])
def test_bad_input_is_refused_and_nothing_written(registry: Registry, options: dict, error: type,
                                                  message: str) -> None:
    values = dict(name="m", digest=digest("m"), spec=LORA8, config={}, size_bytes=1, base=BASE, base_name=None)
    values.update(options)
    with pytest.raises(error, match=message):
        registry.register(values.pop("name"), **values)
    assert registry.list(include_yanked=True) == [] and registry.bases() == []


def test_database_matches_the_models(registry: Registry) -> None:
    """The migration (what databases get) and the models (what the code queries) describe the same schema."""
    with registry.engine.connect() as conn:
        # The full-text index (migration 0005, hub.registry.search) is kept by triggers, outside the models.
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "include_name": lambda name, _type, _parent: not is_search_object(name)})
        assert compare_metadata(context, Model.metadata) == []
        assert context.get_current_revision() == head_revision()


# ----------------------------------------------------------------------------------------------- real artifacts


def test_registers_a_real_adapter_read_from_disk(sqlite_registry: Registry, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}
    tensors = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32)
            tensors[f"{key}.lora_B.weight"] = torch.randn(32, 4)
    write_adapter(Adapter(config=config, tensors=tensors), tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")

    version = sqlite_registry.register("tiny", digest=adapter_digest(adapter), spec=adapter.spec,
                                       config=adapter.config, size_bytes=adapter.size_bytes, base=BASE,
                                       base_name=adapter.spec.base_model).version
    assert (version.method, version.rank, version.alpha, version.targets) == ("lora", 4, 8.0, ["q_proj", "v_proj"])
    assert version.size_bytes == 2 * 2 * (4 * 32 + 32 * 4) * 4
    assert version.config["target_modules"] == ["q_proj", "v_proj"] and version.base_name == "tiny-llama"
    assert sqlite_registry.find_digest(adapter_digest(read_adapter(tmp_path / "adapter")))[0].ref == "tiny@1"


# ------------------------------------------------------------------------------------------------ SQLite specifics


def test_default_database_lives_in_hub_home(hub_home: Path) -> None:
    with Registry() as registry:
        add(registry, "m", "1")
    path = hub_home / "registry.db"
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM versions").fetchone()[0] == 1
    with Registry() as registry:
        assert registry.get("m").ref == "m@1"


def test_sqlite_connections_enforce_foreign_keys_and_wait_for_locks(sqlite_registry: Registry) -> None:
    with sqlite_registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_writer_waits_for_another_holding_the_lock(tmp_path: Path) -> None:
    """A second process holding SQLite's write lock makes register wait, not fail with 'database is locked'."""
    path = tmp_path / "registry.db"
    with Registry(f"sqlite:///{path}") as registry:
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sqlite3, sys, time
                conn = sqlite3.connect({str(path)!r}, isolation_level=None)
                conn.execute("BEGIN IMMEDIATE")
                print("locked", flush=True)
                time.sleep(1.5)
                conn.execute("COMMIT")
            """)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            assert add(registry, "m", "1").version.ref == "m@1"
        finally:
            holder.wait(timeout=30)


# --------------------------------------------------------------------------------------- revisions and bad URLs


def test_upgrade_and_current_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'registry.db'}"
    assert current_revision(url) is None
    assert upgrade(url) == head_revision() == current_revision(url)
    assert upgrade(url) == head_revision()  # idempotent


def test_recipe_column_migration_keeps_existing_versions(db_url: str) -> None:
    """A registry made before revision 0002 upgrades in place: old versions stay, new ones record recipes."""
    with Registry(db_url) as registry:
        add(registry, "old", "1")
    command.downgrade(alembic_config(db_url), "0001")  # as a registry made by an earlier release
    with pytest.raises(DatabaseError, match=f"is at revision 0001, head is {head_revision()}; run `hub db upgrade`"):
        Registry(db_url)
    assert upgrade(db_url) == head_revision()
    with Registry(db_url) as registry:
        new = add(registry, "new", "2", recipe={"method": "lora", "steps": 10, "seed": 0})
        assert registry.get("old@1").recipe is None
        assert registry.get("new@1").recipe == new.version.recipe == {"method": "lora", "steps": 10, "seed": 0}
        with pytest.raises(QueryError, match="recipe of 'bad' is not plain JSON"):
            add(registry, "bad", "3", recipe={"lr": float("nan")})
        assert registry.list(name="bad") == []


def test_tables_without_revision_are_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    command.stamp(alembic_config(url), "base")  # alembic_version emptied, tables kept
    with pytest.raises(DatabaseError, match="has registry tables but no schema revision"):
        Registry(url)


def test_downgraded_database_is_upgraded_again_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url) as registry:
        add(registry, "m", "1")
    command.downgrade(alembic_config(url), "base")
    assert current_revision(url) is None
    with Registry(url) as registry:
        assert registry.list() == []
    assert current_revision(url) == head_revision()


def test_revision_mismatch_between_hub_releases(tmp_path: Path) -> None:
    """A release with a new migration meets an old database, and an old release meets the upgraded one.

    The newer release is this code with one more migration in its packaged `migrations` (a copy on PYTHONPATH),
    run in a subprocess, so both sides are real alembic histories.
    """
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url) as registry:
        add(registry, "m", "1")
    newer = tmp_path / "newer"
    shutil.copytree(MIGRATIONS_DIR, newer / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "migrations" / "versions" / "9999_next.py").write_text(textwrap.dedent(f"""
        import sqlalchemy as sa
        from alembic import op

        revision = "9999"
        down_revision = {head_revision()!r}

        def upgrade():
            op.add_column("adapters", sa.Column("homepage", sa.String(200), nullable=True))

        def downgrade():
            op.drop_column("adapters", "homepage")
    """))
    script = textwrap.dedent(f"""
        from hub.errors import Conflict, DatabaseError
        from hub.registry import Registry, head_revision, upgrade
        try:
            Registry({url!r})
        except DatabaseError as exc:
            print(exc)
        print(upgrade({url!r}), head_revision())
        print(Registry({url!r}).get("m").ref)
    """)
    env = {**os.environ, "PYTHONPATH": str(newer)}
    result = subprocess.run([sys.executable, "-c", script], cwd=newer, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"registry database {url} is at revision {head_revision()}, head is 9999; run `hub db upgrade`"
    assert lines[1:] == ["9999 9999", "m@1"]

    for open_it in (Registry, upgrade):
        with pytest.raises(DatabaseError, match="at revision 9999, which this version of the hub does not know"):
            open_it(url)


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "invalid database URL"),
    ("mysql://user@localhost/hub", "unsupported database 'mysql'"),
    ("postgresql+nosuchdriver://u@localhost/db", "cannot load the database driver"),
    ("postgresql+psycopg://postgres@127.0.0.1:1/hub", "registry database postgresql\\+psycopg://.*:1/hub: "),
])
def test_bad_urls_are_database_errors(url: str, message: str) -> None:
    with pytest.raises(DatabaseError, match=message) as info:
        Registry(url)
    assert "\n" not in str(info.value)


def test_unopenable_sqlite_files_are_database_errors(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="is a directory"):
        Registry(f"sqlite:///{tmp_path}")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(DatabaseError, match="file is not a database") as info:
        Registry(f"sqlite:///{garbage}")
    assert "\n" not in str(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatabaseError, match="cannot create the folder"):
        Registry(f"sqlite:///{blocker / 'sub' / 'registry.db'}")



# ----------------------------------------------------------------------------------------------------- concurrency

WORKERS, PER_WORKER = 8, 25


def register_many(url: str, worker: int, barrier, results) -> None:  # noqa: ANN001 - multiprocessing objects
    """One process: open the (possibly brand-new) registry and register PER_WORKER versions of one name."""
    try:
        barrier.wait(timeout=120)  # every process starts at once: they race on the schema and on numbers
        with Registry(url) as registry:
            numbers = [add(registry, "shared", f"{worker}-{i}").version.number for i in range(PER_WORKER)]
        results.put((worker, numbers, None))
    except BaseException as exc:  # reported to the test, which fails with it
        results.put((worker, [], f"{type(exc).__name__}: {exc}"))


def test_concurrent_registration_numbers_every_version_once(db_url: str) -> None:
    """8 processes x 25 versions of ONE adapter on a brand-new database: exactly 1..200, no errors."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    processes = [ctx.Process(target=register_many, args=(db_url, w, barrier, results)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=60)

    assert [error for _, _, error in outcomes if error] == []
    numbers = sorted(n for _, got, _ in outcomes for n in got)
    assert numbers == list(range(1, WORKERS * PER_WORKER + 1))
    with Registry(db_url) as registry:
        versions = registry.list(name="shared")
        assert len(versions) == WORKERS * PER_WORKER
        # Each process saw the number the database kept for its digest.
        by_digest = {v.digest: v.number for v in versions}
        for worker, got, _ in outcomes:
            assert [by_digest[digest(f"{worker}-{i}")] for i in range(PER_WORKER)] == got
