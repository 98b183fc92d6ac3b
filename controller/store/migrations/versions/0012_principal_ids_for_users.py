"""who-did-it columns wide enough for console users

The columns that record who made or approved something held an API key's id (a UUID, 36 characters);
a console user acts as `user:<uuid>` (41), which PostgreSQL refused. They take 64 now.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PRINCIPAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "broadcasts": ("created_by",),
    "schedules": ("created_by",),
    "alerts": ("created_by", "approved_by", "cancelled_by"),
    "audit_log": ("key_id",),
    "rules": ("created_by",),
    "operations": ("created_by",),
    "rollouts": ("created_by",),
}


def _resize(old: int, new: int) -> None:
    for table, columns in PRINCIPAL_COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, type_=sa.String(length=new), existing_type=sa.String(length=old))
    if op.get_bind().dialect.name == "sqlite":
        # SQLite alters a column by copying the table: the copy has none of the old table's triggers, and
        # the audit log must stay append-only (0004).
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )


def upgrade() -> None:
    _resize(36, 64)


def downgrade() -> None:
    _resize(64, 36)
