"""API keys and the rules of who may do what (roles, and the ward a ward_staff key is confined to)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.store.models import ApiKeyRow, AreaRow

TOKEN_PREFIX = "wc_"  # noqa: S105  (a prefix, not a secret)


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    WARD_STAFF = "ward_staff"
    TECHNICIAN = "technician"
    IOC = "ioc"


class Action(StrEnum):
    READ = "read"
    MANAGE_AREAS = "manage_areas"
    MANAGE_DEVICES = "manage_devices"
    UPLOAD_MEDIA = "upload_media"
    BROADCAST = "broadcast"
    BROADCAST_EMERGENCY = "broadcast_emergency"
    CANCEL = "cancel"
    MANAGE_RULES = "manage_rules"
    # Register, import, claim, re-issue credentials of and decommission devices (issue 6).
    PROVISION = "provision"
    # API keys and factory secrets: who may reach the controller, and which devices may claim themselves.
    MANAGE_KEYS = "manage_keys"
    # Upload firmware images and run rollouts: what every device of a kind runs (issue 6).
    MANAGE_FIRMWARE = "manage_firmware"


_ALLOWED: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.OPERATOR: frozenset(Action)
    - {Action.MANAGE_DEVICES, Action.PROVISION, Action.MANAGE_KEYS, Action.MANAGE_FIRMWARE},
    Role.WARD_STAFF: frozenset({Action.READ, Action.UPLOAD_MEDIA, Action.BROADCAST, Action.CANCEL}),
    Role.TECHNICIAN: frozenset({Action.READ, Action.MANAGE_DEVICES, Action.PROVISION}),
    Role.IOC: frozenset(
        {Action.READ, Action.UPLOAD_MEDIA, Action.BROADCAST, Action.BROADCAST_EMERGENCY, Action.CANCEL}
    ),
}


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    role: Role
    ward_code: str | None
    # A technician's assigned wards; empty: the key is not confined to wards this way.
    wards: frozenset[str] = frozenset()

    def may(self, action: Action) -> bool:
        return action in _ALLOWED[self.role]

    def device_wards(self) -> frozenset[str] | None:
        """The wards whose devices this key may see and manage; None: the whole city."""
        if self.ward_code is not None:
            return frozenset({self.ward_code})
        return self.wards or None


class ApiKeyError(ValueError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough to keep them unusable if the DB leaks.
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(
    engine: Engine, *, name: str, role: str, ward_code: str | None, wards: Sequence[str] = ()
) -> tuple[ApiKeyRow, str]:
    """Store a new key (hashed) and return it with the only copy of its token. A ward_staff key names
    its one ward (`ward_code`); a technician key may name the wards it is assigned to (`wards`)."""
    try:
        parsed_role = Role(role)
    except ValueError as error:
        raise ApiKeyError("role", f"must be one of {', '.join(r.value for r in Role)}") from error
    if not name.strip():
        raise ApiKeyError("name", "must not be empty")
    if parsed_role is Role.WARD_STAFF and ward_code is None:
        raise ApiKeyError("ward", "a ward_staff key must name its ward")
    if parsed_role is Role.TECHNICIAN and ward_code is not None:
        # One way to say it: a technician's wards are its assignment, however many.
        wards, ward_code = [ward_code, *wards], None
    if wards and parsed_role is not Role.TECHNICIAN:
        raise ApiKeyError("wards", "only technician keys are assigned wards")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiKeyRow(
        id=str(uuid.uuid4()),
        name=name.strip(),
        role=parsed_role.value,
        ward_code=ward_code,
        wards=list(dict.fromkeys(wards)),
        token_hash=hash_token(token),
        created_at=datetime.now(UTC),
    )
    with Session(engine) as session:
        if ward_code is not None and session.get(AreaRow, ward_code) is None:
            raise ApiKeyError("ward", f"unknown area {ward_code!r}")
        for index, code in enumerate(row.wards):
            if session.get(AreaRow, code) is None:
                raise ApiKeyError(f"wards[{index}]", f"unknown area {code!r}")
        session.add(row)
        session.commit()
        session.refresh(row)
    return row, token


def authenticate(engine: Engine, token: str) -> Principal | None:
    with Session(engine) as session:
        row = session.exec(select(ApiKeyRow).where(ApiKeyRow.token_hash == hash_token(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(
        key_id=row.id,
        name=row.name,
        role=Role(row.role),
        ward_code=row.ward_code,
        wards=frozenset(row.wards or ()),
    )


def list_api_keys(engine: Engine) -> list[ApiKeyRow]:
    with Session(engine) as session:
        return list(session.exec(select(ApiKeyRow).order_by(col(ApiKeyRow.created_at))).all())


def revoke_api_key(engine: Engine, key_id: str, now: datetime) -> ApiKeyRow:
    with Session(engine) as session:
        row = session.get(ApiKeyRow, key_id)
        if row is None:
            raise ApiKeyError("id", f"unknown key {key_id!r}")
        if row.revoked_at is None:
            row.revoked_at = now
            session.add(row)
            session.commit()
            session.refresh(row)
        return row
