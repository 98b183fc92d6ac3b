"""devices: comm-loss policy for the cached programme

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("comm_loss_policy", sa.String(length=16), server_default="keep", nullable=False)
        )
        batch_op.add_column(sa.Column("comm_loss_after_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("comm_loss_after_s")
        batch_op.drop_column("comm_loss_policy")
