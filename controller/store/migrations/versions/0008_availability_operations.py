"""availability transitions, remote operations and their per-device results, availability alarms

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controller.store.models import UtcDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_availability",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("detected_at", UtcDateTime(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(length=200), nullable=True),
    )
    op.create_index("ix_device_availability_device_at", "device_availability", ["device_id", "at"])
    op.create_table(
        "operations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_operations_created_at"), "operations", ["created_at"])
    op.create_table(
        "operation_results",
        sa.Column("command_id", sa.String(length=36), nullable=False),
        sa.Column("operation_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_at", UtcDateTime(), nullable=False),
        sa.Column("sent_at", UtcDateTime(), nullable=True),
        sa.Column("delivered_at", UtcDateTime(), nullable=True),
        sa.Column("ended_at", UtcDateTime(), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["operation_id"], ["operations.id"]),
        sa.PrimaryKeyConstraint("command_id"),
    )
    op.create_index(op.f("ix_operation_results_operation_id"), "operation_results", ["operation_id"])
    op.create_index(op.f("ix_operation_results_device_id"), "operation_results", ["device_id"])
    # Operation commands share the outbox (and so the dispatcher and its publish path) with plays.
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column(
            "kind", existing_type=sa.String(length=8), type_=sa.String(length=16), existing_nullable=False
        )
    # An availability alarm has no rule, metric or value.
    with op.batch_alter_table("alarms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=16), nullable=False, server_default="rule"))
        batch_op.alter_column("rule_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.alter_column("metric", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("raised_value", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM alarms WHERE source <> 'rule'")
    with op.batch_alter_table("alarms", schema=None) as batch_op:
        batch_op.alter_column("raised_value", existing_type=sa.Float(), nullable=False)
        batch_op.alter_column("metric", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("rule_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.drop_column("source")
    op.execute("DELETE FROM outbox WHERE kind NOT IN ('play', 'stop', 'show')")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column(
            "kind", existing_type=sa.String(length=16), type_=sa.String(length=8), existing_nullable=False
        )
    op.drop_index(op.f("ix_operation_results_device_id"), table_name="operation_results")
    op.drop_index(op.f("ix_operation_results_operation_id"), table_name="operation_results")
    op.drop_table("operation_results")
    op.drop_index(op.f("ix_operations_created_at"), table_name="operations")
    op.drop_table("operations")
    op.drop_index("ix_device_availability_device_at", table_name="device_availability")
    op.drop_table("device_availability")
