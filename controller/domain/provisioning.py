"""Provisioning (docs/protocol.md §1.13): device CSV imports checked row by row, factory secrets, the
provisioning bundle and its QR code, and the zero-touch claim's cryptography.

Pure: bytes in, values out. Every CSV problem names its row (the spreadsheet's row number: the header is
row 1) and its column; nothing is half-parsed.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import re
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

import segno
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from controller.domain.broker_access import TOPIC_ROOT

BUNDLE_VERSION: Final = 1
IDENTIFIER: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# A serial travels in claim topics: no '/', '+', '#'.
SERIAL: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Devices an import or a claim may create: the MQTT kinds that need nothing more than an area.
PROVISIONABLE_KINDS: Final = ("speaker", "led_screen", "sensor")
KIND_PREFIX: Final = {"speaker": "spk", "led_screen": "led", "sensor": "sen", "wired_zone": "wz"}
DEVICE_CSV_REQUIRED: Final = ("kind", "area")
DEVICE_CSV_OPTIONAL: Final = ("id", "address", "serial", "name", "lat", "lon")
MAX_IMPORT_ROWS: Final = 100_000
MAX_NAME_LENGTH: Final = 200
# 128 bits at least: an HMAC key and, through HKDF, an AES key.
FACTORY_SECRET_HEX: Final = re.compile(r"^[0-9a-fA-F]{32,128}$")
PASSWORD_BYTES: Final = 24  # 192 random bits, as URL-safe base64 (32 characters)
CLAIM_AUTH_INFO: Final = b"wardcast/v1 claim auth"
CLAIM_ENCRYPTION_INFO: Final = b"wardcast/v1 claim bundle"


@dataclass(frozen=True, slots=True)
class RowProblem:
    row: int
    field: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class DeviceDraft:
    """One device a CSV row asks for, checked."""

    row: int
    id: str
    kind: str
    area: str
    address: str
    serial: str | None
    name: str | None
    lat: float | None
    lon: float | None


@dataclass(frozen=True, slots=True)
class Registry:
    """What the database already holds, for the checks a row is judged against."""

    areas: Collection[str]
    device_ids: Collection[str]
    addresses: Collection[str]
    serials: Collection[str]
    # Usernames of the broker's service accounts: no device may take one as its address.
    reserved_usernames: Collection[str]


class ImportFileError(ValueError):
    """The file as a whole is unusable (encoding, header, size); `field` names what."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def new_device_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _csv_rows(data: bytes, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ImportFileError("file", f"not UTF-8 text ({error.reason} at byte {error.start})") from error
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in required if name not in header]
    if missing:
        raise ImportFileError("header", f"missing column(s) {', '.join(missing)} (row 1)")
    reader.fieldnames = header
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        for row in reader:
            # csv counts physical lines; a quoted cell may span several, so the spreadsheet row is
            # the record's position.
            number = len(rows) + 2
            if number - 1 > MAX_IMPORT_ROWS:
                raise ImportFileError("file", f"more than {MAX_IMPORT_ROWS} rows")
            if None in row:
                rows.append((number, {"": "extra cells beyond the header"}))
                continue
            rows.append((number, {k: (v or "").strip() for k, v in row.items()}))
    except csv.Error as error:
        raise ImportFileError("file", f"malformed CSV near row {len(rows) + 2}: {error}") from error
    return rows


def _coordinate(text: str, low: float, high: float) -> float:
    value = float(text)
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    return value


