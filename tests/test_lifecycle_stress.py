"""Many processes register, fail, delete, get killed and collect garbage on one hub at once; afterwards every
registered version's artifact is whole, and garbage collection finds exactly what nothing refers to.

The failure this guards against (issue 10): a registration that fails after its store write cleaned up an
artifact that a concurrent registration of the same content had just committed a version for.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from hub.client import Hub
from hub.errors import HubError, InvalidArtifact, NotFound
from hub.formats import Adapter
from hub.lifecycle import ARTIFACT, STAGING, collect_garbage, delete_version
from hub.registry import Parent, Registry
from hub.store import Store

WORKERS = 8
DURATION_S = 20.0
SEEDS = 12  # few distinct artifacts: workers keep colliding on the same digests
FRESH_SEEDS = 1000  # and above: content new to the store
NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
# Failing registrations: half give a bad tag (refused before anything is stored), half name a lineage parent that
# does not exist (refused by the database after the artifact was stored: the clean-up path that raced).
FAIL_RATE = 0.35
MISSING_PARENT = Parent("no-such-parent", 1)
DELETE_RATE = 0.2  # deletions: their artifacts become garbage while others register the same content again
KILL_EVERY_S = (0.3, 1.2)


def adapter(seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.randn(2, 16, generator=generator),
               f"{key}.lora_B.weight": torch.randn(16, 2, generator=generator)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"}
    return Adapter(config=config, tensors=tensors)


def content(rng: random.Random) -> Adapter:
    """One of the few adapters the workers keep colliding on or, half the time, the one new to the store that every
    worker acting in the same quarter second picks: a registration that fails then has added an artifact that a
    concurrent one is registering (the race)."""
    return adapter(rng.randrange(SEEDS) if rng.random() < 0.5 else FRESH_SEEDS + int(time.time() * 4))


def worker(home: str, url: str, seed: int, stop_at: float, log: str) -> None:
    """Register, fail and delete at random until ``stop_at``; one line per outcome in ``log``."""
    rng = random.Random(seed)
    hub = Hub(home=home, database_url=url)
    registry_register_many = hub.registry.register_many

    def slow_register_many(*args: object, **options: object) -> object:
        # A slow database: widens the time between storing an artifact and committing its version, where
        # another process's clean-up or collection could strike.
        time.sleep(rng.uniform(0, 0.02))
        return registry_register_many(*args, **options)

    hub.registry.register_many = slow_register_many  # type: ignore[method-assign]
    with open(log, "a") as out:
        while time.time() < stop_at:
            name = rng.choice(NAMES)
            try:
                if rng.random() < DELETE_RATE:
                    versions = hub.registry.list(name=name, include_yanked=True)
                    if versions and rng.random() < 0.5:
                        delete_version(hub.store, hub.registry, rng.choice(versions).ref, force=True)
                        out.write("deleted\n")
                    elif versions:  # the registry row only: its artifact is left for the collector
                        hub.registry.delete(rng.choice(versions).ref, force=True)
                        out.write("deleted\n")
                elif rng.random() < FAIL_RATE:
                    if rng.random() < 0.5:
                        hub.register(content(rng), name=name, base=None, tags=["bad tag"])
                        out.write("unexpected success\n")
                    else:
                        try:
                            # A line of its own, which never gets a version: the same content again under a
                            # registered line would return that version instead of failing.
                            hub.register(content(rng), name="never", base=None,
                                         lineage=[MISSING_PARENT])
                            out.write("unexpected success\n")
                        except NotFound:
                            out.write("failed-after-store\n")
                else:
                    version = hub.register(content(rng), name=name, base=None, tags=["ok"]).version
                    out.write("registered\n")
                    # Audited at once: a later registration of the same content would fill a hole again. Under
                    # the digest's lock no removal can run, so "referenced but absent" is a real hole.
                    with hub.store.reserve(version.digest):
                        if hub.registry.is_referenced(version.digest) and version.digest not in hub.store:
                            out.write(f"missing {version.ref}\n")
            except InvalidArtifact:
                out.write("failed\n")
            except HubError as exc:  # a deleted version raced with a listing, for instance: reported, not fatal
                out.write(f"hub error {type(exc).__name__}\n")
            out.flush()


def collector(home: str, url: str, stop_at: float, log: str) -> None:
    """Collect garbage for real, over and over, while the workers run."""
    store, registry = Store(Path(home) / "store"), Registry(url)
    with open(log, "a") as out:
        while time.time() < stop_at:
            report = collect_garbage(store, registry, dry_run=False)
            out.write(f"gc {len(report.entries)} {report.size_bytes} {len(report.kept)}\n")
            out.flush()
            time.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def stress_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    return request.getfixturevalue("postgres_database")


def test_registrations_failures_kills_and_gc_never_lose_an_artifact(tmp_path: Path, stress_url: str) -> None:
    home, logs = tmp_path / "home", tmp_path / "logs"
    logs.mkdir()
    Registry(stress_url).close()  # the schema exists before the processes start
    adapter(0)  # its method's modules (transformers among them) imported once here, not again in every fork
    context = multiprocessing.get_context("fork")  # no re-import of torch per process, so kills are cheap
    stop_at = time.time() + DURATION_S
    rng = random.Random(0)

    def start(index: int) -> multiprocessing.Process:
        seed = rng.randrange(2**31)
        if index == WORKERS:
            process = context.Process(target=collector, args=(str(home), stress_url, stop_at, str(logs / "gc")))
        else:
            process = context.Process(target=worker, args=(str(home), stress_url, seed, stop_at,
                                                           str(logs / f"worker-{seed}")))
        process.start()
        return process

    processes = [start(index) for index in range(WORKERS + 1)]  # the last one collects garbage
    kills = 0
    while time.time() < stop_at - 1:
        time.sleep(rng.uniform(*KILL_EVERY_S))
        index = rng.randrange(len(processes))
        assert processes[index].exitcode is None, f"a process exited early with {processes[index].exitcode}"
        os.kill(processes[index].pid, signal.SIGKILL)
        processes[index].join()
        kills += 1
        processes[index] = start(index)
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0, f"a process exited with {process.exitcode}"

    outcomes = [line.split()[0] for path in logs.iterdir() for line in path.read_text().splitlines()]
    registered, failed, deleted = outcomes.count("registered"), outcomes.count("failed"), outcomes.count("deleted")
    failed_after_store = outcomes.count("failed-after-store")
    collections = [line.split() for line in (logs / "gc").read_text().splitlines()]
    assert "unexpected" not in outcomes and "missing" not in outcomes
    assert registered > 30 and failed > 10 and failed_after_store > 10 and deleted > 5 and kills >= 10
    assert len(collections) > 10

    store = Store(home / "store")
    with Registry(stress_url) as registry:
        versions = registry.list(include_yanked=True)
        for version in versions:  # the property that matters: no version points at a missing or damaged artifact
            store.get(version.digest, verify=True)
        referenced = registry.referenced_digests()
        preview = collect_garbage(store, registry, dry_run=True)
        garbage = {e.digest for e in preview.entries if e.kind == ARTIFACT}
        assert garbage == set(store.digests()) - referenced
        assert all(e.kind in (ARTIFACT, STAGING) for e in preview.entries)
        removed = collect_garbage(store, registry, dry_run=False)
        assert sorted((e.kind, e.path) for e in removed.entries) == sorted((e.kind, e.path) for e in preview.entries)
        assert removed.kept == [] and removed.size_bytes == preview.size_bytes
        assert set(store.digests()) == referenced & set(store.digests()) and store.staging() == []
        assert collect_garbage(store, registry, dry_run=True).entries == []
        for version in registry.list(include_yanked=True):
            store.get(version.digest, verify=True)
    print(f"\nstress ({stress_url.split(':')[0]}): {WORKERS} workers + 1 collector, {DURATION_S:.0f} s, "
          f"{registered} registrations, {failed} + {failed_after_store} injected failures (before / after the store "
          f"write), {deleted} deletions, {kills} kills, "
          f"{len(collections)} collections removed {sum(int(c[1]) for c in collections)} entries "
          f"({sum(int(c[2]) for c in collections)} bytes) and kept {sum(int(c[3]) for c in collections)} that a "
          f"writer held, during the run; {len(versions)} versions at the end, "
          f"final collection removed {len(removed.entries)} entries ({removed.size_bytes} bytes)")
