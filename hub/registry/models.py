"""The registry's tables as SQLAlchemy 2.0 typed models.

Alembic owns the schema (migrations/versions); these models must match the head migration, which a test checks
with alembic's autogenerate comparison.

Optional text parts of a unique key (a metric's dataset and split, a base name's revision) are stored as ``""``
rather than NULL: SQL treats NULLs as distinct, so a unique constraint over a NULL column would not stop
duplicates, and upserts could not find the row to update. The service maps ``""`` back to ``None``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

HASH = String(64)
READY = "ready"
YANKED = "yanked"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Deterministic constraint names, so the migration and every backend agree on them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, datetime: UTCDateTime}


class BaseRow(Model):
    """A base model, identified by its fingerprint."""

    __tablename__ = "bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    weights_hash: Mapped[str | None] = mapped_column(HASH, unique=True)
    shape_hash: Mapped[str] = mapped_column(HASH, index=True)
    architecture: Mapped[str | None] = mapped_column(String(200))
    num_parameters: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class BaseNameRow(Model):
    """A name or path a base was seen under (``HuggingFaceTB/SmolLM2-135M``, ``models/smollm2``)."""

    __tablename__ = "base_names"
    __table_args__ = (UniqueConstraint("base_id", "name", "revision", name="uq_base_names"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(500))
    revision: Mapped[str] = mapped_column(String(200), default="")


class AdapterRow(Model):
    """A named line of versions."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    # The highest version number ever given, deleted versions included, so numbers are never reused.
    # Added by revision 0003.
    last_number: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class VersionRow(Model):
    """One immutable artifact of an adapter."""

    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number", name="uq_versions_number"),
        UniqueConstraint("adapter_id", "digest", name="uq_versions_digest"),
        CheckConstraint("status IN ('ready', 'yanked')", name="status"),
        # Rank filters and newest-first orders (revision 0004).
        Index("ix_versions_rank", "rank"),
        Index("ix_versions_created", "created"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(HASH, index=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    targets: Mapped[list[str]] = mapped_column(default=list)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # How the version was made (a training recipe); NULL for imported adapters. Added by revision 0002.
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # NULL for a pulled plain PEFT adapter whose base weights were never seen.
    base_id: Mapped[int | None] = mapped_column(ForeignKey("bases.id"), index=True)
    base_name: Mapped[str | None] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=READY)


class MetricRow(Model):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("version_id", "key", "dataset", "split", name="uq_metrics"),
        # Metric filters: the rows with key=K and a value in a range. Not covering (no version_id) on purpose:
        # SQLite without statistics would then scan it for per-version lookups instead of using uq_metrics.
        Index("ix_metrics_key_value", "key", "value"),
        # Conditions and sorts on one dataset or split (`accuracy@gsm8k:test>=0.8`). Revision 0004.
        Index("ix_metrics_key_dataset_split_value", "key", "dataset", "split", "value"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    dataset: Mapped[str] = mapped_column(String(200), default="")
    split: Mapped[str] = mapped_column(String(100), default="")


class AliasRow(Model):
    """``prod`` → a version. ``latest`` is never stored: it is the highest number not yanked."""

    __tablename__ = "aliases"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)


class LineageRow(Model):
    """One parent of a composed version, in order, with the weight and strategy that combined it."""

    __tablename__ = "lineage"
    __table_args__ = (UniqueConstraint("version_id", "position", name="uq_lineage_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    parent_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    weight: Mapped[float | None] = mapped_column(Float)
    strategy: Mapped[str | None] = mapped_column(String(50))
    position: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)


class TagRow(Model):
    __tablename__ = "tags"
    # The versions with a tag, answered from the index alone (it replaced ix_tags_tag in revision 0004).
    __table_args__ = (Index("ix_tags_tag_version_id", "tag", "version_id"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)


class VariantRow(Model):
    """A method variant or initialization of a version (``rslora``, ``pissa``, ``olora``...: ``Method.variants``),
    so ``--method rslora`` finds it beside its method. Added by revision 0006."""

    __tablename__ = "variants"
    __table_args__ = (Index("ix_variants_variant_version_id", "variant", "version_id"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    variant: Mapped[str] = mapped_column(String(32), primary_key=True)


class RemoteRow(Model):
    """Where a version was pushed: a Hub repository, the tag and the commit that hold it."""

    __tablename__ = "remotes"
    __table_args__ = (UniqueConstraint("version_id", "repo_id", "tag", name="uq_remotes"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    repo_id: Mapped[str] = mapped_column(String(300))
    tag: Mapped[str] = mapped_column(String(200))
    commit: Mapped[str] = mapped_column(String(64))
    pushed_at: Mapped[datetime] = mapped_column(default=utcnow)