def parse_device_csv(
    data: bytes, registry: Registry, new_id: Callable[[str], str]
) -> tuple[list[DeviceDraft], list[RowProblem]]:
    """The devices of a CSV (`kind,area[,id,address,serial,name,lat,lon]`) and the problems of the rows
    refused, each naming its row and column. A row clashing with the database or with an earlier row
    of the file (id, address, serial) is refused; the earlier row stands."""
    drafts: list[DeviceDraft] = []
    problems: list[RowProblem] = []
    seen_ids: set[str] = set()
    seen_addresses: set[str] = set()
    seen_serials: dict[str, int] = {}
    for number, cells in _csv_rows(data, DEVICE_CSV_REQUIRED):
        if "" in cells:
            problems.append(RowProblem(number, "row", cells[""]))
            continue
        row_problems: list[RowProblem] = []

        def refuse(field: str, detail: str, row: int = number, into: list[RowProblem] = row_problems) -> None:
            into.append(RowProblem(row, field, detail))

        kind = cells.get("kind", "")
        if kind not in PROVISIONABLE_KINDS:
            refuse("kind", f"must be one of {', '.join(PROVISIONABLE_KINDS)}, not {kind!r}")
        area = cells.get("area", "")
        if not area:
            refuse("area", "is required")
        elif area not in registry.areas:
            refuse("area", f"unknown area {area!r}")
        serial = cells.get("serial") or None
        if serial is not None:
            if not SERIAL.fullmatch(serial):
                refuse("serial", "use 1-64 letters, digits, '-' or '_'")
            elif serial in registry.serials:
                refuse("serial", f"serial {serial!r} is already registered")
            elif serial in seen_serials:
                refuse("serial", f"serial {serial!r} is also on row {seen_serials[serial]}")
        device_id = cells.get("id") or None
        if device_id is not None and not IDENTIFIER.fullmatch(device_id):
            refuse("id", "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
        name = cells.get("name") or None
        if name is not None and len(name) > MAX_NAME_LENGTH:
            refuse("name", f"at most {MAX_NAME_LENGTH} characters")
        coordinates: dict[str, float | None] = {}
        for field, low, high in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0)):
            text = cells.get(field) or ""
            try:
                coordinates[field] = _coordinate(text, low, high) if text else None
            except ValueError as error:
                refuse(
                    field, f"{text!r}: {error}" if "between" in str(error) else f"{text!r} is not a number"
                )
        if row_problems:
            problems.extend(row_problems)
            continue
        device_id = device_id or new_id(kind)
        address = cells.get("address") or device_id
        if device_id in registry.device_ids:
            refuse("id", f"device {device_id!r} already exists")
        elif device_id in seen_ids:
            refuse("id", f"device {device_id!r} is also on an earlier row")
        if not IDENTIFIER.fullmatch(address):
            refuse(
                "address", "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            )
        elif address in registry.reserved_usernames:
            refuse("address", f"{address!r} is the name of a broker service account")
        elif address in registry.addresses:
            refuse("address", f"address {address!r} is already used")
        elif address in seen_addresses:
            refuse("address", f"address {address!r} is also on an earlier row")
        if row_problems:
            problems.extend(row_problems)
            continue
        seen_ids.add(device_id)
        seen_addresses.add(address)
        if serial is not None:
            seen_serials[serial] = number
        drafts.append(
            DeviceDraft(
                row=number,
                id=device_id,
                kind=kind,
                area=area,
                address=address,
                serial=serial,
                name=name,
                lat=coordinates["lat"],
                lon=coordinates["lon"],
            )
        )
    return drafts, problems


@dataclass(frozen=True, slots=True)
class ClaimKeys:
    """The two keys a factory secret yields; the controller keeps these, never the secret."""

    auth_key: bytes
    encryption_key: bytes


def _hkdf(secret: bytes, serial: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=serial.encode(), info=info).derive(secret)


def derive_claim_keys(serial: str, factory_secret: bytes) -> ClaimKeys:
    return ClaimKeys(
        auth_key=_hkdf(factory_secret, serial, CLAIM_AUTH_INFO),
        encryption_key=_hkdf(factory_secret, serial, CLAIM_ENCRYPTION_INFO),
    )


def parse_factory_secrets(
    data: bytes, registered: Collection[str]
) -> tuple[dict[str, ClaimKeys], list[RowProblem]]:
    """`serial,factory_secret` rows (the secret in hex, 16-64 bytes) to the keys derived from each."""
    keys: dict[str, ClaimKeys] = {}
    rows_of: dict[str, int] = {}
    problems: list[RowProblem] = []
    for number, cells in _csv_rows(data, ("serial", "factory_secret")):
        if "" in cells:
            problems.append(RowProblem(number, "row", cells[""]))
            continue
        serial, secret = cells.get("serial", ""), cells.get("factory_secret", "")
        if not SERIAL.fullmatch(serial):
            problems.append(RowProblem(number, "serial", "use 1-64 letters, digits, '-' or '_'"))
        elif serial in registered:
            problems.append(RowProblem(number, "serial", f"serial {serial!r} already has a factory secret"))
        elif serial in rows_of:
            problems.append(
                RowProblem(number, "serial", f"serial {serial!r} is also on row {rows_of[serial]}")
            )
        elif not FACTORY_SECRET_HEX.fullmatch(secret):
            problems.append(RowProblem(number, "factory_secret", "must be 32-128 hexadecimal digits"))
        else:
            rows_of[serial] = number
            keys[serial] = derive_claim_keys(serial, bytes.fromhex(secret))
    return keys, problems


def claim_mac(auth_key: bytes, serial: str, nonce: str, at: str, kind: str) -> str:
    """HMAC-SHA256 over the claim request's members, one per line (§1.13)."""
    message = f"wardcast-claim-v1\n{serial}\n{nonce}\n{at}\n{kind}".encode()
    return hmac.new(auth_key, message, hashlib.sha256).hexdigest()


def claim_mac_matches(auth_key: bytes, serial: str, nonce: str, at: str, kind: str, mac: str) -> bool:
    return hmac.compare_digest(claim_mac(auth_key, serial, nonce, at, kind), mac.lower())


def seal_bundle(encryption_key: bytes, serial: str, nonce: str, bundle: Mapping[str, Any]) -> dict[str, str]:
    """The bundle encrypted to the one device holding the factory secret: AES-256-GCM, a random 96-bit
    IV, the serial and the request's nonce as associated data (an answer fits one request only)."""
    iv = secrets.token_bytes(12)
    plaintext = json.dumps(bundle, separators=(",", ":")).encode()
    ciphertext = AESGCM(encryption_key).encrypt(iv, plaintext, f"{serial}\n{nonce}".encode())
    return {"iv": base64.b64encode(iv).decode(), "ciphertext": base64.b64encode(ciphertext).decode()}


def provisioning_bundle(
    *,
    device_id: str,
    kind: str,
    address: str,
    area: str,
    broker_host: str,
    broker_port: int,
    password: str,
    command_public_key: str | None = None,
    topic_root: str = TOPIC_ROOT,
) -> dict[str, Any]:
    """What a device needs to join (§1.13). `command_key` (the controller's command-verification
    public key) is present only when one is configured."""
    bundle: dict[str, Any] = {
        "v": BUNDLE_VERSION,
        "device_id": device_id,
        "kind": kind,
        "address": address,
        "area": area,
        "broker_host": broker_host,
        "broker_port": broker_port,
        "username": address,
        "password": password,
        "client_id": address,
        "topic_root": topic_root,
    }
    if command_public_key is not None:
        bundle["command_key"] = command_public_key
    return bundle


def bundle_qr_png(bundle: Mapping[str, Any], *, scale: int = 4) -> bytes:
    """The bundle's compact JSON as a QR code PNG, for a technician's phone to scan onto the device."""
    buffer = io.BytesIO()
    qr = segno.make(json.dumps(bundle, separators=(",", ":")), error="m", micro=False)
    qr.save(buffer, kind="png", scale=scale, border=4)
    return buffer.getvalue()
