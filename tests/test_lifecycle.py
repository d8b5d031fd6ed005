"""Lifecycle of versions and artifacts: the clean-up race, delete/unyank/unalias, garbage collection (store,
staging folders, the download cache), and what a killed writer leaves behind. The many-process version is in
test_lifecycle_stress.py."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from hub.client import Hub
from hub.errors import Conflict, HubError, InvalidArtifact, NotFound, QueryError
from hub.formats import Adapter, adapter_digest
from hub.lifecycle import ARTIFACT, DOWNLOAD, STAGING, collect_garbage, delete_version, store_and_register
from hub.registry import Metric, Parent, Registry
from hub.store import Store


def lora(seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    return Adapter(config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                           "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"},
                   tensors={f"{key}.lora_A.weight": torch.randn(2, 16, generator=generator),
                            f"{key}.lora_B.weight": torch.randn(16, 2, generator=generator)})


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(home=tmp_path / "home")


# ----------------------------------------------------------------------------------------- the clean-up race


def test_a_failed_registration_never_removes_what_a_concurrent_one_commits(hub: Hub) -> None:
    """Issue 10, step by step: A stores an artifact, then its registration fails in the database (a lineage parent
    that does not exist); meanwhile B registers the same content and sits between its store write and its commit.
    A's clean-up (of an artifact A did add) must leave what B's version is about to point to."""
    adapter = lora(0)
    digest = adapter_digest(adapter)
    a_stored, b_stored, a_done = threading.Event(), threading.Event(), threading.Event()
    registry = hub.registry
    fields = {"digest": digest, "spec": adapter.spec, "config": adapter.config, "size_bytes": adapter.size_bytes,
              "base": None, "base_name": None}

    def a_register():
        assert b_stored.wait(30)
        return registry.register("a", lineage=[Parent("missing", 1)], **fields)

    def b_register():
        b_stored.set()
        assert a_done.wait(30)  # A fails and cleans up while B holds the artifact between store and commit
        return registry.register("b", **fields)

    def a_put():
        hub.store.put(adapter, digest=digest)
        a_stored.set()

    b = threading.Thread(target=lambda: (a_stored.wait(30), store_and_register(
        hub.store, registry, digest, lambda: hub.store.put(adapter, digest=digest), b_register)))
    b.start()
    with pytest.raises(NotFound, match="lineage parent missing@1"):
        store_and_register(hub.store, registry, digest, a_put, a_register)
    a_done.set()
    b.join(30)
    assert hub.get("b@1").digest == digest
    assert hub.store.get(digest, verify=True).config == adapter.config
    with pytest.raises(NotFound):
        hub.get("a@1")


def test_a_failed_registration_removes_the_artifact_it_added_and_nothing_else(hub: Hub) -> None:
    kept = hub.register(lora(1), name="kept", base=None).version.digest
    with pytest.raises(InvalidArtifact):
        hub.register(lora(2), name="m", base=None, tags=["bad tag"])
    with pytest.raises(InvalidArtifact):
        hub.register(lora(1), name="m", base=None, tags=["bad tag"])  # already stored by another version
    assert hub.store.digests() == [kept]
    assert collect_garbage(hub.store, hub.registry).entries == []


# ------------------------------------------------------------------------------------- delete, unyank, unalias


def test_delete_removes_the_version_its_rows_and_its_artifact(hub: Hub) -> None:
    first = hub.register(lora(1), name="m", base=None, metrics={"accuracy": 0.9}, tags=["t"]).version
    hub.register(lora(2), name="m", base=None)
    hub.registry.set_alias("m@1", "prod")
    hub.registry.record_remote("m@1", repo_id="org/m", tag="v1", commit="c" * 40)
    with pytest.raises(QueryError, match="say which version of m to delete: m@N or m@ALIAS"):
        delete_version(hub.store, hub.registry, "m")
    report = delete_version(hub.store, hub.registry, "m@prod")
    assert report.deleted.version.ref == "m@1" and report.freed_bytes > 0
    assert [r.repo_id for r in report.deleted.remotes] == ["org/m"] and not report.deleted.artifact_referenced
    assert first.digest not in hub.store
    with pytest.raises(NotFound, match="m has no version 1"):
        hub.get("m@1")
    with pytest.raises(NotFound, match="m has no alias 'prod'"):
        hub.get("m@prod")
    assert hub.registry.list(tags=["t"]) == [] and hub.registry.list(where=["accuracy>0"]) == []
    # The number is never given out again: a pushed repository keeps its tag v2 for m@2, and v3 comes next.
    assert hub.register(lora(3), name="m", base=None).version.number == 3
    delete_version(hub.store, hub.registry, "m@3")
    assert hub.register(lora(4), name="m", base=None).version.number == 4
    assert report.to_dict()["ref"] == "m@1"


def test_delete_keeps_an_artifact_another_version_uses(hub: Hub) -> None:
    digest = hub.register(lora(1), name="a", base=None).version.digest
    hub.register(lora(1), name="b", base=None)
    report = delete_version(hub.store, hub.registry, "a@1")
    assert report.deleted.artifact_referenced and report.freed_bytes == 0
    assert hub.store.get(digest, verify=True) is not None


def test_delete_of_a_lineage_parent_is_refused_unless_forced(hub: Hub) -> None:
    hub.register(lora(1), name="p", base=None)
    hub.register(lora(2), name="child", base=None, lineage=[Parent("p", 1, weight=1.0, strategy="linear")])
    with pytest.raises(Conflict, match="p@1 is a lineage parent of child@1; delete those first, or force it"):
        hub.registry.delete("p@1")
    assert hub.get("p@1").ref == "p@1"
    deleted = hub.registry.delete("p@1", force=True)
    assert deleted.detached == ["child@1"] and hub.get("child@1").parents == []


def test_unyank_and_unalias(hub: Hub) -> None:
    hub.register(lora(1), name="m", base=None)
    hub.register(lora(2), name="m", base=None)
    hub.registry.yank("m@2")
    assert hub.get("m").ref == "m@1"
    assert hub.registry.unyank("m@2").status == "ready" and hub.get("m").ref == "m@2"
    assert hub.registry.unyank("m@2").status == "ready"  # a no-op the second time
    hub.registry.set_alias("m@1", "prod")
    hub.registry.remove_alias("m", "prod")
    with pytest.raises(NotFound, match="m has no alias 'prod'"):
        hub.registry.remove_alias("m", "prod")
    assert hub.get("m@1").aliases == []


# ------------------------------------------------------------------------------------------ garbage collection


def test_gc_lists_then_removes_exactly_the_unreferenced(hub: Hub) -> None:
    used = hub.register(lora(1), name="m", base=None).version.digest
    loose = hub.store.put(lora(2))
    member = hub.store.put(lora(3))
    # A stack names its members by digest: a member that is no registered version is still needed.
    stack = Adapter(config={"peft_type": "HUB_STACK", "members": [
        {"name": None, "number": None, "digest": member, "weight": 1.0}]}, tensors={})
    hub.register(stack, name="s", base=None)
    preview = collect_garbage(hub.store, hub.registry)
    assert preview.dry_run and [(e.kind, e.digest) for e in preview.entries] == [(ARTIFACT, loose)]
    assert preview.size_bytes == hub.store.size(loose) > 0 and loose in hub.store  # a dry run removes nothing
    done = collect_garbage(hub.store, hub.registry, dry_run=False)
    assert done.entries == preview.entries and done.kept == []
    assert set(hub.store.digests()) == {used, member, hub.get("s@1").digest}
    assert collect_garbage(hub.store, hub.registry).to_dict() == {"dry_run": True, "size_bytes": 0, "entries": [],
                                                                  "kept": []}


def test_gc_skips_what_a_writer_holds(hub: Hub) -> None:
    loose = hub.store.put(lora(2))
    with hub.store.reserve(loose):  # a registration of it is in flight
        assert collect_garbage(hub.store, hub.registry).entries == []
        done = collect_garbage(hub.store, hub.registry, dry_run=False)
        assert done.entries == [] and [e.digest for e in done.kept] == [loose] and loose in hub.store
    assert [e.digest for e in collect_garbage(hub.store, hub.registry, dry_run=False).entries] == [loose]


def _put_then_hang(root: str, seed: int, ready) -> None:  # noqa: ANN001 - a multiprocessing Event
    """In a child: store an adapter, but hang after its config is written (the staging folder is half full)."""
    import hub.store as store_module

    real = store_module.write_adapter

    def hanging(adapter, folder):  # noqa: ANN001
        real(adapter, folder)
        ready.set()
        time.sleep(600)

    store_module.write_adapter = hanging
    Store(root).put(lora(seed))


def test_a_killed_writer_leaves_a_staging_folder_that_gc_reclaims(hub: Hub) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    writer = context.Process(target=_put_then_hang, args=(str(hub.store.root), 5, ready))
    writer.start()
    try:
        assert ready.wait(60)
        [staging] = hub.store.staging()
        assert not staging.abandoned and staging.digest == adapter_digest(lora(5))
        assert collect_garbage(hub.store, hub.registry).entries == []  # a live writer's staging is not garbage
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    preview = collect_garbage(hub.store, hub.registry)
    assert [(e.kind, e.path) for e in preview.entries] == [(STAGING, str(staging.path))]
    assert collect_garbage(hub.store, hub.registry, dry_run=False).entries == preview.entries
    assert hub.store.staging() == [] and hub.store.digests() == []
    assert hub.register(lora(5), name="m", base=None).version.number == 1  # the digest is usable again


def test_gc_of_the_download_cache(hub: Hub, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    repo = cache / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "linked").write_bytes(b"x" * 10)
    (repo / "snapshots" / "abc" / "adapter_config.json").symlink_to(repo / "blobs" / "linked")
    (repo / "blobs" / "orphan").write_bytes(b"y" * 20)  # its snapshot was evicted after a bad pull
    (repo / "blobs" / "dead.1234abcd.incomplete").write_bytes(b"z" * 30)  # a killed download
    (repo / "blobs" / "live.5678abcd.incomplete").write_bytes(b"w" * 40)  # a download in progress
    locks = cache / ".locks" / repo.name
    locks.mkdir(parents=True)
    live_lock = os.open(locks / "live.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(live_lock, fcntl.LOCK_EX)  # what huggingface_hub holds while it downloads that blob
    try:
        preview = collect_garbage(hub.store, hub.registry, download_cache=cache)
        assert sorted((e.kind, Path(e.path).name, e.size_bytes) for e in preview.entries) == [
            (DOWNLOAD, "dead.1234abcd.incomplete", 30), (DOWNLOAD, "orphan", 20)]
        done = collect_garbage(hub.store, hub.registry, download_cache=cache, dry_run=False)
        assert done.size_bytes == 50
        assert sorted(p.name for p in (repo / "blobs").iterdir()) == ["linked", "live.5678abcd.incomplete"]
    finally:
        os.close(live_lock)


def _pull_killed_mid_download(hub_home: str, endpoint: str) -> None:
    """A pull that gets SIGKILL after the first bytes of the weights reach their partial file."""
    import huggingface_hub.file_download as hf_download

    from hub.remote import Remote

    real_http_get = hf_download.http_get

    def http_get(url: str, temp_file, **options):  # noqa: ANN001, ANN202 - huggingface_hub's signature
        if not url.endswith(".safetensors"):
            return real_http_get(url, temp_file, **options)
        temp_file.write(b"partial weights")
        temp_file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    hf_download.http_get = http_get
    Remote(Hub(home=hub_home), endpoint=endpoint, token="hf_gc").pull("alice/m", "v1")


def test_a_pull_killed_mid_download_leaves_a_partial_file_that_gc_reclaims(hub: Hub, tmp_path: Path) -> None:
    from hubserver import HubServer

    from hub.remote import Remote

    with HubServer(tokens={"hf_gc": "alice"}) as server:
        Remote(hub, endpoint=server.url, token="hf_gc").push(hub.register(lora(7), name="m", base=None).version.ref,
                                                            "alice/m")
        home = tmp_path / "puller"
        child = multiprocessing.get_context("fork").Process(target=_pull_killed_mid_download,
                                                            args=(str(home), server.url))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL
        puller = Hub(home=home)
        [partial] = (home / "cache" / "remote").rglob("*.incomplete")
        [lock] = partial.parent.glob("adapter_model.safetensors.lock")

        held = os.open(lock, os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)  # a live download of that file holds its lock: not garbage
        try:
            assert puller.gc().entries == []
        finally:
            os.close(held)
        listed = puller.gc()
        assert [(e.kind, e.path, e.size_bytes) for e in listed.entries] == [(DOWNLOAD, str(partial), 15)]
        assert puller.gc(dry_run=False).entries == listed.entries and not partial.exists()
        assert Remote(puller, endpoint=server.url, token="hf_gc").pull("alice/m", "v1").version.ref == "m@1"
        assert puller.gc().entries == []


def _push_killed_mid_upload(hub_home: str, endpoint: str) -> None:
    """A push that gets SIGKILL once its staging copy of the version is written, as the upload starts."""
    from huggingface_hub import HfApi

    from hub.remote import Remote

    HfApi.upload_folder = lambda *_args, **_options: os.kill(os.getpid(), signal.SIGKILL)
    Remote(Hub(home=hub_home), endpoint=endpoint, token="hf_gc").push("m@1", "alice/m")


def test_a_push_killed_mid_upload_leaves_a_staging_copy_that_gc_reclaims_once_idle(hub: Hub) -> None:
    from hubserver import HubServer

    hub.register(lora(8), name="m", base=None)
    with HubServer(tokens={"hf_gc": "alice"}) as server:
        child = multiprocessing.get_context("fork").Process(target=_push_killed_mid_upload,
                                                            args=(str(hub.settings.home), server.url))
        child.start()
        child.join(60)
    assert child.exitcode == -signal.SIGKILL
    [staging] = (hub.settings.cache_dir / "tmp").glob("push-*")
    assert (staging / "adapter_model.safetensors").is_file()
    assert hub.gc().entries == []  # it may be a push still uploading: its writer holds no lock, so age decides
    hour_ago = time.time() - 3700
    for path in (staging, *staging.iterdir()):
        os.utime(path, (hour_ago, hour_ago))
    listed = hub.gc()
    assert [(e.kind, e.path) for e in listed.entries] == [(STAGING, str(staging))] and listed.size_bytes > 0
    assert hub.gc(dry_run=False).entries == listed.entries and not staging.exists()
    assert hub.gc().entries == [] and hub.store.get(hub.get("m@1").digest, verify=True)


# ---------------------------------------------------------------------------------------------- store failures


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs: a real full disk (root only)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=64k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    os.system(f"umount {mount}")


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_tmpfs: Path) -> None:
    store = Store(tiny_tmpfs / "store")
    big = Adapter(config=lora(0).config, tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16384),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16384, 2)})
    with pytest.raises(HubError, match=r"cannot write artifact \w{12} to the store at .*: .*") as error:
        store.put(big)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert store.digests() == [] and store.staging() == []


def test_hub_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("not a folder")
    with pytest.raises(HubError, match="is a file, not a folder"):
        Registry(f"sqlite:///{home / 'registry.db'}")
    with pytest.raises(HubError, match="cannot write to the artifact store at .*: Not a directory"):
        Store(home / "store").put(lora(0))


def test_unreadable_artifacts_say_permission_denied(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    digest = store.put(lora(0))
    code = (f"from hub.store import Store\ntry:\n    Store({str(store.root)!r}).get({digest!r})\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    os.chmod(store.path(digest), 0o700)
    os.chmod(tmp_path, 0o755)
    import subprocess
    import sys
    try:
        result = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code], capture_output=True,
                                text=True, timeout=120, cwd="/")
    except (FileNotFoundError, PermissionError):
        pytest.skip("runuser is not available")
    if "HubError" not in result.stdout and "Error" not in result.stdout:
        pytest.skip(f"cannot run as nobody here: {result.stderr.strip()[:200]}")
    assert result.stdout.strip().endswith("permission denied"), result.stdout + result.stderr
    assert result.stdout.startswith("HubError cannot read artifact")


def test_metrics_survive_a_delete_of_another_version(hub: Hub) -> None:
    hub.register(lora(1), name="m", base=None, metrics=[Metric("accuracy", 0.5, "gsm8k", "test")])
    hub.register(lora(2), name="m", base=None, metrics={"accuracy": 0.7})
    hub.registry.delete("m@2")
    assert hub.get("m@1").metrics == [Metric("accuracy", 0.5, "gsm8k", "test")]
