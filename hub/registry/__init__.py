"""The versioned registry: SQLAlchemy models, alembic-managed schema, the Registry service."""

from hub.registry.database import SchemaStatus, current_revision, head_revision, schema_status, upgrade
from hub.registry.queries import Page
from hub.registry.records import (
    BaseInfo,
    Deleted,
    LineageEdge,
    Match,
    Metric,
    NewVersion,
    Parent,
    Registered,
    Remote,
    VersionInfo,
)
from hub.registry.service import Registry

__all__ = [
    "BaseInfo",
    "Deleted",
    "LineageEdge",
    "Match",
    "Metric",
    "NewVersion",
    "Page",
    "Parent",
    "Registered",
    "Registry",
    "Remote",
    "SchemaStatus",
    "VersionInfo",
    "current_revision",
    "head_revision",
    "schema_status",
    "upgrade",
]
