"""Adapters remember the highest version number they ever gave, so a deleted version's number is never reused.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

Only columns are added (no table is rebuilt): on SQLite a rebuild drops the old table, and with foreign keys on,
that cascades into every table that refers to it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("last_number", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE adapters SET last_number = "
               "(SELECT COALESCE(MAX(number), 0) FROM versions WHERE versions.adapter_id = adapters.id)")


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch rebuild of adapters (see above).
    op.execute("ALTER TABLE adapters DROP COLUMN last_number")
