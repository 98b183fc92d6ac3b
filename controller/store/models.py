"""SQLModel tables. Timestamps are stored as timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Who made or approved something: an API key's id (a UUID) or a console user's `user:<uuid>`.
PRINCIPAL_ID_LENGTH = 64


def _utc_column(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable, index=index))


class AreaRow(SQLModel, table=True):
    __tablename__ = "areas"

    code: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    kind: str = Field(max_length=16)
    parent_code: str | None = Field(default=None, foreign_key="areas.code", index=True, max_length=64)
    admin_code: str | None = Field(default=None, max_length=16)
    lat: float | None = None
    lon: float | None = None


class DeviceRow(SQLModel, table=True):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("transport", "address", name="uq_devices_transport_address"),)

    id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=16, index=True)
    name: str | None = Field(default=None, max_length=200)
    area_code: str = Field(foreign_key="areas.code", index=True, max_length=64)
    lat: float | None = None
    lon: float | None = None
    transport: str = Field(max_length=16)
    address: str = Field(max_length=128)
    enabled: bool = True
    online: bool = False
    last_seen: datetime | None = _utc_column()
    status: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _utc_column(nullable=False)
    # What the device does with its cached programme while its link is down (docs/protocol.md §1.10).
    comm_loss_policy: str = Field(default="keep", max_length=16, sa_column_kwargs={"server_default": "keep"})
    comm_loss_after_s: int | None = None
    # Transport-specific settings (a Modbus link and register map, a sensor's metrics and their physical
    # ranges, ...), validated by the API against the device's kind and transport.
    config: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )
    # Provisioning (issue 6): the maker's serial number, the device's broker password (a Mosquitto `$7$`
    # hash; its username is the address; none: no broker account), and when it was taken out of service
    # (credentials revoked, history kept).
    serial: str | None = Field(default=None, unique=True, max_length=64)
    broker_password_hash: str | None = Field(default=None, max_length=200)
    credentials_issued_at: datetime | None = _utc_column()
    decommissioned_at: datetime | None = _utc_column()


class FactorySecretRow(SQLModel, table=True):
    """A device's factory secret, registered before it boots, as the two keys derived from it (the
    secret itself is not kept): one checks its claim requests, one encrypts its bundle."""

    __tablename__ = "factory_secrets"

    serial: str = Field(primary_key=True, max_length=64)
    auth_key: str = Field(max_length=64)  # hex
    encryption_key: str = Field(max_length=64)  # hex
    registered_at: datetime = _utc_column(nullable=False)
    # Once a claim was approved the keys are spent: a second claim with the same secret is refused.
    claimed_at: datetime | None = _utc_column()


class ClaimRow(SQLModel, table=True):
    """A device's request to be provisioned (docs/protocol.md §1.13), pending until a technician
    approves it into an area or its window ends."""

    __tablename__ = "claims"

    id: str = Field(primary_key=True, max_length=36)
    serial: str = Field(foreign_key="factory_secrets.serial", index=True, max_length=64)
    nonce: str = Field(unique=True, max_length=64)
    kind: str = Field(max_length=16)
    firmware: str | None = Field(default=None, max_length=64)
    requested_at: datetime = _utc_column(nullable=False)
    expires_at: datetime = _utc_column(nullable=False)
    state: str = Field(max_length=16)  # pending | approved | superseded
    device_id: str | None = Field(default=None, foreign_key="devices.id", max_length=64)
    decided_by: str | None = Field(default=None, max_length=36)
    decided_at: datetime | None = _utc_column()


class MediaRow(SQLModel, table=True):
    __tablename__ = "media"

    id: str = Field(primary_key=True, max_length=36)
    sha256: str = Field(unique=True, max_length=64)
    content_type: str = Field(max_length=32)
    format: str = Field(max_length=16)
    duration_s: float
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    filename: str | None = Field(default=None, max_length=255)
    created_at: datetime = _utc_column(nullable=False)


class BroadcastRow(SQLModel, table=True):
    __tablename__ = "broadcasts"

    id: str = Field(primary_key=True, max_length=36)
    media_id: str = Field(foreign_key="media.id", max_length=36)
    priority_class: str = Field(max_length=16)
    sub_priority: int
    rank: int
    mode: str = Field(default="live", max_length=8)
    repeats: int
    max_duration_s: float
    # Further media played after `media_id`, in order, as one item (issue 3); empty for a single file.
    playlist_tail: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    gap_s: float = Field(default=0.0, sa_column=Column(Float, nullable=False, server_default="0"))
    # Audio length × repeats + gaps, capped by max_duration_s: how long a device should play it.
    planned_play_s: float = Field(default=0.0, sa_column=Column(Float, nullable=False, server_default="0"))
    # What happens to a delivery another broadcast preempts: play it again afterwards, or record it missed.
    on_preempted: str = Field(default="resume", max_length=8, sa_column_kwargs={"server_default": "resume"})
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False, index=True)
    expires_at: datetime = _utc_column(nullable=False)
    cancelled_at: datetime | None = _utc_column()
    # Priority text for the LED screens among the targets (issue 4): {headline, body, display_s}.
    display: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class DeliveryRow(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_device_state", "device_id", "state"),)

    id: str = Field(primary_key=True, max_length=36)
    broadcast_id: str = Field(foreign_key="broadcasts.id", index=True, max_length=36)
    device_id: str = Field(foreign_key="devices.id", max_length=64)
    command_id: str = Field(unique=True, max_length=36)
    state: str = Field(max_length=16)
    state_at: datetime = _utc_column(nullable=False)
    detail: str | None = Field(default=None, max_length=500)
    played_s: float | None = None
    # A delivery that plays a preempted one again (same broadcast, same device) points at it.
    resumes_delivery_id: str | None = Field(default=None, foreign_key="deliveries.id", max_length=36)


class DeliveryEventRow(SQLModel, table=True):
    __tablename__ = "delivery_events"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(foreign_key="deliveries.id", index=True, max_length=36)
    state: str = Field(max_length=16)
    at: datetime = _utc_column(nullable=False)
    source: str = Field(max_length=16)
    detail: str | None = Field(default=None, max_length=500)


class OutboxRow(SQLModel, table=True):
    """Commands accepted but not yet acknowledged by the broker."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    # A device command has `device_id` (and `delivery_id`); an area command (docs/protocol.md §1.12)
    # has `area_code`, `broadcast_id` and `covers`, the deliveries it carries.
    device_id: str | None = Field(default=None, foreign_key="devices.id", index=True, max_length=64)
    area_code: str | None = Field(default=None, max_length=64)
    covers: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    broadcast_id: str | None = Field(default=None, max_length=36)
    command_id: str = Field(unique=True, max_length=36)
    delivery_id: str | None = Field(default=None, foreign_key="deliveries.id", max_length=36)
    # play | stop | show, or a remote operation's type (set_volume, reboot, test_tone, configure).
    kind: str = Field(max_length=16)
    rank: int
    document: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _utc_column(nullable=False)
    expires_at: datetime = _utc_column(nullable=False)
    published_at: datetime | None = _utc_column(index=True)


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=100)
    role: str = Field(max_length=16)
    ward_code: str | None = Field(default=None, foreign_key="areas.code", max_length=64)
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = _utc_column(nullable=False)
    revoked_at: datetime | None = _utc_column()
    # A technician's assigned wards (issue 6): where it may provision and decommission. Empty: city-wide.
    wards: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )


