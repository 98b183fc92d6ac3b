"""outbox: area commands (docs/protocol.md §1.12), one row for many deliveries

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("device_id", existing_type=sa.String(length=64), nullable=True)
        batch_op.add_column(sa.Column("area_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("covers", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("broadcast_id", sa.String(length=36), nullable=True))


def downgrade() -> None:
    # Area rows cannot become device rows: whatever is still unsent of them is dropped.
    op.execute("DELETE FROM outbox WHERE device_id IS NULL")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("broadcast_id")
        batch_op.drop_column("covers")
        batch_op.drop_column("area_code")
        batch_op.alter_column("device_id", existing_type=sa.String(length=64), nullable=False)
