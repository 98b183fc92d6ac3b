"""Provisioning (issue 6, docs/protocol.md §1.7 and §1.13): per-device broker credentials kept in step
with the broker, CSV imports, bundles, credential re-issue, decommissioning, factory secrets and the
zero-touch claim.

Every change of who may connect ends with `BrokerAccess.sync()`, which rewrites the broker's password
and ACL files from the database and makes the broker reload them (SIGHUP, no restart) before it returns:
when an API call that revoked a device answers, the broker refuses that device.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.broker import (
    BrokerAccount,
    BrokerError,
    access_files,
    mosquitto_password_hash,
    wait_until_accepted,
    write_private,
)
from controller.domain.areas import AreaTree
from controller.domain.broker_access import TOPIC_ROOT, ServiceAccounts, claim_response_topic
from controller.domain.clock import Clock, rfc3339
from controller.domain.provisioning import (
    IDENTIFIER,
    KIND_PREFIX,
    PROVISIONABLE_KINDS,
    SERIAL,
    DeviceDraft,
    ImportFileError,
    Registry,
    RowProblem,
    claim_mac_matches,
    new_device_password,
    parse_device_csv,
    parse_factory_secrets,
    provisioning_bundle,
    seal_bundle,
)
from controller.services.auth import Principal
from controller.services.errors import ServiceError
from controller.store.models import ClaimRow, DeviceRow, FactorySecretRow

log = structlog.get_logger(__name__)

MQTT = "mqtt"
# Addresses the serial-sign router shares with MQTT devices (commands are routed by address alone).
_ADDRESS_SHARING = ("mqtt", "serial")
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_MAC = re.compile(r"^[0-9a-fA-F]{64}$")


# -- the broker's files ------------------------------------------------------------------------------


class ExternalBrokerFiles:
    """`mqtt.mode: external`: writes the generated password and ACL files where the broker reads them
    and runs the configured reload command, then waits until the broker took them."""

    def __init__(
        self,
        *,
        password_file: Path,
        acl_file: Path,
        reload_command: tuple[str, ...],
        accounts: ServiceAccounts,
        service_passwords: Mapping[str, str],
        host: str,
        port: int,
    ) -> None:
        self._password_file = password_file
        self._acl_file = acl_file
        self._reload_command = reload_command
        self._accounts = accounts
        self._service_hashes = {name: mosquitto_password_hash(p) for name, p in service_passwords.items()}
        self._host = host
        self._port = port

    def apply(self, device_hashes: Mapping[str, str]) -> None:
        passwords, acl, probe = access_files(self._accounts, self._service_hashes, device_hashes)
        write_private(self._password_file, passwords)
        write_private(self._acl_file, acl)
        try:
            subprocess.run(self._reload_command, check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            raise BrokerError(f"mqtt.external_access.reload_command failed: {error}") from error
        wait_until_accepted(self._host, self._port, probe)


class BrokerAccess:
    """Keeps the broker's device accounts equal to the database's.

    `sync()` may be called by many requests at once: one regeneration serves every call that arrived
    before it started, so a burst of changes (or an import of 10,000 devices) is one reload.
    """

    def __init__(self, engine: Engine, apply: Callable[[Mapping[str, str]], None] | None) -> None:
        self._engine = engine
        self._apply = apply
        self._lock = asyncio.Lock()
        self._requested = 0
        self._applied = 0
        self.reloads = 0  # how many times the broker was reloaded (tests, metrics)

    @property
    def enabled(self) -> bool:
        return self._apply is not None

    def device_hashes(self) -> dict[str, str]:
        """username (= address) → `$7$` hash of every MQTT device still in service."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceRow.address, DeviceRow.broker_password_hash).where(
                    DeviceRow.transport == MQTT,
                    col(DeviceRow.broker_password_hash).is_not(None),
                    col(DeviceRow.decommissioned_at).is_(None),
                )
            ).all()
        return {address: password_hash for address, password_hash in rows if password_hash}

    def apply_now(self) -> None:
        """Synchronously (at start-up, before the broker is used)."""
        if self._apply is not None:
            self._apply(self.device_hashes())
            self.reloads += 1

    async def sync(self) -> None:
        if self._apply is None:
            return
        self._requested += 1
        wanted = self._requested
        async with self._lock:
            if self._applied >= wanted:
                return  # a regeneration that started after our change already carried it
            covered = self._requested
            await asyncio.to_thread(self.apply_now)
            self._applied = covered


