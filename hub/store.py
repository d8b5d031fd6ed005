"""The content-addressed artifact store: one folder per digest, written atomically.

``<root>/<digest[:2]>/<digest>/`` holds the artifact's files. A write goes to a temporary folder beside it,
is fsynced, then renamed into place, so a reader sees a whole artifact or none, and a crash leaves only a
temporary folder that the next write ignores.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from hub.errors import HubError, IntegrityError, InvalidArtifact, NotFound
from hub.formats import Adapter, adapter_digest, read_adapter, write_adapter

DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        # Checked, so a malformed digest (from a file, a card) can never name a folder outside the store.
        if not isinstance(digest, str) or not DIGEST.match(digest):
            raise InvalidArtifact(f"digest {digest!r} is not a lowercase sha256 hex string")
        return self.root / digest[:2] / digest

    def __contains__(self, digest: str) -> bool:
        return isinstance(digest, str) and DIGEST.match(digest) is not None and self.path(digest).is_dir()

    def put(self, adapter: Adapter, *, digest: str | None = None) -> str:
        """Store ``adapter`` under its digest (a no-op when it is already there) and return the digest."""
        digest = digest or adapter_digest(adapter)
        final = self.path(digest)
        if final.is_dir():
            return digest
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        except OSError as exc:
            raise HubError(f"cannot write to the artifact store at {self.root}: {exc.strerror or exc}") from None
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
                           f"{exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return digest

    def get(self, digest: str, *, verify: bool = False) -> Adapter:
        folder = self.path(digest)
        if not folder.is_dir():
            raise NotFound(f"artifact {digest[:12]} is not in the store at {self.root}")
        try:
            adapter = read_adapter(folder)
        except InvalidArtifact as exc:
            # Only whole, valid artifacts are ever stored: one that no longer reads was damaged in the store.
            raise IntegrityError(f"artifact {digest[:12]} in the store is damaged: {exc}") from None
        if verify and adapter_digest(adapter) != digest:
            raise IntegrityError(f"artifact {digest[:12]} in the store does not match its digest")
        return adapter

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
