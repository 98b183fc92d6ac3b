"""The controller's signing key and the signatures on every document it sends devices (docs/protocol.md
§1.15): commands on a device's or an area's `cmd` topic and the retained programmes.

One Ed25519 key for the whole controller: an area command is one message that thousands of speakers
verify, which only a public-key signature can serve with one signature (a per-device HMAC key would need
one MAC per device, so one message per device). The private key is generated on first use and kept
(mode 0600) in the data directory or at `signing.key_file`; devices get the public key at provisioning.

The sequence number in every signature comes from `ReservedSequence`: blocks reserved in the database,
so that it stays monotonic across restarts without a database write per command.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import Counter
from sqlalchemy import Engine, select, update

from controller.domain.command_signing import (
    DocumentKind,
    SignatureHeader,
    Target,
    payload_sha256,
)
from controller.store.models import CommandSequenceRow

log = structlog.get_logger(__name__)

# Seq numbers taken from the database at a time: one write per this many signed documents. A restart
# skips what was left of the block, which costs nothing (devices need seqs to grow, not to be dense).
SEQUENCE_BLOCK: Final = 1000
_KEY_ID_HEX_CHARS: Final = 16
_GROUP_OR_OTHER_ACCESS: Final = stat.S_IRWXG | stat.S_IRWXO

DOCUMENTS_SIGNED = Counter("wardcast_documents_signed_total", "Documents signed for devices", ["document"])


class SigningKeyError(Exception):
    """The signing key cannot be used; `field` is the configuration key at fault."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key (§1.15.1)."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:_KEY_ID_HEX_CHARS]


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_signing_key(path: Path, *, field: str = "signing.key_file") -> Ed25519PrivateKey:
    """The controller's key at `path` (PKCS #8 PEM), generated there (mode 0600) if there is none yet.

    Safe against two processes creating it at once (the controller and its CLI): the key is written to
    a private temporary file and linked into place, so exactly one key ever appears at `path`.
    """
    if not path.exists():
        _create_key_file(path, field)
    return _load_key_file(path, field)


def _create_key_file(path: Path, field: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SigningKeyError(field, f"cannot create the directory of {path}: {error}") from error
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race: its key stands
            os.link(temporary, path)
            log.info("generated the controller's command-signing key", path=str(path))
    except OSError as error:
        raise SigningKeyError(field, f"cannot write {path}: {error}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _load_key_file(path: Path, field: str) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise SigningKeyError(field, f"{path} is not a regular file")
        if mode & _GROUP_OR_OTHER_ACCESS:
            raise SigningKeyError(
                field,
                f"{path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                f"a private key must be mode 0600: chmod 600 {path}",
            )
        pem = path.read_bytes()
    except OSError as error:
        raise SigningKeyError(field, f"cannot read {path}: {error}") from error
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise SigningKeyError(field, f"{path} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(field, f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


# -- the sequence --------------------------------------------------------------------------------


def reserve_sequence_block(engine: Engine, size: int) -> int:
    """Moves the stored high-water mark up by `size` and returns the new mark: the caller owns
    `mark - size + 1 .. mark`. The UPDATE holds the row (PostgreSQL) or the database (SQLite) until
    the commit, so two reservations never overlap."""
    table = CommandSequenceRow.__table__  # type: ignore[attr-defined]  # SQLModel sets it
    with engine.begin() as connection:
        moved = connection.execute(
            update(table).where(table.c.id == 1).values(reserved_through=table.c.reserved_through + size)
        )
        if moved.rowcount != 1:
            raise RuntimeError("the command_sequence row is missing: run the database migrations")
        mark: int = connection.execute(select(table.c.reserved_through).where(table.c.id == 1)).scalar_one()
    return mark


class ReservedSequence:
    """Monotonic seq numbers, persisted in blocks through `reserve(size) -> high-water mark`.

    `next()` costs nothing within a block; the block's end waits for one reservation in a worker
    thread (every caller that runs out meanwhile waits for the same one).
    """

    def __init__(self, reserve: Callable[[int], int], *, block: int = SEQUENCE_BLOCK) -> None:
        if block < 1:
            raise ValueError("block: expected at least 1")
        self._reserve = reserve
        self._block = block
        self._next = 1
        self._last = 0  # nothing reserved yet
        self._refill: asyncio.Lock | None = None

    async def next(self) -> int:
        while self._next > self._last:
            if self._refill is None:
                self._refill = asyncio.Lock()
            async with self._refill:
                if self._next > self._last:
                    mark = await asyncio.to_thread(self._reserve, self._block)
                    self._next, self._last = mark - self._block + 1, mark
        value = self._next
        self._next += 1
        return value


class CountingSequence:
    """Seq numbers from a counter in memory (tests and tools that sign without a database)."""

    def __init__(self, start: int = 1) -> None:
        self._next = start

    async def next(self) -> int:
        value = self._next
        self._next += 1
        return value


# -- signing -------------------------------------------------------------------------------------


class CommandSigner:
    """Signs the documents the controller sends devices with its one Ed25519 key (§1.15)."""

    def __init__(self, private_key: Ed25519PrivateKey, sequence: ReservedSequence | CountingSequence) -> None:
        self._private_key = private_key
        self._sequence = sequence
        public_key = private_key.public_key()
        self.key_id = key_id(public_key)
        self.public_key = base64.b64encode(raw_public_key(public_key)).decode()
        self.public_key_pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    async def sign_command(self, document: Mapping[str, Any], target: Target) -> dict[str, Any]:
        """The command with a fresh `seq` and its `sig`. Each send signs again, so a command that is
        retried goes out under a new seq (the device deduplicates it by `id`, §1.4.2)."""
        seq = await self._sequence.next()
        signed = {name: value for name, value in document.items() if name != "sig"}
        signed["seq"] = seq
        return self._signed(
            signed,
            "command",
            target,
            document_id=_text(document, "id"),
            issued_at=_text(document, "issued_at"),
            expires_at=_text(document, "expires_at"),
            seq=seq,
        )

    async def sign_programme(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """A device's programme (§1.10) with an `id` of its own (each publication is a new document)
        and its `sig`; it is valid from `generated_at` to `valid_until`."""
        seq = await self._sequence.next()
        signed = {name: value for name, value in document.items() if name != "sig"}
        signed["id"] = str(uuid.uuid4())
        return self._signed(
            signed,
            "programme",
            Target("device", _text(document, "device")),
            document_id=signed["id"],
            issued_at=_text(document, "generated_at"),
            expires_at=_text(document, "valid_until"),
            seq=seq,
        )

    def _signed(
        self,
        document: dict[str, Any],
        kind: DocumentKind,
        target: Target,
        *,
        document_id: str,
        issued_at: str,
        expires_at: str,
        seq: int,
    ) -> dict[str, Any]:
        header = SignatureHeader(
            key_id=self.key_id,
            document=kind,
            id=document_id,
            target=target,
            issued_at=issued_at,
            expires_at=expires_at,
            seq=seq,
            payload_sha256=payload_sha256(document),
        )
        signature = self._private_key.sign(header.signed_bytes())
        document["sig"] = header.block(base64.b64encode(signature).decode())
        DOCUMENTS_SIGNED.labels(kind).inc()
        return document


def _text(document: Mapping[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"member `{name}` is {value!r}; a signed document needs a non-empty string")
    return value