# -- provisioning ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where devices reach the broker, as their bundles say."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ImportReport:
    created: list[DeviceRow]
    bundles: list[dict[str, Any]]
    rejected: list[RowProblem]


@dataclass(frozen=True, slots=True)
class ApprovedClaim:
    device: DeviceRow
    serial: str
    response: dict[str, Any]


def _new_id(kind: str) -> str:
    return f"{KIND_PREFIX.get(kind, 'dev')}-{uuid.uuid4().hex[:8]}"


def _in_wards(tree: AreaTree, principal: Principal, area: str) -> bool:
    wards = principal.device_wards()
    return wards is None or any(ward in tree and tree.is_within(area, ward) for ward in wards)


def _outside_wards(principal: Principal, area: str) -> str:
    wards = principal.device_wards() or frozenset()
    noun = "ward" if len(wards) == 1 else "wards"
    return f"area {area!r} is outside {noun} {', '.join(repr(w) for w in sorted(wards))} of this key"


class ProvisioningService:
    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        *,
        broker: BrokerEndpoint,
        reserved_usernames: Iterable[str],
        claim_window_s: int,
        claim_clock_skew_s: int,
        command_public_key: str | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._broker = broker
        self.reserved_usernames = frozenset(reserved_usernames)
        self._claim_window = timedelta(seconds=claim_window_s)
        self._claim_skew_s = claim_clock_skew_s
        # The controller's command-verification public key; when none is configured the bundle carries
        # no `command_key` member (devices then keep whatever key they were built with).
        self._command_public_key = command_public_key

    # -- credentials ---------------------------------------------------------------------------------

    def issue_credentials(self, row: DeviceRow) -> str:
        """Give `row` a new broker password (stored hashed); returns the only plain copy."""
        password = new_device_password()
        row.broker_password_hash = mosquitto_password_hash(password)
        row.credentials_issued_at = self._clock.now()
        return password

    def bundle(self, row: DeviceRow, password: str) -> dict[str, Any]:
        return provisioning_bundle(
            device_id=row.id,
            kind=row.kind,
            address=row.address,
            area=row.area_code,
            broker_host=self._broker.host,
            broker_port=self._broker.port,
            password=password,
            command_public_key=self._command_public_key,
            topic_root=TOPIC_ROOT,
        )

    def check_address(self, address: str, field: str = "address") -> None:
        if address in self.reserved_usernames:
            raise ServiceError(field, f"{address!r} is the name of a broker service account", status=409)

    def reissue(self, device_ids: list[str], principal: Principal, tree: AreaTree) -> list[dict[str, Any]]:
        """New passwords for these MQTT devices (the old ones stop working at the next sync)."""
        bundles: list[dict[str, Any]] = []
        with Session(self._engine) as session:
            for index, device_id in enumerate(device_ids):
                field = "id" if len(device_ids) == 1 else f"devices[{index}]"
                row = session.get(DeviceRow, device_id)
                if row is None or not _in_wards(tree, principal, row.area_code):
                    raise ServiceError(field, f"unknown device {device_id!r}", status=404)
                if row.decommissioned_at is not None:
                    detail = f"device {device_id!r} was decommissioned at {rfc3339(row.decommissioned_at)}"
                    raise ServiceError(field, detail, status=409)
                if row.transport != MQTT:
                    raise ServiceError(field, f"device {device_id!r} does not use the broker", status=422)
                password = self.issue_credentials(row)
                session.add(row)
                bundles.append(self.bundle(row, password))
            session.commit()
        return bundles

    def decommission(self, device_id: str, principal: Principal, tree: AreaTree) -> DeviceRow:
        """Take the device out of service: broker account gone, disabled, its history kept."""
        with Session(self._engine) as session:
            row = session.get(DeviceRow, device_id)
            if row is None or not _in_wards(tree, principal, row.area_code):
                raise ServiceError("id", f"unknown device {device_id!r}", status=404)
            if row.decommissioned_at is None:
                row.decommissioned_at = self._clock.now()
                row.broker_password_hash = None
                row.enabled = False
                session.add(row)
                session.commit()
                session.refresh(row)
            return row

    # -- CSV import ------------------------------------------------------------------------------------

    def import_devices(
        self, data: bytes, principal: Principal, tree: AreaTree, *, atomic: bool
    ) -> ImportReport:
        """Create the CSV's valid rows (all or none with `atomic`), each with its broker credentials."""
        with Session(self._engine) as session:
            registry = Registry(
                areas=frozenset(a.code for a in tree.areas()),
                device_ids=frozenset(session.exec(select(DeviceRow.id)).all()),
                addresses=frozenset(
                    session.exec(
                        select(DeviceRow.address).where(col(DeviceRow.transport).in_(_ADDRESS_SHARING))
                    ).all()
                ),
                serials=frozenset(s for s in session.exec(select(DeviceRow.serial)).all() if s is not None),
                reserved_usernames=self.reserved_usernames,
            )
            try:
                drafts, problems = parse_device_csv(data, registry, _new_id)
            except ImportFileError as error:
                raise ServiceError(error.field, error.detail) from error
            allowed: list[DeviceDraft] = []
            for draft in drafts:
                if _in_wards(tree, principal, draft.area):
                    allowed.append(draft)
                else:
                    problems.append(RowProblem(draft.row, "area", _outside_wards(principal, draft.area)))
            problems.sort(key=lambda problem: problem.row)
            if atomic and problems:
                first = problems[0]
                raise ServiceError(
                    f"row {first.row}: {first.field}",
                    f"{first.detail} ({len(problems)} problem(s); nothing was imported)",
                    extra={"rejected": [p.as_dict() for p in problems]},
                )
            now = self._clock.now()
            rows: list[DeviceRow] = []
            bundles: list[dict[str, Any]] = []
            for draft in allowed:
                row = DeviceRow(
                    id=draft.id,
                    kind=draft.kind,
                    name=draft.name,
                    area_code=draft.area,
                    lat=draft.lat,
                    lon=draft.lon,
                    transport=MQTT,
                    address=draft.address,
                    serial=draft.serial,
                    created_at=now,
                )
                password = self.issue_credentials(row)
                rows.append(row)
                bundles.append(self.bundle(row, password))
            session.add_all(rows)
            session.commit()
            for row in rows:
                session.refresh(row)
        return ImportReport(created=rows, bundles=bundles, rejected=problems)

    # -- factory secrets and claims --------------------------------------------------------------------

    def register_factory_secrets(self, data: bytes, *, atomic: bool) -> tuple[int, list[RowProblem]]:
        with Session(self._engine) as session:
            registered = frozenset(session.exec(select(FactorySecretRow.serial)).all())
            try:
                keys, problems = parse_factory_secrets(data, registered)
            except ImportFileError as error:
                raise ServiceError(error.field, error.detail) from error
            if atomic and problems:
                first = problems[0]
                raise ServiceError(
                    f"row {first.row}: {first.field}",
                    f"{first.detail} ({len(problems)} problem(s); nothing was registered)",
                    extra={"rejected": [p.as_dict() for p in problems]},
                )
            now = self._clock.now()
            session.add_all(
                FactorySecretRow(
                    serial=serial,
                    auth_key=k.auth_key.hex(),
                    encryption_key=k.encryption_key.hex(),
                    registered_at=now,
                )
                for serial, k in keys.items()
            )
            session.commit()
        return len(keys), problems

    def handle_claim_request(self, serial: str, payload: bytes) -> dict[str, Any]:
        """A device's claim request (§1.13) → the answer to publish on its response topic. Only a
        request that proves the factory secret is stored (as a pending claim)."""
        now = self._clock.now()
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            return _refused(None, "payload", "not a JSON document")
        if not isinstance(document, dict):
            return _refused(None, "payload", "not a JSON object")
        nonce = document.get("nonce")
        nonce = nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None
        if document.get("v") != 1:
            return _refused(nonce, "v", "this controller speaks wire version 1")
        if nonce is None:
            return _refused(None, "nonce", "16-64 lowercase hexadecimal digits")
        if document.get("serial") != serial or not SERIAL.fullmatch(serial):
            return _refused(nonce, "serial", "must be the serial of the request's topic")
        kind, at, mac = document.get("kind"), document.get("at"), document.get("mac")
        if kind not in PROVISIONABLE_KINDS:
            return _refused(nonce, "kind", f"one of {', '.join(PROVISIONABLE_KINDS)}")
        if not isinstance(mac, str) or not _MAC.fullmatch(mac):
            return _refused(nonce, "mac", "64 hexadecimal digits (HMAC-SHA256)")
        moment = _timestamp(at)
        if moment is None or not isinstance(at, str):
            return _refused(nonce, "at", "an RFC 3339 UTC timestamp ending in Z")
        skew = abs((moment - now).total_seconds())
        if skew > self._claim_skew_s:
            return _refused(nonce, "at", f"{skew:.0f} s away from the controller's clock")
        firmware = document.get("firmware")
        with Session(self._engine) as session:
            secret = session.get(FactorySecretRow, serial)
            if secret is None:
                return _refused(nonce, "serial", f"serial {serial!r} has no registered factory secret")
            if not claim_mac_matches(bytes.fromhex(secret.auth_key), serial, nonce, at, str(kind), mac):
                return _refused(nonce, "mac", "the proof does not match the registered factory secret")
            if secret.claimed_at is not None:
                return _refused(nonce, "serial", f"serial {serial!r} was already claimed")
            if session.exec(select(ClaimRow.id).where(ClaimRow.nonce == nonce)).first() is not None:
                return _refused(nonce, "nonce", "already used (a replayed request)")
            for earlier in session.exec(
                select(ClaimRow).where(ClaimRow.serial == serial, ClaimRow.state == "pending")
            ).all():
                earlier.state = "superseded"
                session.add(earlier)
            claim = ClaimRow(
                id=str(uuid.uuid4()),
                serial=serial,
                nonce=nonce,
                kind=str(kind),
                firmware=firmware[:64] if isinstance(firmware, str) else None,
                requested_at=now,
                expires_at=now + self._claim_window,
                state="pending",
            )
            session.add(claim)
            session.commit()
            log.info("claim request", serial=serial, claim=claim.id)
            return {
                "v": 1,
                "status": "pending",
                "nonce": nonce,
                "claim_id": claim.id,
                "expires_at": rfc3339(claim.expires_at),
            }

    def pending_claims(self) -> list[ClaimRow]:
        now = self._clock.now()
        with Session(self._engine) as session:
            rows = session.exec(
                select(ClaimRow).where(ClaimRow.state == "pending").order_by(col(ClaimRow.requested_at))
            ).all()
        return [row for row in rows if row.expires_at > now]

    def approve_claim(
        self,
        claim_id: str,
        *,
        area: str,
        device_id: str | None,
        name: str | None,
        principal: Principal,
        tree: AreaTree,
    ) -> ApprovedClaim:
        """Create the claimed device in `area` with its credentials and seal its bundle to it."""
        now = self._clock.now()
        with Session(self._engine) as session:
            claim = session.get(ClaimRow, claim_id)
            if claim is None:
                raise ServiceError("id", f"unknown claim {claim_id!r}", status=404)
            if claim.state != "pending":
                raise ServiceError("id", f"claim {claim_id!r} is {claim.state}, not pending", status=409)
            if now >= claim.expires_at:
                detail = (
                    f"claim {claim_id!r} expired at {rfc3339(claim.expires_at)}; the device must ask again"
                )
                raise ServiceError("id", detail, status=410)
            if area not in tree:
                raise ServiceError("area", f"unknown area {area!r}")
            if not _in_wards(tree, principal, area):
                raise ServiceError("area", _outside_wards(principal, area), status=403)
            secret = session.get(FactorySecretRow, claim.serial)
            if secret is None or secret.claimed_at is not None:
                raise ServiceError("id", f"serial {claim.serial!r} was already claimed", status=409)
            new_id = device_id or f"{KIND_PREFIX.get(claim.kind, 'dev')}-{claim.serial.lower()}"[:64]
            if not IDENTIFIER.fullmatch(new_id):
                raise ServiceError("device_id", "use 1-64 lowercase letters, digits, '-' or '_'")
            self.check_address(new_id, "device_id")
            if session.get(DeviceRow, new_id) is not None:
                raise ServiceError("device_id", f"device {new_id!r} already exists", status=409)
            clash = session.exec(
                select(DeviceRow.id).where(
                    col(DeviceRow.transport).in_(_ADDRESS_SHARING), DeviceRow.address == new_id
                )
            ).first()
            if clash is not None:
                raise ServiceError("device_id", f"address {new_id!r} is used by {clash!r}", status=409)
            if session.exec(select(DeviceRow.id).where(DeviceRow.serial == claim.serial)).first():
                raise ServiceError("id", f"serial {claim.serial!r} is already registered", status=409)
            row = DeviceRow(
                id=new_id,
                kind=claim.kind,
                name=name,
                area_code=area,
                transport=MQTT,
                address=new_id,
                serial=claim.serial,
                created_at=now,
                status={"firmware": claim.firmware} if claim.firmware else {},
            )
            password = self.issue_credentials(row)
            session.add(row)
            session.flush()  # the device exists before the claim points at it
            claim.state = "approved"
            claim.device_id = new_id
            claim.decided_by = principal.key_id
            claim.decided_at = now
            secret.claimed_at = now
            response = {
                "v": 1,
                "status": "approved",
                "nonce": claim.nonce,
                **seal_bundle(
                    bytes.fromhex(secret.encryption_key),
                    claim.serial,
                    claim.nonce,
                    self.bundle(row, password),
                ),
            }
            session.add_all([claim, secret])
            session.commit()
            session.refresh(row)
            return ApprovedClaim(device=row, serial=claim.serial, response=response)


