"""What spans the store and the registry: storing then registering safely, deleting a version with its artifact,
and garbage collection.

The rules that keep every registered version's artifact in the store (hub.store explains the locks):

* ``store_and_register`` holds the digest's lock shared from before the artifact is stored until the registry
  transaction has committed; on failure it releases the lock and then removes the artifact only if this call added
  it, nobody else holds it, and no version refers to it (asked under the exclusive lock);
* every removal (a failed registration's clean-up, ``delete_version``, ``collect_garbage``) goes through
  ``Store.remove`` with the registry's ``is_referenced`` as the re-check.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hub.registry import Deleted, Registry
from hub.registry.service import member_digests
from hub.store import UNLOCKED_STAGING_AGE_S, Store, tree_size

T = TypeVar("T")

__all__ = ["DeleteReport", "GcEntry", "GcReport", "collect_garbage", "delete_version", "member_digests",
           "store_and_register"]

ARTIFACT, STAGING, DOWNLOAD = "artifact", "staging", "download"
# huggingface_hub's cache layout: <cache>/<type>s--<owner>--<name>/{blobs,snapshots,refs}, locks in <cache>/.locks.
REPO_PREFIXES = ("models--", "datasets--", "spaces--")
INCOMPLETE = ".incomplete"


@dataclass(frozen=True)
class GcEntry:
    """One thing garbage collection found: an unreferenced ``artifact``, an abandoned ``staging`` folder of the
    store, or a ``download`` left in the Hub download cache (an orphaned blob or an abandoned partial file)."""

    kind: str
    path: str
    size_bytes: int
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size_bytes": self.size_bytes, "digest": self.digest}


@dataclass(frozen=True)
class GcReport:
    """``entries``: what a run would remove (``dry_run``) or removed. ``kept``: found, but a writer took it
    before it could be removed (never in a dry run)."""

    dry_run: bool
    entries: list[GcEntry] = field(default_factory=list)
    kept: list[GcEntry] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "size_bytes": self.size_bytes,
                "entries": [e.to_dict() for e in self.entries], "kept": [e.to_dict() for e in self.kept]}


@dataclass(frozen=True)
class DeleteReport:
    """A deleted version (``Registry.delete``'s result) and the bytes freed in the store (0 when another version
    or a composition still uses its artifact, or a writer held it: garbage collection takes it later)."""

    deleted: Deleted
    freed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.deleted.to_dict(), "freed_bytes": self.freed_bytes}


def store_and_register(store: Store, registry: Registry, digest: str, put: Callable[[], object],
                       register: Callable[[], T], *, members: Iterable[str] = ()) -> T:
    """``put()`` the artifact ``digest`` into ``store``, then ``register()`` it, so that no removal can come in
    between and a failed registration leaves nothing it added.

    ``members``: digests a composition artifact names; their locks are held too, so a concurrent collection
    cannot remove them before the composition's version commits. Raises whatever ``put`` or ``register`` raise.
    """
    added = False
    try:
        with store.reserve(digest, *members):
            added = digest not in store
            put()
            return register()
    except BaseException:
        # After the lock is released: the removal needs it exclusively and gives up if another writer has it.
        if added:
            with contextlib.suppress(Exception):  # the registration's own error is the one to report
                store.remove(digest, referenced=registry.is_referenced)
        raise


def delete_version(store: Store, registry: Registry, ref: str, *, force: bool = False) -> DeleteReport:
    """Delete the version ``ref`` (see ``Registry.delete``), then its artifact when nothing else needs it."""
    deleted = registry.delete(ref, force=force)
    freed = 0
    if not deleted.artifact_referenced:
        freed = store.remove(deleted.version.digest, referenced=registry.is_referenced) or 0
    return DeleteReport(deleted, freed)


def collect_garbage(store: Store, registry: Registry, *, download_cache: Path | None = None,
                    remote_downloads: Path | None = None, temporaries: Iterable[Path] = (),
                    dry_run: bool = True) -> GcReport:
    """Find (``dry_run``) or remove what nothing needs: store artifacts no version refers to (neither as its
    artifact nor as a composition member), staging folders that no live writer holds, in ``download_cache``
    (the hub's own Hugging Face download cache, ``HUB_HOME/cache/hf``) blobs no snapshot links to and partial
    downloads no live process holds, in ``remote_downloads`` (where pulls download, ``HUB_HOME/cache/remote``)
    partial files of pulls killed mid-download, and the folders matching the glob patterns ``temporaries`` (the
    hub's other temporary folders: a push's staging copy, a base being converted) untouched for an hour.

    Safe while other processes register, pull or collect: an artifact is removed only under its exclusive lock
    after the registry says, at that moment, that nothing refers to it; what a writer holds is skipped (a dry
    run does not list it; a real run reports it in ``kept``).
    """
    referenced = registry.referenced_digests()
    found: list[tuple[GcEntry, Callable[[], int | None]]] = []
    for digest in store.digests():
        if digest in referenced:
            continue
        entry = GcEntry(ARTIFACT, str(store.path(digest)), store.size(digest), digest)
        found.append((entry, lambda d=digest: store.remove(d, referenced=registry.is_referenced)))
    for staging in store.staging():
        if staging.abandoned:
            entry = GcEntry(STAGING, str(staging.path), staging.size_bytes, staging.digest)
            found.append((entry, lambda s=staging: store.remove_staging(s)))
    if download_cache is not None:
        found.extend(_download_garbage(Path(download_cache)))
    if remote_downloads is not None:
        found.extend(_partial_pulls(Path(remote_downloads)))
    found.extend(_old_temporaries(temporaries))

    if dry_run:
        # In a dry run, leave out what a writer holds right now: it is about to be referenced.
        held = {entry.digest for entry, _ in found if entry.kind == ARTIFACT and store.is_held(entry.digest)}
        return GcReport(True, [entry for entry, _ in found if entry.kind != ARTIFACT or entry.digest not in held])
    removed, kept = [], []
    for entry, remove in found:
        size = remove()
        if size is None:
            kept.append(entry)
        else:
            removed.append(GcEntry(entry.kind, entry.path, size, entry.digest))
    store.prune_lock_files()
    return GcReport(False, removed, kept)


def _old_temporaries(patterns: Iterable[Path]) -> list[tuple[GcEntry, Callable[[], int | None]]]:
    """Folders matching ``patterns`` whose newest change is over an hour old. Their writers (a push, a base
    conversion) take no lock, and none of them leaves a folder untouched that long while it runs."""
    found = []
    for pattern in patterns:
        for folder in sorted(Path(pattern.parent).glob(pattern.name)) if pattern.parent.is_dir() else ():
            if folder.is_symlink() or not folder.is_dir() or _idle_s(folder) <= UNLOCKED_STAGING_AGE_S:
                continue
            entry = GcEntry(STAGING, str(folder), tree_size(folder))
            found.append((entry, lambda f=folder: _remove_idle(f)))
    return found


def _idle_s(folder: Path) -> float:
    """Seconds since anything in ``folder`` (or the folder itself) last changed."""
    newest = 0.0
    for path in (folder, *folder.rglob("*")):
        with contextlib.suppress(OSError):
            newest = max(newest, path.lstat().st_mtime)
    return time.time() - newest


def _remove_idle(folder: Path) -> int | None:
    """Remove ``folder`` unless something in it changed since it was listed; None (kept) then."""
    if _idle_s(folder) <= UNLOCKED_STAGING_AGE_S:
        return None
    size = tree_size(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return size


# ------------------------------------------------------------------------------------- the Hub download cache


def _download_garbage(cache: Path) -> list[tuple[GcEntry, Callable[[], int | None]]]:
    """Orphaned blobs and abandoned partial downloads in a huggingface_hub cache folder.

    huggingface_hub downloads a blob, and links it into a snapshot, while holding ``.locks/<repo>/<etag>.lock``
    (an flock): we remove a blob only while holding that lock ourselves, after checking again that no snapshot
    links to it.
    """
    if not cache.is_dir():
        return []
    found = []
    for repo in sorted(cache.iterdir()):
        if not repo.name.startswith(REPO_PREFIXES) or not (repo / "blobs").is_dir():
            continue
        for blob in sorted((repo / "blobs").iterdir()):
            if not blob.is_file() or blob.is_symlink():
                continue
            etag = blob.name.split(".")[0] if blob.name.endswith(INCOMPLETE) else blob.name
            lock = cache / ".locks" / repo.name / f"{etag}.lock"
            if not blob.name.endswith(INCOMPLETE) and _linked(repo, blob):
                continue
            if _lock_held(lock):
                continue
            entry = GcEntry(DOWNLOAD, str(blob), blob.stat().st_size)
            found.append((entry, lambda r=repo, b=blob, lk=lock: _remove_blob(r, b, lk)))
    return found


def _linked(repo: Path, blob: Path) -> bool:
    """Whether a snapshot of ``repo`` links to ``blob``."""
    target = blob.resolve()
    for link in (repo / "snapshots").rglob("*") if (repo / "snapshots").is_dir() else ():
        if link.is_symlink() and link.resolve() == target:
            return True
    return False


def _lock_held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no download of this blob ever started, or it was cleaned up
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _partial_pulls(root: Path) -> list[tuple[GcEntry, Callable[[], int | None]]]:
    """Partial files that killed pulls left in the hub's download folders (``hub.remote.paths.Downloads``, which
    use huggingface_hub's ``local_dir`` mode): ``commits/<commit>/.cache/huggingface/download/**/*.incomplete``,
    each written under the flock of its file's ``.lock`` beside it, so one whose lock is free is abandoned."""
    if not root.is_dir():
        return []
    found = []
    for partial in sorted(root.glob(f"*/*/commits/*/.cache/huggingface/download/**/*{INCOMPLETE}")):
        if partial.is_symlink() or not partial.is_file():
            continue
        lock = _local_dir_lock(partial)
        if _lock_held(lock):
            continue
        entry = GcEntry(DOWNLOAD, str(partial), partial.stat().st_size)
        found.append((entry, lambda b=partial, lk=lock: _remove_blob(b.parent, b, lk)))
    return found


def _local_dir_lock(partial: Path) -> Path:
    """The lock huggingface_hub holds while it writes ``partial`` (``<hash>.<etag>.incomplete``): the ``<file>.lock``
    beside it whose ``<file>.metadata`` name hashes to ``<hash>`` (sha1, URL-safe base64: its ``_short_hash``).
    A partial file whose lock is gone gets a fresh lock name, which no download holds."""
    prefix = partial.name.split(".", 1)[0]
    for lock in partial.parent.glob("*.lock"):
        metadata = f"{lock.name[:-len('.lock')]}.metadata"
        if base64.urlsafe_b64encode(hashlib.sha1(metadata.encode()).digest()).decode() == prefix:
            return lock
    return partial.with_name(f"{partial.name}.lock")


def _remove_blob(repo: Path, blob: Path, lock: Path) -> int | None:
    """Remove ``blob`` under huggingface_hub's own lock for it; None (kept) when a download holds it or a
    snapshot links to it by now. The lock file stays: huggingface_hub's waiters share its inode."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not blob.name.endswith(INCOMPLETE) and _linked(repo, blob):
            return None
        try:
            size = blob.stat().st_size
            blob.unlink()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return 0
            raise
        return size
    finally:
        os.close(fd)
