"""the signing sequence of controller-to-device documents (docs/protocol.md §1.15)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "command_sequence",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("reserved_through", sa.BigInteger(), nullable=False),
    )
    # Commands sent before signing existed carried the outbox id as `seq`; devices kept no window
    # then, so starting at 0 replays nothing they could still hold.
    op.bulk_insert(table, [{"id": 1, "reserved_through": 0}])


def downgrade() -> None:
    op.drop_table("command_sequence")
