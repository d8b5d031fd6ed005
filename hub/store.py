"""The content-addressed artifact store: one folder per digest, written atomically, removed only when safe.

Layout::

    <root>/<digest[:2]>/<digest>/                 an artifact (adapter_config.json, adapter_model.safetensors)
    <root>/<digest[:2]>/.tmp-<digest>-<random>/   a write in progress (or abandoned by a killed writer)
    <root>/.locks/<digest>.lock                   the digest's lock file (flock)

A write goes to a staging folder beside its final place, is fsynced, then renamed into place, so a reader sees a
whole artifact or none.

Removal is safe against concurrent writers through a per-digest ``flock``:

* a writer holds the digest's lock SHARED from before it stores the artifact until its registry transaction has
  committed (``reserve``; ``put`` also holds it while it writes), so a staging folder always has a live holder;
* a removal takes the lock EXCLUSIVE without waiting (a writer in flight makes it give up), re-checks that nothing
  refers to the digest (the caller's ``referenced``), then deletes.

So a removal and a registration of one digest never overlap, and no version can point at a removed artifact. The
kernel drops a flock when its process dies (kill -9 included), so a crash never leaves a digest locked; what the
crash leaves (a staging folder, an unreferenced artifact) is found by garbage collection (``hub.lifecycle``).
Reads take no lock: an artifact never changes, and one that is referenced is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hub.errors import HubError, IntegrityError, InvalidArtifact, NotFound
from hub.formats import Adapter, adapter_digest, read_adapter, write_adapter

DIGEST = re.compile(r"[0-9a-f]{64}")
LOCKS = ".locks"
STAGING = ".tmp-"
STAGING_NAME = re.compile(r"\.tmp-(?P<digest>[0-9a-f]{64})-.+")
# A staging folder whose name carries no digest (written by an older release, which took no lock) counts as
# abandoned only after this long.
UNLOCKED_STAGING_AGE_S = 3600.0


@dataclass(frozen=True)
class Staging:
    """A staging folder: a write in progress, or one a killed writer left behind (``abandoned``)."""

    path: Path
    digest: str | None
    size_bytes: int
    abandoned: bool


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        # Checked, so a malformed digest (from a file, a card) can never name a folder outside the store.
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise InvalidArtifact(f"digest {digest!r} is not a lowercase sha256 hex string")
        return self.root / digest[:2] / digest

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and DIGEST.fullmatch(digest) is not None and self.path(digest).is_dir()

    # ------------------------------------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def reserve(self, *digests: str) -> Iterator[None]:
        """Hold the digests' locks shared: no removal of them can start until the block ends.

        A writer wraps "store the artifact, then commit the registry row" in it. Raises HubError when the lock
        files cannot be written (a read-only store).
        """
        with contextlib.ExitStack() as stack:
            for digest in sorted(set(digests)):
                fd = self._lock(digest, fcntl.LOCK_SH)
                assert fd is not None  # a blocking lock is always granted
                stack.callback(os.close, fd)
            yield

    def put(self, adapter: Adapter, *, digest: str | None = None) -> str:
        """Store ``adapter`` under its digest (a no-op when it is already there) and return the digest.

        Raises HubError when the store cannot be written (permissions, a full disk), leaving no staging folder.
        Without an enclosing ``reserve``, an artifact no version refers to may be collected as soon as this returns.
        """
        digest = digest or adapter_digest(adapter)
        final = self.path(digest)
        with self.reserve(digest):
            if final.is_dir():
                return digest
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                # The digest in the name tells garbage collection whose lock shows the write is still alive.
                staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{digest}-", dir=final.parent))
            except OSError as exc:
                raise HubError(f"cannot write to the artifact store at {self.root}: {_reason(exc)}") from None
            try:
                write_adapter(adapter, staging)
                _fsync_dir(staging)
                try:
                    os.rename(staging, final)
                except OSError:
                    # Another writer stored the same content first: theirs is identical, keep it.
                    if not final.is_dir():
                        raise
                _fsync_dir(final.parent)
            except OSError as exc:
                raise HubError(f"cannot write artifact {digest[:12]} to the store at {self.root}: "
                               f"{_reason(exc)}") from None
            except Exception as exc:
                # safetensors reports a failed write (ENOSPC included) as its own SafetensorError, not OSError.
                if type(exc).__name__ != "SafetensorError":
                    raise
                raise HubError(f"cannot write artifact {digest[:12]} to the store at {self.root}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'write failed'}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return digest

    def remove(self, digest: str, *, referenced: Callable[[str], bool] | None = None) -> int | None:
        """Remove the artifact ``digest`` unless a writer holds it or ``referenced(digest)`` says it is in use.

        ``referenced`` is asked while the digest is locked exclusively, so its answer cannot go stale before the
        removal: no registration of this digest can commit in between. Returns the bytes freed (0 when it was
        not there), or None when the artifact was kept.
        """
        folder = self.path(digest)
        fd = self._lock(digest, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return None
        try:
            if referenced is not None and referenced(digest):
                return None
            size = tree_size(folder)
            _remove_tree(folder)
            # Lockers check that the file they locked is still the one at the path, so unlinking it here is safe.
            _lock_path_unlink(self._lock_path(digest))
            return size
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------------ reading

    def get(self, digest: str, *, verify: bool = False) -> Adapter:
        """The artifact ``digest``. Raises NotFound when absent, IntegrityError when damaged (or, with ``verify``,
        when its content no longer hashes to ``digest``), HubError when it cannot be read (permissions)."""
        folder = self.path(digest)
        try:
            folder.stat()
        except FileNotFoundError:
            raise NotFound(f"artifact {digest[:12]} is not in the store at {self.root}") from None
        except OSError as exc:
            raise HubError(f"cannot read artifact {digest[:12]} in the store at {self.root}: {_reason(exc)}") from None
        # Checked first: unreadable files would otherwise surface as "no such file" or a damaged artifact.
        if not os.access(folder, os.R_OK | os.X_OK) or not all(os.access(p, os.R_OK) for p in folder.iterdir()):
            raise HubError(f"cannot read artifact {digest[:12]} in the store at {self.root}: permission denied")
        try:
            adapter = read_adapter(folder)
        except InvalidArtifact as exc:
            # Only whole, valid artifacts are ever stored: one that no longer reads was damaged in the store.
            raise IntegrityError(f"artifact {digest[:12]} in the store is damaged: {exc}") from None
        if verify and adapter_digest(adapter) != digest:
            raise IntegrityError(f"artifact {digest[:12]} in the store does not match its digest")
        return adapter

    def digests(self) -> list[str]:
        """Every artifact in the store (whole ones only: staging folders are not artifacts), sorted."""
        if not self.root.is_dir():
            return []
        found = []
        for shard in self.root.iterdir():
            if len(shard.name) == 2 and shard.is_dir():
                found.extend(p.name for p in shard.iterdir() if DIGEST.fullmatch(p.name) and p.is_dir())
        return sorted(found)

    def size(self, digest: str) -> int:
        """Bytes the artifact takes on disk (0 when absent)."""
        return tree_size(self.path(digest))

    # ---------------------------------------------------------------------------------------- staging folders

    def staging(self) -> list[Staging]:
        """Staging folders, each marked abandoned when no live writer holds it (its digest's lock is free)."""
        if not self.root.is_dir():
            return []
        found = []
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for folder in sorted(shard.glob(f"{STAGING}*")):
                match = STAGING_NAME.fullmatch(folder.name)
                digest = match["digest"] if match else None
                # A digest in the name: abandoned when its lock is free. None: an older release's, judged by age.
                abandoned = not self.is_held(digest) if digest else _age(folder) > UNLOCKED_STAGING_AGE_S
                found.append(Staging(folder, digest, tree_size(folder), abandoned))
        return found

    def remove_staging(self, staging: Staging) -> int | None:
        """Remove an abandoned staging folder; None (kept) when a writer turns out to hold it after all."""
        if staging.digest is None:
            if _age(staging.path) <= UNLOCKED_STAGING_AGE_S:
                return None
            size = tree_size(staging.path)
            shutil.rmtree(staging.path, ignore_errors=True)
            return size
        fd = self._lock(staging.digest, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return None
        try:
            size = tree_size(staging.path)
            shutil.rmtree(staging.path, ignore_errors=True)
            return size
        finally:
            os.close(fd)

    def prune_lock_files(self) -> None:
        """Delete lock files nobody holds (one per digest ever written would pile up otherwise)."""
        folder = self.root / LOCKS
        if not folder.is_dir():
            return
        for path in folder.glob("*.lock"):
            digest = path.stem
            if not DIGEST.fullmatch(digest):
                continue
            fd = self._lock(digest, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
            if fd is not None:
                _lock_path_unlink(path)
                os.close(fd)

    # ------------------------------------------------------------------------------------------------ locking

    def _lock_path(self, digest: str) -> Path:
        self.path(digest)  # validates
        return self.root / LOCKS / f"{digest}.lock"

    def _lock(self, digest: str, operation: int, *, create: bool = True) -> int | None:
        """An open descriptor holding ``flock(operation)`` on the digest's lock file; None when a non-blocking
        lock is held elsewhere (or, without ``create``, when there is no lock file)."""
        path = self._lock_path(digest)
        while True:
            try:
                if create:
                    path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o666)
            except FileNotFoundError:
                if not create:
                    return None
                raise HubError(f"cannot write to the artifact store at {self.root}: its folder vanished") from None
            except OSError as exc:
                raise HubError(f"cannot write to the artifact store at {self.root}: {_reason(exc)}") from None
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                os.close(fd)
                return None
            # A remover unlinks the lock file while it holds it: a lock on that old inode protects nothing.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                return fd
            os.close(fd)
            if not create:
                return None

    def is_held(self, digest: str) -> bool:
        """Whether a writer holds the digest's lock now (probed without creating anything: works read-only)."""
        path = self._lock_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False  # no lock file: no writer ever locked it since the last removal
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock too
        return False


def _reason(exc: OSError) -> str:
    """An OSError as a short reason; 'permission denied' rather than a misleading 'No such file'."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_tree(path: Path) -> None:
    """Delete an artifact folder. It is first renamed to a staging name, so a crash midway never leaves half an
    artifact under its digest (the half-deleted staging folder is garbage the next collection finishes)."""
    if not path.exists():
        return
    aside = path.with_name(f"{STAGING}{path.name}-removing-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise HubError(f"cannot remove {path}: {_reason(exc)}") from None
    shutil.rmtree(aside, ignore_errors=True)


def _lock_path_unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
