"""Method variants of each version (rsLoRA, PiSSA/OLoRA/LoftQ initializations...), so `--method rslora` finds them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

A new table ``variants`` (version id, variant), filled for the versions already recorded from their stored
adapter configs by the method table's own rule (``Method.variants``), so an upgraded registry answers the same as
one that recorded them at registration. No existing table is altered.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    from hub.errors import HubError
    from hub.methods.table import lookup

    variants = op.create_table(
        "variants",
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("variant", sa.String(32), primary_key=True),
    )
    op.create_index("ix_variants_variant_version_id", "variants", ["variant", "version_id"])
    versions = sa.table("versions", sa.column("id", sa.Integer), sa.column("config", sa.JSON))
    connection = op.get_bind()
    rows = []
    for version_id, config in connection.execute(sa.select(versions.c.id, versions.c.config)):
        try:
            found = lookup((config or {}).get("peft_type")).variants(config or {})
        except HubError:  # a type this hub version does not know has no variants it can name
            found = ()
        rows += [{"version_id": version_id, "variant": variant} for variant in dict.fromkeys(found)]
    if rows:
        op.bulk_insert(variants, rows)


def downgrade() -> None:
    op.drop_index("ix_variants_variant_version_id", table_name="variants")
    op.drop_table("variants")
