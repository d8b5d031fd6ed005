"""The initial registry schema: bases, adapters, versions, metrics, aliases, lineage, tags, remotes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

HASH = sa.String(length=64)
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("weights_hash", HASH, nullable=True),
        sa.Column("shape_hash", HASH, nullable=False),
        sa.Column("architecture", sa.String(length=200), nullable=True),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bases"),
        sa.UniqueConstraint("weights_hash", name="uq_bases_weights_hash"),
    )
    op.create_index("ix_bases_shape_hash", "bases", ["shape_hash"])

    op.create_table(
        "base_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("revision", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name="fk_base_names_base_id_bases", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_base_names"),
        sa.UniqueConstraint("base_id", "name", "revision", name="uq_base_names"),
    )

    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
        sa.UniqueConstraint("name", name="uq_adapters_name"),
    )

    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("digest", HASH, nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=True),
        sa.Column("base_name", sa.String(length=500), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.CheckConstraint("status IN ('ready', 'yanked')", name="ck_versions_status"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name="fk_versions_adapter_id_adapters",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name="fk_versions_base_id_bases"),
        sa.PrimaryKeyConstraint("id", name="pk_versions"),
        sa.UniqueConstraint("adapter_id", "number", name="uq_versions_number"),
        sa.UniqueConstraint("adapter_id", "digest", name="uq_versions_digest"),
    )
    op.create_index("ix_versions_base_id", "versions", ["base_id"])
    op.create_index("ix_versions_digest", "versions", ["digest"])
    op.create_index("ix_versions_method", "versions", ["method"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("dataset", sa.String(length=200), nullable=False),
        sa.Column("split", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_metrics_version_id_versions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.UniqueConstraint("version_id", "key", "dataset", "split", name="uq_metrics"),
    )
    op.create_index("ix_metrics_key_value", "metrics", ["key", "value"])

    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=100), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name="fk_aliases_adapter_id_adapters",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_aliases_version_id_versions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("adapter_id", "alias", name="pk_aliases"),
    )
    op.create_index("ix_aliases_version_id", "aliases", ["version_id"])

    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("strategy", sa.String(length=50), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_lineage_version_id_versions",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_id"], ["versions.id"], name="fk_lineage_parent_id_versions"),
        sa.PrimaryKeyConstraint("id", name="pk_lineage"),
        sa.UniqueConstraint("version_id", "position", name="uq_lineage_position"),
    )
    op.create_index("ix_lineage_parent_id", "lineage", ["parent_id"])

    op.create_table(
        "tags",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_tags_version_id_versions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "tag", name="pk_tags"),
    )
    op.create_index("ix_tags_tag", "tags", ["tag"])

    op.create_table(
        "remotes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("repo_id", sa.String(length=300), nullable=False),
        sa.Column("tag", sa.String(length=200), nullable=False),
        sa.Column("commit", sa.String(length=64), nullable=False),
        sa.Column("pushed_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_remotes_version_id_versions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_remotes"),
        sa.UniqueConstraint("version_id", "repo_id", "tag", name="uq_remotes"),
    )


def downgrade() -> None:
    for table in ("remotes", "tags", "lineage", "aliases", "metrics", "versions", "adapters", "base_names", "bases"):
        op.drop_table(table)
