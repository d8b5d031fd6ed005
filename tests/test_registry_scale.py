"""The registry at scale: keyset pages equal the unpaged result (and today's order, checked against a plain Python
model of it) on SQLite and PostgreSQL; cursors; the plans of the hot queries; migration 0004; bulk registration
(Hub.register_many, hub import) with the guarantees of register; hub list --limit/--all/--jsonl."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from alembic import command
from click.testing import CliRunner
from sqlalchemy import event, text
from test_registry import BASE, LORA8, OTHER, SAME_SHAPES, digest

from cli.main import cli
from hub.client import Hub, Query
from hub.errors import InvalidArtifact, QueryError
from hub.fingerprint import Fingerprint
from hub.formats import Adapter, write_adapter
from hub.registry import Metric, NewVersion, Parent, Registry, head_revision, upgrade
from hub.registry.database import alembic_config
from hub.registry.queries import Position, decode_cursor, encode_cursor, plan

ROOT = Path(__file__).resolve().parent.parent
SHAPES_ONLY = Fingerprint(None, "s" * 64, "LlamaForCausalLM", 1_000)  # known by its shapes only


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_database")


# ------------------------------------------------------------------------- pages = the unpaged result = the model

METHODS = ["lora", "lora", "ia3", "loha"]


def populate(registry: Registry, seed: int = 0) -> list[dict[str, Any]]:
    """~150 versions with the cases an order can get wrong: several datasets per metric (best value counts), ties,
    versions without the metric, yanked versions, three bases (exact, structural, other). Returns the model."""
    rng = random.Random(seed)
    entries, model = [], []
    for i in range(150):
        name = f"a{rng.randrange(25):02d}"
        base = rng.choice([BASE, SAME_SHAPES, OTHER, SHAPES_ONLY])
        metrics = []
        for key in ("accuracy", "loss"):
            for dataset in rng.sample([None, "gsm8k", "mmlu"], rng.randrange(3)):
                # Few distinct values: ties between versions are common.
                metrics.append(Metric(key, rng.choice([0.1, 0.5, 0.5, 0.75, 0.9, rng.random()]), dataset))
        tags = rng.sample(["math", "code", "chat"], rng.randrange(3))
        rank = rng.choice([4, 8, 16])
        method = rng.choice(METHODS)
        spec = LORA8.__class__(method, rank, 2.0 * rank, ("q_proj",), "base")
        entries.append(NewVersion(name, digest=digest(f"v{i}"), spec=spec, config={"r": rank}, size_bytes=1,
                                  base=base, base_name="models/base", metrics=tuple(metrics), tags=tuple(tags)))
        model.append({"name": name, "base": base, "metrics": metrics, "tags": set(tags), "rank": rank,
                      "method": method, "yanked": False})
    results = registry.register_many(entries)
    for row, result in zip(model, results, strict=True):
        row["number"] = result.version.number
    for row in rng.sample(model, 15):
        registry.yank(f"{row['name']}@{row['number']}")
        row["yanked"] = True
    return model


def model_order(model: list[dict[str, Any]], query: dict[str, Any], base: Fingerprint | None) -> list[tuple]:
    """What list/compatible return, computed the obvious way: (ref, exact or None) in today's order."""
    def keep(row: dict[str, Any]) -> bool:
        if row["yanked"] and not query.get("include_yanked"):
            return False
        if query.get("method") and row["method"] != query["method"]:
            return False
        if query.get("min_rank") is not None and row["rank"] < query["min_rank"]:
            return False
        if not set(query.get("tags", ())) <= row["tags"]:
            return False
        for key, op, value in query.get("conditions", ()):
            if not any(m.key == key and (m.value >= value if op == ">=" else m.value < value) for m in row["metrics"]):
                return False
        return True

    def best(row: dict[str, Any], key: str, descending: bool) -> float | None:
        values = [m.value for m in row["metrics"] if m.key == key]
        return (max(values) if descending else min(values)) if values else None

    chosen = []
    for row in filter(keep, model):
        exact = None
        if base is not None:
            if row["base"].weights_hash and row["base"].weights_hash == base.weights_hash:
                exact = True
            elif row["base"].shape_hash == base.shape_hash:
                exact = False
            else:
                continue
        chosen.append((row, exact))
    sort = query.get("sort")

    def order(item: tuple) -> tuple:
        row, exact = item
        score: tuple = ()
        if sort:
            key, descending = sort.lstrip("-"), not sort.startswith("-")
            value = best(row, key, descending)
            score = (value is None, 0 if value is None else (-value if descending else value))
        return (not exact, *score, row["name"], row["number"])

    return [(f"{row['name']}@{row['number']}", exact) for row, exact in sorted(chosen, key=order)]


