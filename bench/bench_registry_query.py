"""Registry query speed on SQLite at 1k, 10k and 100k versions.

Each size gets a fresh registry (schema by alembic through ``Registry``), filled by bulk inserts into the real
tables: versions of 10 each under N/10 adapter names, over 4 bases (two share their shapes, so a query sees
exact and structural matches), five methods, ranks 4..64, two metrics and a tag per version. Then it times

- ``compatible(fp, method="lora", where=["accuracy>=0.8"])``: every match, hydrated (metrics, tags, parents);
- the same with ``sort="accuracy", limit=20``: the top 20;
- ``list(where=["accuracy>=0.8", "loss<0.5"], tags=["math"])`` over all bases;
- ``get("adapter-00042@latest")``;

and, as the peer, loading every version into Python (what filtering outside SQL would need first).

    .venv/bin/python bench/bench_registry_query.py [--sizes 1000,10000,100000] [--repeat 5]
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

from hub.fingerprint import Fingerprint
from hub.registry import Registry
from hub.registry.models import AdapterRow, BaseNameRow, BaseRow, MetricRow, TagRow, VersionRow, utcnow

BASES = [
    Fingerprint("1" * 64, "a" * 64, "LlamaForCausalLM", 134_515_008),  # the base queried
    Fingerprint("2" * 64, "a" * 64, "LlamaForCausalLM", 134_515_008),  # same shapes, other weights
    Fingerprint("3" * 64, "b" * 64, "LlamaForCausalLM", 361_821_120),
    Fingerprint("4" * 64, "c" * 64, "BertModel", 22_713_216),
]
METHODS = ["lora"] * 6 + ["ia3", "loha", "lokr", "adalora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PER_ADAPTER = 10


def populate(registry: Registry, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    now = utcnow()
    with registry.engine.begin() as conn:
        base_ids = []
        for i, fp in enumerate(BASES):
            base_id = conn.execute(BaseRow.__table__.insert().returning(BaseRow.id), dict(
                weights_hash=fp.weights_hash, shape_hash=fp.shape_hash, architecture=fp.architecture,
                num_parameters=fp.num_parameters, created=now)).scalar_one()
            conn.execute(BaseNameRow.__table__.insert(), dict(base_id=base_id, name=f"models/base-{i}", revision=""))
            base_ids.append(base_id)
        adapters = [dict(id=a + 1, name=f"adapter-{a:05d}", description=None, created=now)
                    for a in range(n // PER_ADAPTER)]
        conn.execute(AdapterRow.__table__.insert(), adapters)
        versions, metrics, tags = [], [], []
        for v in range(n):
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
        conn.execute(VersionRow.__table__.insert(), versions)
        conn.execute(MetricRow.__table__.insert(), metrics)
        conn.execute(TagRow.__table__.insert(), tags)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(first call, median of the next ``repeat``) in milliseconds, and the last result."""
    start = time.perf_counter()
    result = fn()
    first = (time.perf_counter() - start) * 1000
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return first, statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fp = BASES[0]
    queries: dict[str, Callable[[Registry], Any]] = {
        "compatible(lora, accuracy>=0.8)": lambda r: r.compatible(fp, method="lora", where=["accuracy>=0.8"]),
        "compatible(... sort, limit=20)": lambda r: r.compatible(fp, method="lora", where=["accuracy>=0.8"],
                                                                 sort="accuracy", limit=20),
        "list(acc>=0.8, loss<0.5, tag)": lambda r: r.list(where=["accuracy>=0.8", "loss<0.5"], tags=["math"]),
        "get(name@latest)": lambda r: r.get("adapter-00042@latest"),
        "peer: load all into Python": lambda r: r.list(include_yanked=True),
    }
    print(f"{'versions':>9}  {'query':<34} {'rows':>6} {'first ms':>9} {'median ms':>10} {'vs peer':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            with Registry(f"sqlite:///{Path(tmp) / f'registry-{n}.db'}") as registry:
                start = time.perf_counter()
                populate(registry, n)
                print(f"{n:>9}  {'(bulk insert of the fixture)':<34} {n:>6} "
                      f"{(time.perf_counter() - start) * 1000:>9.0f}")
                results = {name: timed(lambda q=q: q(registry), args.repeat) for name, q in queries.items()}
                peer = results["peer: load all into Python"][1]
                for name, (first, median, result) in results.items():
                    rows = len(result) if isinstance(result, list) else 1
                    print(f"{n:>9}  {name:<34} {rows:>6} {first:>9.1f} {median:>10.1f} {peer / median:>7.1f}x")


if __name__ == "__main__":
    main()
