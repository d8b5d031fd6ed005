"""The Python front door: ``Hub`` ties the artifact store, the registry and base fingerprints together."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hub.config import Settings, load_settings
from hub.errors import Conflict, HubError
from hub.fingerprint import Fingerprint, fingerprint
from hub.formats import Adapter, adapter_digest, read_adapter, write_adapter
from hub.registry import Match, Metric, Parent, Registered, Registry, VersionInfo
from hub.store import Store

BaseLike = Fingerprint | str | os.PathLike[str] | Any


class Hub:
    """One hub: a store of artifacts and the registry that indexes them.

    >>> hub = Hub()                                   # $HUB_HOME, or ~/.adapter-hub
    >>> hub.register("out/math-lora", name="math", base="models/smollm2", metrics={"accuracy": 0.91})
    >>> [m.version.ref for m in hub.compatible("models/smollm2")]
    """

    def __init__(self, *, home: str | os.PathLike[str] | None = None, database_url: str | None = None) -> None:
        settings = load_settings()
        if home is not None:
            home = Path(home)
            settings = Settings(home=home, database_url=database_url or f"sqlite:///{home / 'registry.db'}")
        elif database_url is not None:
            settings = Settings(home=settings.home, database_url=database_url)
        self.settings = settings
        self.store = Store(settings.store_dir)
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        # Opened on first use so commands that need no database (fingerprint, export of a folder) never touch it.
        if self._registry is None:
            self._registry = Registry(self.settings.database_url)
        return self._registry

    def register(
        self,
        source: str | os.PathLike[str] | Adapter,
        *,
        name: str,
        base: BaseLike | None,
        base_name: str | None = None,
        metrics: Mapping[str, float] | Iterable[Metric] = (),
        tags: Iterable[str] = (),
        lineage: Iterable[Parent] = (),
        description: str | None = None,
        number: int | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> Registered:
        """Validate an adapter (a PEFT folder or an in-memory Adapter), store it and register a version.

        Registering the same content under the same name again returns the existing version. ``number`` keeps
        a version number chosen elsewhere (a pull keeps the number the publisher gave it).
        """
        adapter = source if isinstance(source, Adapter) else read_adapter(source)
        base_fp = self.fingerprint(base) if base is not None else None
        if base_name is None and base is not None and not isinstance(base, Fingerprint):
            base_name = str(base) if isinstance(base, (str, os.PathLike)) else getattr(base, "name_or_path", None)
        digest = adapter_digest(adapter)
        registry = self.registry  # opened before anything is stored: a database that cannot be opened stores nothing
        already_stored = digest in self.store
        self.store.put(adapter, digest=digest)
        try:
            return registry.register(
                name,
                digest=digest,
                spec=adapter.spec,
                config=adapter.config,
                size_bytes=adapter.size_bytes,
                base=base_fp,
                base_name=base_name or adapter.spec.base_model,
                metrics=_metrics(metrics),
                tags=tuple(tags),
                lineage=tuple(lineage),
                description=description,
                number=number,
                recipe=dict(recipe) if recipe is not None else None,
            )
        except BaseException:
            # Nothing half-done: an artifact this call added and no version refers to goes away again.
            if not already_stored and not registry.find_digest(digest):
                self.store.remove(digest)
            raise

    def get(self, ref: str) -> VersionInfo:
        return self.registry.get(ref)

    def load(self, ref: str) -> Adapter:
        """The adapter behind a registry reference (``name``, ``name@3``, ``name@prod``), read from the store."""
        return self.store.get(self.registry.get(ref).digest, verify=True)

    def export(self, ref: str, directory: str | os.PathLike[str]) -> Path:
        """Write a version as a PEFT folder that ``PeftModel.from_pretrained`` loads unchanged."""
        version = self.registry.get(ref)
        adapter = self.store.get(version.digest, verify=True)
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise Conflict(f"{target} exists and is not an empty folder")
        config = dict(adapter.config)
        if version.base_name:
            config["base_model_name_or_path"] = version.base_name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        except OSError as exc:
            raise HubError(f"cannot write to {target}: {exc.strerror or exc}") from None
        try:
            write_adapter(Adapter(config=config, tensors=adapter.tensors), staging)
            if target.exists():
                target.rmdir()
            os.rename(staging, target)
        except OSError as exc:
            raise HubError(f"cannot write to {target}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def list(self, **filters: Any) -> list[VersionInfo]:
        return self.registry.list(**filters)

    def compatible(self, base: BaseLike, **filters: Any) -> list[Match]:
        """Registered versions that fit ``base``: exact (same weights) first, then structural (same shapes)."""
        return self.registry.compatible(self.fingerprint(base), **filters)

    def fingerprint(self, base: BaseLike) -> Fingerprint:
        if isinstance(base, Fingerprint):
            return base
        return fingerprint(base, cache_dir=self.settings.cache_dir)


def _metrics(metrics: Mapping[str, float] | Iterable[Metric]) -> list[Metric]:
    if isinstance(metrics, Mapping):
        return [Metric(key=key, value=float(value)) for key, value in metrics.items()]
    return list(metrics)
