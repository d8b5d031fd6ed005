"""Indexes for every filter and order the registry offers, so queries stay fast at a million versions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

Only indexes are created and dropped: no table is rebuilt and no row is touched, so an upgrade keeps every row
(on SQLite a table rebuild would cascade deletes through foreign keys; see 0003).
"""

from __future__ import annotations

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_versions_rank", "versions", ["rank"])
    op.create_index("ix_versions_created", "versions", ["created"])
    op.create_index("ix_metrics_key_dataset_split_value", "metrics", ["key", "dataset", "split", "value"])
    # (tag, version_id) answers "the versions with this tag" from the index alone; (tag) alone is redundant.
    op.create_index("ix_tags_tag_version_id", "tags", ["tag", "version_id"])
    op.drop_index("ix_tags_tag", table_name="tags")


def downgrade() -> None:
    op.create_index("ix_tags_tag", "tags", ["tag"])
    op.drop_index("ix_tags_tag_version_id", table_name="tags")
    op.drop_index("ix_metrics_key_dataset_split_value", table_name="metrics")
    op.drop_index("ix_versions_created", table_name="versions")
    op.drop_index("ix_versions_rank", table_name="versions")