class ScheduleRow(SQLModel, table=True):
    """A rule that creates broadcasts: one-off or recurring (RFC 5545), in a local time zone."""

    __tablename__ = "schedules"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    media_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    priority_class: str = Field(max_length=16)
    sub_priority: int
    rank: int = Field(index=True)
    repeats: int
    gap_s: float
    max_duration_s: float
    timezone: str = Field(max_length=64)
    dtstart_local: str = Field(max_length=32)
    rrule: str | None = Field(default=None, max_length=500)
    exdates_local: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    # Where two priority-class schedules of one ward clash, the staff's order: lower plays first.
    ward_order: int | None = None
    on_preempted: str = Field(default="resume", max_length=8)
    created_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False)
    updated_at: datetime = _utc_column(nullable=False)


class OccurrenceRow(SQLModel, table=True):
    """One planned start of a schedule; its unique key is what makes firing happen exactly once."""

    __tablename__ = "occurrences"
    __table_args__ = (UniqueConstraint("schedule_id", "planned_at", name="uq_occurrences_schedule_planned"),)

    id: int | None = Field(default=None, primary_key=True)
    schedule_id: str = Field(foreign_key="schedules.id", index=True, max_length=36)
    planned_at: datetime = _utc_column(nullable=False, index=True)
    outcome: str = Field(max_length=16)
    broadcast_id: str | None = Field(default=None, foreign_key="broadcasts.id", index=True, max_length=36)
    recorded_at: datetime = _utc_column(nullable=False)
    detail: str | None = Field(default=None, max_length=500)


