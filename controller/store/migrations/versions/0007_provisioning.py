"""device provisioning: serials, broker credentials, decommissioning, factory secrets, claims, technicians' wards

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controller.store.models import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("serial", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("broker_password_hash", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("credentials_issued_at", UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column("decommissioned_at", UtcDateTime(), nullable=True))
        batch_op.create_unique_constraint("uq_devices_serial", ["serial"])
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wards", sa.JSON(), nullable=False, server_default="[]"))
    op.create_table(
        "factory_secrets",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("auth_key", sa.String(length=64), nullable=False),
        sa.Column("encryption_key", sa.String(length=64), nullable=False),
        sa.Column("registered_at", UtcDateTime(), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_table(
        "claims",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("firmware", sa.String(length=64), nullable=True),
        sa.Column("requested_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("decided_by", sa.String(length=36), nullable=True),
        sa.Column("decided_at", UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["serial"], ["factory_secrets.serial"]),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("nonce"),
    )
    op.create_index(op.f("ix_claims_serial"), "claims", ["serial"])


def downgrade() -> None:
    op.drop_index(op.f("ix_claims_serial"), table_name="claims")
    op.drop_table("claims")
    op.drop_table("factory_secrets")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("wards")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_constraint("uq_devices_serial", type_="unique")
        batch_op.drop_column("decommissioned_at")
        batch_op.drop_column("credentials_issued_at")
        batch_op.drop_column("broker_password_hash")
        batch_op.drop_column("serial")