QUERIES = [
    {},
    {"sort": "accuracy"},
    {"sort": "-loss", "include_yanked": True},
    {"sort": "accuracy", "conditions": [("accuracy", ">=", 0.5)]},
    {"conditions": [("loss", "<", 0.8)], "tags": ["math"]},
    {"method": "lora", "min_rank": 8, "sort": "loss"},
    {"tags": ["code", "chat"], "sort": "-accuracy"},
]


def arguments(query: dict[str, Any]) -> dict[str, Any]:
    args = {k: v for k, v in query.items() if k != "conditions"}
    args["where"] = [f"{key}{op}{value}" for key, op, value in query.get("conditions", ())]
    return args


def test_pages_join_to_the_unpaged_result_in_todays_order(db_url: str) -> None:
    with Registry(db_url) as registry:
        model = populate(registry)
        rng = random.Random(1)
        for query in QUERIES:
            for base in (None, BASE, SAME_SHAPES, SHAPES_ONLY):
                expected = model_order(model, query, base)

                def run(base: Fingerprint | None = base, query: dict[str, Any] = query, **paging: Any) -> Any:
                    if base is None:
                        return registry.list(**arguments(query), **paging)
                    return registry.compatible(base, **arguments(query), **paging)

                def refs(page: Any, base: Fingerprint | None = base) -> list[tuple]:
                    if base is None:
                        return [(v.ref, None) for v in page]
                    return [(m.version.ref, m.exact) for m in page]

                whole = run()
                assert refs(whole) == expected, (query, base)
                assert whole.next_after is None
                size = rng.choice([1, 2, 3, 7, 40])
                joined, after, pages = [], None, 0
                while True:
                    page = run(limit=size, after=after)
                    assert len(page) <= size
                    joined += refs(page)
                    pages += 1
                    after = page.next_after
                    if after is None:
                        break
                assert joined == expected, (query, base, size)
                assert pages == max(1, -(-len(expected) // size)), "no empty page at the end"


def test_cursors_are_checked(tmp_path: Path) -> None:
    with Registry(f"sqlite:///{tmp_path / 'r.db'}") as registry:
        populate(registry)
        first = registry.list(sort="accuracy", limit=5)
        assert len(registry.list(sort="accuracy", limit=5, after=first.next_after)) == 5
        with pytest.raises(QueryError, match="cursor belongs to another query"):
            registry.list(sort="loss", limit=5, after=first.next_after)
        with pytest.raises(QueryError, match="cursor belongs to another query"):
            registry.compatible(BASE, sort="accuracy", limit=5, after=first.next_after)
        for bad in ["", "not a cursor", "e30", first.next_after[:-3], "!" * 10]:
            with pytest.raises(QueryError, match="invalid cursor"):
                registry.list(sort="accuracy", limit=5, after=bad)
        assert registry.list(limit=0) == [] and registry.list(limit=0).next_after is None


def test_a_cursor_is_opaque_text_a_later_search_can_reuse() -> None:
    from hub.registry.queries import Filters

    listing = plan("search", Filters(), None, [(None, False)], {"text": "math"})
    position = Position(0, None, "math-lora", 3)
    cursor = encode_cursor(listing, position)
    assert cursor.isascii() and "=" not in cursor and decode_cursor(listing, cursor) == position


# ------------------------------------------------------------------------------------------------------ plans


def bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_registry_query", ROOT / "bench" / "bench_registry_query.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def captured(registry: Registry, call: Any) -> list[tuple[str, Any]]:
    statements: list[tuple[str, Any]] = []

    def remember(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, parameters))

    event.listen(registry.engine, "before_cursor_execute", remember)
    try:
        call()
    finally:
        event.remove(registry.engine, "before_cursor_execute", remember)
    return statements


def top20(registry: Registry, bench: Any) -> Any:
    return registry.compatible(bench.BASES[0], method="lora", where=["accuracy>=0.8"], sort="accuracy", limit=20)


def test_sqlite_walks_the_indexes_for_the_top20(tmp_path: Path) -> None:
    bench = bench_module()
    with Registry(f"sqlite:///{tmp_path / 'r.db'}") as registry:
        bench.populate(registry, 5_000)
        for analyzed in (False, True):  # with and without statistics: the same plan
            if analyzed:
                with registry.engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            statement, params = next(s for s in captured(registry, lambda: top20(registry, bench))
                                     if "sort_metric" in s[0])
            with registry.engine.connect() as conn:
                plan_rows = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)]
            assert any("sort_metric USING INDEX ix_metrics_key_value" in row for row in plan_rows), plan_rows
            assert not any(row.startswith("SCAN") for row in plan_rows), plan_rows
            names = next(s for s in captured(registry, lambda: registry.list(limit=20)) if "LIMIT" in s[0])
            with registry.engine.connect() as conn:
                plan_rows = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {names[0]}", names[1])]
            assert not any("TEMP B-TREE" in row or row.startswith("SCAN versions") for row in plan_rows), plan_rows


