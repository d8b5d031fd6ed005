"""Registry speed at scale: queries at 10k, 100k and 1M versions on SQLite (and PostgreSQL), and bulk registration.

Each size gets a fresh registry (schema by alembic through ``Registry``), filled by bulk SQL inserts into the real
tables (not the API: a million registrations would take hours): versions of 10 each under N/10 adapter names,
over 4 bases (two share their shapes, so a query sees exact and structural matches), five methods, ranks 4..64,
two metrics and a tag per version, an alias ``prod`` on every adapter. Then it times (p50/p95 over ``--repeat``)

- ``compatible(base, method="lora", where=["accuracy>=0.8"], sort="accuracy", limit=20)``: the top 20;
- ``list(where=["accuracy>=0.8"], limit=20)``: a metric filter's first page;
- ``get("adapter-00042@prod")``;
- a full listing streamed in pages of 1000 (``--stream-max`` rows at most): rows per second;

and registering ``--register`` small LoRA folders one by one (``Hub.register``) and at once (``register_many``).

    .venv/bin/python bench/bench_registry_query.py [--sizes 10000,100000,1000000] [--postgres URL] [--repeat 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command

from hub.fingerprint import Fingerprint
from hub.registry import Registry
from hub.registry.database import alembic_config
from hub.registry.models import AdapterRow, AliasRow, BaseNameRow, BaseRow, MetricRow, TagRow, VersionRow, utcnow

BASES = [
    Fingerprint("1" * 64, "a" * 64, "LlamaForCausalLM", 134_515_008),  # the base queried
    Fingerprint("2" * 64, "a" * 64, "LlamaForCausalLM", 134_515_008),  # same shapes, other weights
    Fingerprint("3" * 64, "b" * 64, "LlamaForCausalLM", 361_821_120),
    Fingerprint("4" * 64, "c" * 64, "BertModel", 22_713_216),
]
METHODS = ["lora"] * 6 + ["ia3", "loha", "lokr", "adalora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PER_ADAPTER = 10
BULK_REVISION = "0004"  # the schema before the search index and its triggers
CHUNK = 50_000  # versions per bulk insert: bounds the memory a million rows would take at once


def populate(registry: Registry, n: int, seed: int = 0) -> None:
    """``n`` versions by bulk inserts, in one transaction.

    The rows go into the tables as revision 0004 left them, and the upgrade to head then builds the search index
    (0005) and the variants (0006) of all of them at once, as it does for an existing registry. Loading under the
    search index's row triggers (one firing per version, tag and metric row) took 212 s for 20k versions on
    PostgreSQL and 387 s for 100k on SQLite on this busy machine, against 20 s and 102 s this way."""
    rng = random.Random(seed)
    now = utcnow()
    with registry.engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), BULK_REVISION)
        base_ids = []
        for i, fp in enumerate(BASES):
            base_id = conn.execute(BaseRow.__table__.insert().returning(BaseRow.id), dict(
                weights_hash=fp.weights_hash, shape_hash=fp.shape_hash, architecture=fp.architecture,
                num_parameters=fp.num_parameters, created=now)).scalar_one()
            conn.execute(BaseNameRow.__table__.insert(), dict(base_id=base_id, name=f"models/base-{i}", revision=""))
            base_ids.append(base_id)
        adapters = [dict(id=a + 1, name=f"adapter-{a:05d}", description=None, created=now,
                         last_number=PER_ADAPTER) for a in range(n // PER_ADAPTER)]
        conn.execute(AdapterRow.__table__.insert(), adapters)
        for start in range(0, n, CHUNK):
            versions, metrics, tags, aliases = [], [], [], []
            for v in range(start, min(n, start + CHUNK)):
                method = rng.choice(METHODS)
                rank = rng.choice([4, 8, 16, 32, 64])
                targets = sorted(rng.sample(TARGETS, rng.randint(1, 4)))
                config = {"peft_type": method.upper(), "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
                          "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
                          "base_model_name_or_path": "models/base"}
                versions.append(dict(id=v + 1, adapter_id=v // PER_ADAPTER + 1, number=v % PER_ADAPTER + 1,
                                     digest=f"{v:064x}", method=method, rank=rank, alpha=2.0 * rank, targets=targets,
                                     config=config, base_id=rng.choice(base_ids), base_name="models/base",
                                     size_bytes=rank * 65_536, created=now, status="ready"))
                metrics.append(dict(version_id=v + 1, key="accuracy", value=rng.random(), dataset="", split=""))
                metrics.append(dict(version_id=v + 1, key="loss", value=2 * rng.random(), dataset="", split=""))
                tags.append(dict(version_id=v + 1, tag=rng.choice(["math", "code", "chat", "summarize"])))
                if v % PER_ADAPTER == 0:
                    aliases.append(dict(adapter_id=v // PER_ADAPTER + 1, alias="prod", version_id=v + 1))
            conn.execute(VersionRow.__table__.insert(), versions)
            conn.execute(MetricRow.__table__.insert(), metrics)
            conn.execute(TagRow.__table__.insert(), tags)
            conn.execute(AliasRow.__table__.insert(), aliases)
        command.upgrade(alembic_config(connection=conn), "head")
    if registry.engine.dialect.name == "postgresql":
        # What autovacuum would do shortly after such a load: statistics for the planner.
        with registry.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")


def percentiles(fn: Callable[[], Any], repeat: int) -> tuple[float, float, float, Any]:
    """(p50, p95, p50 of this process's CPU time) in milliseconds over ``repeat`` calls after one warm-up, and the
    last result. CPU time is the figure to read on a busy machine, where waiting for a core inflates wall time."""
    result = fn()
    times, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))], statistics.median(cpu), result


def stream(registry: Registry, most: int) -> tuple[int, float]:
    """Rows listed page by page (as ``hub list --all`` does) and the rows per second of this process's CPU time
    (the database, SQLite included, runs in it; PostgreSQL's share is not counted)."""
    start, count, after = time.process_time(), 0, None
    while count < most:
        page = registry.list(limit=1000, after=after)
        count += len(page)
        after = page.next_after
        if after is None:
            break
    return count, count / (time.process_time() - start)


def query_rows(label: str, url: str, n: int, repeat: int, stream_max: int) -> list[tuple[str, str, str, str]]:
    fp = BASES[0]
    rows = []
    with Registry(url) as registry:
        start = time.perf_counter()
        populate(registry, n)
        rows.append((label, "(bulk insert of the fixture)", f"{n:,} rows", f"{time.perf_counter() - start:.0f} s"))
        queries: dict[str, Callable[[], Any]] = {
            "compatible top-20 by accuracy": lambda: registry.compatible(
                fp, method="lora", where=["accuracy>=0.8"], sort="accuracy", limit=20),
            "list accuracy>=0.8, first page": lambda: registry.list(where=["accuracy>=0.8"], limit=20),
            "get(adapter-00042@prod)": lambda: registry.get("adapter-00042@prod"),
        }
        for name, fn in queries.items():
            p50, p95, cpu, result = percentiles(fn, repeat)
            count = len(result) if isinstance(result, list) else 1
            rows.append((label, name, f"{count} rows", f"p50 {p50:.2f} ms  p95 {p95:.2f} ms  (cpu p50 {cpu:.2f} ms)"))
        count, rate = stream(registry, stream_max)
        rows.append((label, "full listing, pages of 1000", f"{count:,} rows", f"{rate:,.0f} rows per CPU-s"))
    return rows


def registration_rows(count: int) -> list[tuple[str, str, str, str]]:
    """Versions per second: one ``register`` per folder, then ``register_many`` over the same folders."""
    import torch

    from hub.client import Hub
    from hub.formats import Adapter, write_adapter

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(count):
            generator = torch.Generator().manual_seed(i)
            prefix = "base_model.model.model.layers.0.self_attn"
            tensors = {f"{prefix}.{m}_proj.lora_{ab}.weight": torch.randn(*shape, generator=generator)
                       for m in ("q", "v") for ab, shape in (("A", (8, 576)), ("B", (576, 8)))}
            config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                      "task_type": "CAUSAL_LM", "base_model_name_or_path": "models/base"}
            folders.append(Path(tmp) / "in" / f"adapter-{i:04d}")
            write_adapter(Adapter(config=config, tensors=tensors), folders[-1])
        one = Hub(home=Path(tmp) / "one")
        start = time.perf_counter()
        for folder in folders:
            one.register(folder, name=folder.name, base=BASES[0])
        rate = count / (time.perf_counter() - start)
        rows.append(("sqlite", "register, one by one", f"{count} folders", f"{rate:,.0f} versions/s"))
        many = Hub(home=Path(tmp) / "many")
        start = time.perf_counter()
        many.register_many(folders, base=BASES[0])
        rate = count / (time.perf_counter() - start)
        rows.append(("sqlite", "register_many", f"{count} folders", f"{rate:,.0f} versions/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="SQLite registry sizes (versions)")
    parser.add_argument("--postgres", default=None, help="an EMPTY PostgreSQL database URL for one more run")
    parser.add_argument("--postgres-size", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--stream-max", type=int, default=200_000, help="rows the streamed listing reads at most")
    parser.add_argument("--register", type=int, default=200, help="folders for the registration rate (0: skip)")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",") if s):
            rows += query_rows(f"sqlite {n:,}", f"sqlite:///{Path(tmp) / f'registry-{n}.db'}", n, args.repeat,
                               args.stream_max)
            print(*rows[-5:], sep="\n", flush=True)
    if args.postgres:
        rows += query_rows(f"postgresql {args.postgres_size:,}", args.postgres, args.postgres_size, args.repeat,
                           args.stream_max)
    if args.register:
        rows += registration_rows(args.register)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
