"""The content-addressed store: one folder per digest, whole or absent, verified on read, safe under races."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hub.errors import HubError, IntegrityError, InvalidArtifact, NotFound
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, Adapter, adapter_digest
from hub.store import LOCKS, Store


def lora(seed: int = 0, **config) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    values = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"}
    return Adapter(config={**values, **config}, tensors=tensors)


def files_under(root: Path) -> list[Path]:
    """Every file of the store but its lock files (bookkeeping, removed by garbage collection)."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and LOCKS not in p.relative_to(root).parts)


def same(a: Adapter, b: Adapter) -> bool:
    return a.config == b.config and a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_put_then_get_gives_the_adapter_back_under_its_digest(store: Store) -> None:
    adapter = lora()
    digest = store.put(adapter)
    assert digest == adapter_digest(adapter) and digest in store
    assert store.path(digest) == store.root / digest[:2] / digest
    assert sorted(p.name for p in store.path(digest).iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert same(store.get(digest, verify=True), adapter)


def test_the_same_content_is_stored_once(store: Store) -> None:
    first = lora()
    # The same adapter as saved elsewhere: other tensor order, other base path, module list in another order.
    elsewhere = Adapter(config={**first.config, "base_model_name_or_path": "/other/place",
                                "target_modules": ["v_proj", "q_proj"]},
                        tensors=dict(reversed(list(first.tensors.items()))))
    digest = store.put(first)
    stored = files_under(store.root)
    mtimes = [p.stat().st_mtime_ns for p in stored]
    assert store.put(elsewhere) == store.put(first) == digest
    assert files_under(store.root) == stored and [p.stat().st_mtime_ns for p in stored] == mtimes
    assert store.put(lora(seed=1)) != digest
    assert len(store.digests()) == 2


def test_a_flipped_bit_in_a_stored_tensor_is_caught_by_verify(store: Store) -> None:
    adapter = lora()
    digest = store.put(adapter)
    weights = store.path(digest) / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-4] ^= 1  # lowest mantissa bit of the file's last float32: still a finite, plausible value
    weights.write_bytes(bytes(data))
    assert not same(store.get(digest), adapter)  # without verify the damage goes unnoticed...
    with pytest.raises(IntegrityError, match=f"artifact {digest[:12]} in the store does not match its digest"):
        store.get(digest, verify=True)  # ...with it, never


def test_an_edited_stored_config_is_caught_by_verify(store: Store) -> None:
    digest = store.put(lora())
    config = store.path(digest) / CONFIG_NAME
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 16'))
    assert store.get(digest).config["lora_alpha"] == 16
    with pytest.raises(IntegrityError, match="does not match its digest"):
        store.get(digest, verify=True)


@pytest.mark.parametrize("damage", ["truncate", "delete config", "nan"])
def test_a_stored_artifact_that_no_longer_reads_is_an_integrity_error(damage: str, store: Store) -> None:
    digest = store.put(lora())
    folder = store.path(digest)
    if damage == "truncate":
        (folder / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes()[:100])
    elif damage == "delete config":
        (folder / CONFIG_NAME).unlink()
    else:
        data = bytearray((folder / WEIGHTS_NAME).read_bytes())
        data[-4:] = bytes.fromhex("0000c07f")  # a float32 NaN
        (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    for verify in (False, True):
        with pytest.raises(IntegrityError, match=f"artifact {digest[:12]} in the store is damaged: ") as error:
            store.get(digest, verify=verify)
        assert "\n" not in str(error.value)


def test_missing_and_removed_artifacts(store: Store) -> None:
    digest = store.put(lora())
    other = adapter_digest(lora(seed=1))
    with pytest.raises(NotFound, match=f"artifact {other[:12]} is not in the store"):
        store.get(other)
    store.remove(digest)
    assert digest not in store and files_under(store.root) == []
    store.remove(digest)  # removing what is not there is fine
    with pytest.raises(NotFound):
        store.get(digest)


@pytest.mark.parametrize("digest", ["", "..", "../..", "ab", "A" * 64, "g" * 64, "../" + "a" * 61, None])
def test_a_malformed_digest_never_names_a_folder(digest, store: Store, tmp_path: Path) -> None:
    kept = store.put(lora())
    (tmp_path / "outside.txt").write_text("keep me")
    assert digest not in store
    calls = [store.remove, store.get, store.path]
    if digest:  # put(digest=None or "") computes the digest itself
        calls.append(lambda d: store.put(lora(seed=2), digest=d))
    for call in calls:
        with pytest.raises(InvalidArtifact, match="is not a lowercase sha256 hex string"):
            call(digest)
    assert kept in store and (tmp_path / "outside.txt").read_text() == "keep me"
    assert len(files_under(store.root)) == 2


def test_a_write_failing_midway_leaves_nothing(store: Store) -> None:
    """The config is written, then a tensor cannot be serialized: no artifact, no temporary folder remain."""
    good = lora()
    broken = Adapter(config=good.config, tensors={**good.tensors, "base_model.model.x.lora_A.weight":
                                                  torch.empty(4, 32, device="meta")})
    digest = adapter_digest(good)  # any well-formed address
    with pytest.raises(NotImplementedError, match="meta tensor"):
        store.put(broken, digest=digest)
    assert digest not in store and files_under(store.root) == []
    assert [p for p in store.root.rglob("*") if p.name.startswith(".tmp-")] == []
    assert store.put(good) == digest and store.get(digest, verify=True).config == good.config


def test_a_store_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    store = Store(blocker / "store")
    with pytest.raises(HubError, match=r"cannot write to the artifact store at .*not-a-folder/store: ") as error:
        store.put(lora())
    assert "\n" not in str(error.value) and blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_store_is_one_line_and_leaves_nothing(store: Store) -> None:
    adapter = lora()
    digest = adapter_digest(adapter)
    store.path(digest).parent.mkdir(parents=True)
    store.path(digest).parent.chmod(0o500)
    try:
        with pytest.raises(HubError, match="cannot write to the artifact store") as error:
            store.put(adapter)
        assert "\n" not in str(error.value)
        assert digest not in store and files_under(store.root) == []
    finally:
        store.path(digest).parent.chmod(0o700)


def test_a_temporary_folder_left_by_a_crash_is_ignored(store: Store) -> None:
    adapter = lora()
    digest = adapter_digest(adapter)
    crashed = store.path(digest).parent / ".tmp-crashed"
    crashed.mkdir(parents=True)
    (crashed / CONFIG_NAME).write_text("{")  # half an artifact
    assert digest not in store
    assert store.put(adapter) == digest
    assert same(store.get(digest, verify=True), adapter)


def test_concurrent_puts_of_the_same_content_store_it_once(store: Store) -> None:
    """Eight writers race on each of three adapters: every one gets the digest, one whole copy remains."""
    workers = 8
    for seed in range(3):
        adapter = lora(seed)
        barrier = threading.Barrier(workers)

        def put(_: int, adapter: Adapter = adapter, barrier: threading.Barrier = barrier) -> str:
            barrier.wait(timeout=60)
            return store.put(adapter)

        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(put, range(workers)))
        assert digests == [adapter_digest(adapter)] * workers
        assert same(store.get(digests[0], verify=True), adapter)
    assert len(store.digests()) == 3
    assert [p for p in store.root.rglob("*") if p.name.startswith(".tmp-")] == []
    assert len(files_under(store.root)) == 6