class AlertRow(SQLModel, table=True):
    """An alert from the IOC or an operator (issue 4): what was asked, and the broadcast that carries it."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("created_by", "idempotency_key", name="uq_alerts_idempotency"),
        UniqueConstraint("cap_sender", "cap_identifier", name="uq_alerts_cap_message"),
    )

    id: str = Field(primary_key=True, max_length=36)
    source: str = Field(max_length=8)  # api | cap | rule
    # pending_approval | active | ended | cancelled | superseded | recorded (CAP System/Draft: nothing played)
    status: str = Field(max_length=20, index=True)
    mode: str = Field(max_length=8)  # live | drill
    headline: str = Field(max_length=200)
    text: str = Field(max_length=5000)
    language: str | None = Field(default=None, max_length=16)
    media_id: str | None = Field(default=None, foreign_key="media.id", max_length=36)
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    priority_class: str = Field(max_length=16)
    sub_priority: int
    repeats: int
    expires_at: datetime = _utc_column(nullable=False)
    device_count: int = 0
    broadcast_id: str | None = Field(default=None, foreign_key="broadcasts.id", max_length=36)
    # CAP: the message's own key, and the alert an Update or Cancel refers to.
    cap_sender: str | None = Field(default=None, max_length=200)
    cap_identifier: str | None = Field(default=None, max_length=200)
    cap_xml: str | None = None
    replaces_alert_id: str | None = Field(default=None, foreign_key="alerts.id", max_length=36)
    idempotency_key: str | None = Field(default=None, max_length=200)
    request_hash: str | None = Field(default=None, max_length=64)
    webhook_url: str | None = Field(default=None, max_length=500)
    created_by: str = Field(max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False, index=True)
    approved_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    approved_at: datetime | None = _utc_column()
    cancelled_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    cancelled_at: datetime | None = _utc_column()


class AuditRow(SQLModel, table=True):
    """Who did what, when: appended, never changed (issue 4)."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _utc_column(nullable=False, index=True)
    key_id: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH, index=True)
    key_name: str | None = Field(default=None, max_length=100)
    role: str | None = Field(default=None, max_length=16)
    action: str = Field(max_length=60, index=True)
    subject: str | None = Field(default=None, max_length=100, index=True)
    outcome: str = Field(max_length=16)  # ok | refused | failed
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    remote: str | None = Field(default=None, max_length=64)


class TelemetryRow(SQLModel, table=True):
    """One reading. Times are epoch milliseconds so that bucketing is integer arithmetic on every backend."""

    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_device_metric_at", "device_id", "metric", "at_ms"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    device_id: str = Field(max_length=64)
    metric: str = Field(max_length=64)
    at_ms: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    value: float


class TelemetryRollupRow(SQLModel, table=True):
    """Readings older than the raw retention, kept as one row per metric and bucket (downsampled)."""

    __tablename__ = "telemetry_rollups"

    device_id: str = Field(primary_key=True, max_length=64)
    metric: str = Field(primary_key=True, max_length=64)
    step_s: int = Field(primary_key=True)
    bucket_ms: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    count: int
    total: float
    minimum: float
    maximum: float