def test_postgresql_answers_the_top20_from_indexes(postgres_database: str) -> None:
    bench = bench_module()
    with Registry(postgres_database) as registry:
        bench.populate(registry, 20_000)
        with registry.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        statement, params = next(s for s in captured(registry, lambda: top20(registry, bench)) if "sort_metric" in s[0])
        with registry.engine.connect() as conn:
            explained = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", params))
        assert "Seq Scan on versions" not in explained, explained
        assert "ix_metrics_key_value" in explained, explained
        assert len(top20(registry, bench)) == 20


# ----------------------------------------------------------------------------------------------- migration 0004


def test_migration_0004_keeps_every_row_and_adds_the_indexes(db_url: str) -> None:
    from test_schema import rows

    with Registry(db_url) as registry:
        populate(registry)
        registry.register("child", digest=digest("child"), spec=LORA8, config={}, size_bytes=1, base=BASE,
                          base_name="b", lineage=[Parent("a00", 1, weight=1.0)] if registry.list(name="a00") else [])
        registry.set_alias(registry.list(limit=1)[0].ref, "prod")
        registry.record_remote(registry.list(limit=1)[0].ref, repo_id="org/x", tag="v1", commit="c" * 40)
        before, listed = rows(registry), [v.to_dict() for v in registry.list(include_yanked=True)]
    command.downgrade(alembic_config(db_url), "0003")  # a registry as the previous release left it
    assert upgrade(db_url) == head_revision()
    with Registry(db_url) as registry:
        assert rows(registry) == before
        assert [v.to_dict() for v in registry.list(include_yanked=True)] == listed
        with registry.engine.connect() as conn:
            query = ("SELECT name FROM sqlite_master WHERE type = 'index'" if conn.dialect.name == "sqlite"
                     else "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            indexes = set(conn.execute(text(query)).scalars())
    assert {"ix_versions_rank", "ix_versions_created", "ix_metrics_key_dataset_split_value",
            "ix_tags_tag_version_id"} <= indexes and "ix_tags_tag" not in indexes


# ------------------------------------------------------------------------------------------- bulk registration


def lora_folder(root: Path, name: str, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(4, 64, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(64, 4, generator=generator)}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "models/base"}
    write_adapter(Adapter(config=config, tensors=tensors), root / name)
    return root / name


def test_register_many_registers_like_register(tmp_path: Path) -> None:
    folders = [lora_folder(tmp_path / "in", f"task-{i % 3}", i) for i in range(3)]
    more = [lora_folder(tmp_path / "more", f"m{i}", 10 + i) for i in range(5)]
    hub = Hub(home=tmp_path / "home")
    results = hub.register_many(folders, base=BASE, tags=["bulk"], metrics={"accuracy": 0.5})
    assert [r.version.ref for r in results] == ["task-0@1", "task-1@1", "task-2@1"] and all(r.created for r in results)
    assert results[0].version.tags == ["bulk"] and results[0].version.metric("accuracy") == 0.5
    one_line = hub.register_many(more, base=BASE, name="line", batch_size=2)
    assert [r.version.ref for r in one_line] == [f"line@{n}" for n in range(1, 6)]
    again = hub.register_many(more[:2], base=BASE, name="line")
    assert [(r.version.ref, r.created) for r in again] == [("line@1", False), ("line@2", False)]
    for result in results + one_line:
        assert hub.load(result.version.ref).spec.rank == 4  # stored and readable
    with pytest.raises(QueryError, match="pass name="):
        hub.register_many([hub.load("line@1")], base=BASE)


def test_a_failed_batch_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [lora_folder(tmp_path / "in", f"f{i}", i) for i in range(4)]
    hub = Hub(home=tmp_path / "home")
    hub.register_many(folders[:1], base=BASE, name="kept")
    # Refused before anything is stored: a bad tag.
    with pytest.raises(InvalidArtifact, match="invalid tag"):
        hub.register_many(folders, base=BASE, name="x", tags=["no spaces"])
    assert sorted(hub.store.digests()) == [hub.get("kept@1").digest]
    # Failing in the registry after the artifacts were stored: no version, and the new artifacts are removed again
    # (kept@1's, stored before, stays: it is referenced).
    def fail(entries: list[NewVersion]) -> Any:
        assert len(list(hub.store.digests())) == 4  # all stored by then
        raise RuntimeError("injected")

    monkeypatch.setattr(hub.registry, "register_many", fail)
    with pytest.raises(RuntimeError, match="injected"):
        hub.register_many(folders, base=BASE, name="x")
    assert [v.ref for v in hub.list()] == ["kept@1"]
    assert sorted(hub.store.digests()) == [hub.get("kept@1").digest]


def test_register_many_is_one_transaction(tmp_path: Path) -> None:
    with Registry(f"sqlite:///{tmp_path / 'r.db'}") as registry:
        good = NewVersion("a", digest=digest("1"), spec=LORA8, config={}, size_bytes=1, base=BASE, base_name="b")
        clash = NewVersion("a", digest=digest("2"), spec=LORA8, config={}, size_bytes=1, base=BASE, base_name="b",
                           number=1)
        with pytest.raises(Exception, match="a@1 already exists"):
            registry.register_many([good, clash])
        assert registry.list(include_yanked=True) == []


# -------------------------------------------------------------------------------------------------------- CLI


def test_hub_import_and_paged_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HUB_DATABASE_URL", raising=False)
    from peft_saved import save_base

    base = save_base(tmp_path / "base", seed=0)
    folders = [str(lora_folder(tmp_path / "in", f"imp-{i}", i)) for i in range(5)]
    runner = CliRunner()
    result = runner.invoke(cli, ["import", *folders, "--base", str(base), "--tag", "bulk"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"registered imp-{i}@1" for i in range(5)]

    limited = runner.invoke(cli, ["list", "--limit", "2", "--json"])
    assert [v["ref"] for v in json.loads(limited.stdout)] == ["imp-0@1", "imp-1@1"]
    cursor = limited.stderr.split("--after ")[1].split()[0]
    assert "--all" in limited.stderr
    rest = runner.invoke(cli, ["list", "--limit", "2", "--after", cursor, "--json"])
    assert [v["ref"] for v in json.loads(rest.stdout)] == ["imp-2@1", "imp-3@1"]
    streamed = runner.invoke(cli, ["list", "--all", "--jsonl", "--compatible-with", str(base)])
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [(v["ref"], v["match"]) for v in lines] == [(f"imp-{i}@1", "exact") for i in range(5)]
    assert streamed.stderr == ""
    assert runner.invoke(cli, ["list", "--limit", "x"]).exit_code == 2


def write_transactions(registry: Registry, call: Any) -> int:
    """How many transactions that wrote rows ``call`` committed on ``registry``."""
    wrote: dict[int, bool] = {}
    committed = []

    def begin(conn) -> None:
        wrote[id(conn)] = False

    def remember(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            wrote[id(conn)] = True

    def commit(conn) -> None:
        committed.append(wrote.pop(id(conn), False))

    listeners = [("begin", begin), ("before_cursor_execute", remember), ("commit", commit)]
    for name, fn in listeners:
        event.listen(registry.engine, name, fn)
    try:
        call()
    finally:
        for name, fn in listeners:
            event.remove(registry.engine, name, fn)
    return sum(committed)


def test_bulk_registration_takes_one_transaction_per_batch(tmp_path: Path) -> None:
    """What makes hub import faster than registering one by one (bench/bench_registry_query.py measures it): a
    transaction per batch, not per version; the versions are the same."""
    folders = [lora_folder(tmp_path / "in", f"s{i}", i) for i in range(12)]
    one = Hub(home=tmp_path / "one")
    assert write_transactions(one.registry, lambda: [one.register(f, name="s", base=BASE) for f in folders]) == 12
    many = Hub(home=tmp_path / "many")
    assert write_transactions(many.registry, lambda: many.register_many(folders, base=BASE, name="s")) == 1
    assert write_transactions(many.registry, lambda: many.register_many(folders, base=BASE, name="t",
                                                                        batch_size=5)) == 3
    assert [(v.number, v.digest) for v in one.list()] == [(v.number, v.digest) for v in many.list(Query(name="s"))]


def test_rows_are_built_without_a_query_per_row(db_url: str) -> None:
    """A page of 100 versions (each with metrics, tags, aliases, lineage) takes a handful of statements: a query per
    segment of the order (exact, structural; with or without the sort metric) and one per related table."""
    with Registry(db_url) as registry:
        populate(registry)
        registry.register("child", digest=digest("child"), spec=LORA8, config={}, size_bytes=1, base=BASE,
                          base_name="b", lineage=[Parent(registry.list(limit=1)[0].name, 1, weight=1.0)])
        for call in (lambda: registry.list(limit=100, include_yanked=True),
                     lambda: registry.compatible(SHAPES_ONLY, sort="accuracy", limit=100, include_yanked=True)):
            pages: list[Any] = []
            statements = captured(registry, lambda call=call, pages=pages: pages.append(call()))
            assert len(pages[0]) == 100 and len(statements) <= 15, [s for s, _ in statements]
