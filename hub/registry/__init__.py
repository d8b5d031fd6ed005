"""The versioned registry: SQLAlchemy models, alembic-managed schema, the Registry service."""

from hub.registry.database import current_revision, head_revision, upgrade
from hub.registry.records import BaseInfo, LineageEdge, Match, Metric, Parent, Registered, Remote, VersionInfo
from hub.registry.service import Registry

__all__ = [
    "BaseInfo",
    "LineageEdge",
    "Match",
    "Metric",
    "Parent",
    "Registered",
    "Registry",
    "Remote",
    "VersionInfo",
    "current_revision",
    "head_revision",
    "upgrade",
]