class TelemetryLatestRow(SQLModel, table=True):
    """The latest accepted value per device and metric, and the latest refused one (out of range)."""

    __tablename__ = "telemetry_latest"

    device_id: str = Field(primary_key=True, max_length=64)
    metric: str = Field(primary_key=True, max_length=64)
    value: float | None = None
    unit: str | None = Field(default=None, max_length=16)
    at: datetime | None = _utc_column()
    rejected_count: int = 0
    rejected_at: datetime | None = _utc_column()
    rejected_reason: str | None = Field(default=None, max_length=300)


class RuleRow(SQLModel, table=True):
    """A threshold rule on one sensor's metric (issue 5): raises an alarm, optionally a broadcast."""

    __tablename__ = "rules"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=64)
    metric: str = Field(max_length=64)
    direction: str = Field(max_length=8)  # above | below
    raise_at: float
    clear_at: float
    for_s: float
    clear_for_s: float = 0.0
    # What happens on raising: none | broadcast (sent at once) | draft (an alert waiting for approval).
    action: str = Field(max_length=16)
    broadcast: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    enabled: bool = True
    created_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False)


class AlarmRow(SQLModel, table=True):
    """One raising of an alarm, until it clears: a threshold rule's (source `rule`), or a device that
    stayed offline too long (source `availability`, issue 6: no rule, metric or value)."""

    __tablename__ = "alarms"

    id: str = Field(primary_key=True, max_length=36)
    source: str = Field(default="rule", max_length=16, sa_column_kwargs={"server_default": "rule"})
    rule_id: str | None = Field(default=None, foreign_key="rules.id", index=True, max_length=36)
    device_id: str = Field(max_length=64)
    metric: str | None = Field(default=None, max_length=64)
    state: str = Field(max_length=8, index=True)  # active | cleared
    raised_at: datetime = _utc_column(nullable=False, index=True)
    raised_value: float | None = None
    cleared_at: datetime | None = _utc_column()
    cleared_value: float | None = None
    alert_id: str | None = Field(default=None, foreign_key="alerts.id", max_length=36)
    detail: str | None = Field(default=None, max_length=500)


class DeviceAvailabilityRow(SQLModel, table=True):
    """One online/offline transition of a device (issue 6), dated when it happened (the device's state
    time, or the instant its timeout ran out) and when the controller noticed it."""

    __tablename__ = "device_availability"
    __table_args__ = (Index("ix_device_availability_device_at", "device_id", "at"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    # No foreign key, like telemetry: the history goes with the device when it is deleted.
    device_id: str = Field(max_length=64)
    online: bool
    at: datetime = _utc_column(nullable=False)
    detected_at: datetime = _utc_column(nullable=False)
    # state | will | shutdown | timeout | … (the device's own reason when it gave one)
    reason: str = Field(max_length=32)
    detail: str | None = Field(default=None, max_length=200)


class OperationRow(SQLModel, table=True):
    """A remote operation on one device or a group (issue 6): what was asked, by whom, for how long."""

    __tablename__ = "operations"

    id: str = Field(primary_key=True, max_length=36)
    type: str = Field(max_length=16)  # set_volume | reboot | test_tone | configure
    # The wire members the command carries besides its header (volume, duration_s, config).
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    device_count: int
    created_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False, index=True)
    expires_at: datetime = _utc_column(nullable=False)
    # When every device's result had ended (the operation is then audited as finished).
    finished_at: datetime | None = _utc_column()


class OperationResultRow(SQLModel, table=True):
    """One operation's command on one device: each step a separate fact with its own time."""

    __tablename__ = "operation_results"

    command_id: str = Field(primary_key=True, max_length=36)
    operation_id: str = Field(foreign_key="operations.id", index=True, max_length=36)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=64)
    state: str = Field(max_length=16)  # queued | sent | delivered | completed | failed | rejected | expired
    state_at: datetime = _utc_column(nullable=False)
    sent_at: datetime | None = _utc_column()
    delivered_at: datetime | None = _utc_column()
    ended_at: datetime | None = _utc_column()
    detail: str | None = Field(default=None, max_length=500)
    # What the device reported doing: {"volume": 40}, {"self_test": "fail", "fault": "amplifier"}, …
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class CommandSequenceRow(SQLModel, table=True):
    """The high-water mark of the signing sequence (docs/protocol.md §1.15.4): one row, id 1. Every seq
    up to `reserved_through` may have been signed already; a controller takes them in blocks, so that
    after a restart it goes on above anything it could have used, without a write per command."""

    __tablename__ = "command_sequence"

    id: int = Field(primary_key=True)
    reserved_through: int = Field(sa_column=Column(BigInteger, nullable=False))