def _refused(nonce: str | None, field: str, detail: str) -> dict[str, Any]:
    log.warning("claim request refused", field=field, detail=detail)
    answer: dict[str, Any] = {"v": 1, "status": "refused", "field": field, "detail": detail}
    if nonce is not None:
        answer["nonce"] = nonce
    return answer


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str) or not value.endswith("Z"):
        return None
    try:
        moment = datetime.fromisoformat(value)  # Python 3.11 reads the Z as UTC
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# -- the claim topics --------------------------------------------------------------------------------


class ClaimListener:
    """The controller's side of the claim topics: answers each request, and sends approvals."""

    def __init__(
        self,
        service: ProvisioningService,
        *,
        host: str,
        port: int,
        account: BrokerAccount,
        client_id: str,
    ) -> None:
        self._service = service
        self._host = host
        self._port = port
        self._account = account
        self._client_id = client_id
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self._host,
                    self._port,
                    username=self._account.username,
                    password=self._account.password,
                    identifier=self._client_id,
                ) as client:
                    await client.subscribe(f"{TOPIC_ROOT}/claim/+/request", qos=1)
                    self._client = client
                    self.connected.set()
                    delay = 0.5
                    async for message in client.messages:
                        payload = message.payload
                        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                        await self._answer(str(message.topic), raw)
            except aiomqtt.MqttError as error:
                log.warning("claim listener lost the broker; reconnecting", error=str(error), delay_s=delay)
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 30.0)

    async def _answer(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5:  # noqa: PLR2004  (wardcast/v1/claim/{serial}/request)
            return
        serial = parts[3]
        answer = await asyncio.to_thread(self._service.handle_claim_request, serial, payload)
        await self.publish(serial, answer)

    async def publish(self, serial: str, answer: Mapping[str, Any]) -> bool:
        """Send an answer on the serial's response topic; False when the broker is not reachable now."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(claim_response_topic(serial), json.dumps(answer), qos=1)
        except aiomqtt.MqttError as error:
            log.warning("claim answer not sent", serial=serial, error=str(error))
            return False
        return True
