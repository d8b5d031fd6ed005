"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where the hub keeps its state.

    ``HUB_HOME`` holds the artifact store and the default SQLite registry; ``HUB_DATABASE_URL`` points the
    registry at any SQLAlchemy URL instead (PostgreSQL for teams) and ``HUB_STORE`` the artifact store at another
    folder (shared storage, for teams that share files without a Hub).
    """

    home: Path
    database_url: str
    store: Path | None = None

    @property
    def store_dir(self) -> Path:
        return self.store or self.home / "store"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def default_home() -> Path:
    return Path(os.environ.get("HUB_HOME") or Path.home() / ".adapter-hub").expanduser()


def load_settings() -> Settings:
    home = default_home()
    url = os.environ.get("HUB_DATABASE_URL") or f"sqlite:///{home / 'registry.db'}"
    store = os.environ.get("HUB_STORE")
    return Settings(home=home, database_url=url, store=Path(store).expanduser() if store else None)
