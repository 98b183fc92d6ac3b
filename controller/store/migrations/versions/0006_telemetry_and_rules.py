"""telemetry (raw, downsampled, latest), threshold rules and alarms, device transport settings

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controller.store.models import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("config", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "telemetry",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
    )
    op.create_index("ix_telemetry_device_metric_at", "telemetry", ["device_id", "metric", "at_ms"])
    op.create_index(op.f("ix_telemetry_at_ms"), "telemetry", ["at_ms"])
    op.create_table(
        "telemetry_rollups",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("step_s", sa.Integer(), nullable=False),
        sa.Column("bucket_ms", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("minimum", sa.Float(), nullable=False),
        sa.Column("maximum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "metric", "step_s", "bucket_ms"),
    )
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(length=16), nullable=True),
        sa.Column("at", UtcDateTime(), nullable=True),
        sa.Column("rejected_count", sa.Integer(), nullable=False),
        sa.Column("rejected_at", UtcDateTime(), nullable=True),
        sa.Column("rejected_reason", sa.String(length=300), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "metric"),
    )
    op.create_table(
        "rules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("raise_at", sa.Float(), nullable=False),
        sa.Column("clear_at", sa.Float(), nullable=False),
        sa.Column("for_s", sa.Float(), nullable=False),
        sa.Column("clear_for_s", sa.Float(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("broadcast", sa.JSON(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_rules_device_id"), "rules", ["device_id"])
    op.create_table(
        "alarms",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("rule_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("raised_at", UtcDateTime(), nullable=False),
        sa.Column("raised_value", sa.Float(), nullable=False),
        sa.Column("cleared_at", UtcDateTime(), nullable=True),
        sa.Column("cleared_value", sa.Float(), nullable=True),
        sa.Column("alert_id", sa.String(length=36), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"]),
        sa.ForeignKeyConstraint(["rule_id"], ["rules.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_alarms_rule_id"), "alarms", ["rule_id"])
    op.create_index(op.f("ix_alarms_state"), "alarms", ["state"])
    op.create_index(op.f("ix_alarms_raised_at"), "alarms", ["raised_at"])


def downgrade() -> None:
    op.drop_table("alarms")
    op.drop_table("rules")
    op.drop_table("telemetry_latest")
    op.drop_table("telemetry_rollups")
    op.drop_index(op.f("ix_telemetry_at_ms"), table_name="telemetry")
    op.drop_index("ix_telemetry_device_metric_at", table_name="telemetry")
    op.drop_table("telemetry")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("config")