class FirmwareImageRow(SQLModel, table=True):
    """A firmware image, stored under its SHA-256 once its Ed25519 signature checked out (issue 6)."""

    __tablename__ = "firmware_images"
    __table_args__ = (UniqueConstraint("kind", "version", name="uq_firmware_images_kind_version"),)

    id: str = Field(primary_key=True, max_length=36)
    kind: str = Field(max_length=16)
    version: str = Field(max_length=64)
    sha256: str = Field(unique=True, max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    # Base64 of the 64-byte Ed25519 signature over the image's 32-byte SHA-256 digest, and which
    # trusted key (the first 16 hex digits of its SHA-256) made it.
    signature: str = Field(max_length=100)
    key_id: str = Field(max_length=16)
    filename: str | None = Field(default=None, max_length=255)
    uploaded_by: str | None = Field(default=None, max_length=36)
    uploaded_at: datetime = _utc_column(nullable=False)


class RolloutRow(SQLModel, table=True):
    """A staged rollout of one image to the devices a filter chose, split into ordered groups."""

    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    image_id: str = Field(foreign_key="firmware_images.id", index=True, max_length=36)
    state: str = Field(max_length=16, index=True)
    # {kind, area, from_version}: how the targets were chosen (they are fixed at creation).
    target_filter: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    group_count: int
    current_group: int
    # Groups an operator let through by resuming a rollout they had paused.
    accepted_groups: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    success_threshold: float
    error_threshold: float
    # `HH:MM-HH:MM` in `timezone`; none: updates may start at any time.
    maintenance_window: str | None = Field(default=None, max_length=11)
    timezone: str = Field(max_length=64)
    start_timeout_s: float
    download_timeout_s: float
    install_timeout_s: float
    # In the download URL devices get; refused once the rollout has ended and no update is running.
    download_token: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=500)
    next_window_at: datetime | None = _utc_column()
    created_by: str | None = Field(default=None, max_length=PRINCIPAL_ID_LENGTH)
    created_at: datetime = _utc_column(nullable=False)
    updated_at: datetime = _utc_column(nullable=False)


class RolloutDeviceRow(SQLModel, table=True):
    """One device's update within a rollout; `history` lists each state it reached with its time."""

    __tablename__ = "rollout_devices"

    rollout_id: str = Field(foreign_key="rollouts.id", primary_key=True, max_length=36)
    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=64)
    group_index: int
    state: str = Field(max_length=16)
    state_at: datetime = _utc_column(nullable=False)
    command_id: str | None = Field(default=None, unique=True, max_length=36)
    from_version: str | None = Field(default=None, max_length=64)
    # The version the device says it runs after the update ended (the new one, or the old one after a
    # rollback).
    reported_version: str | None = Field(default=None, max_length=64)
    rolled_back: bool = False
    detail: str | None = Field(default=None, max_length=500)
    history: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class UserRow(SQLModel, table=True):
    """A person who signs in to the web console (issue 7): roles and ward scope as an API key's."""

    __tablename__ = "users"

    id: str = Field(primary_key=True, max_length=36)
    username: str = Field(unique=True, max_length=64)
    password_hash: str = Field(max_length=200)  # argon2id, PHC string
    role: str = Field(max_length=16)
    ward_code: str | None = Field(default=None, foreign_key="areas.code", max_length=64)
    wards: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    # Failed sign-ins since the last success or lock-out; `locked_until`: refused until then.
    failed_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    locked_until: datetime | None = _utc_column()
    created_at: datetime = _utc_column(nullable=False)
