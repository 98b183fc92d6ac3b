"""Firmware images: signed by whoever builds them, checked here before anything is kept.

An image's signature is Ed25519 over the 32 raw bytes of the image's SHA-256 digest (not over the
image itself): a device checks the digest while it streams the download anyway, so it verifies the
signature without holding the image, and the controller checks an upload the same way. The
signature travels as standard base64 of its 64 bytes; keys as base64 of their raw 32 bytes.

An upload is spooled to a temporary file while its digest is computed; only once the size, the
given checksum, the signature and the version's uniqueness all check out is the file moved under
its digest and the row written. A refused upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.domain.clock import Clock, rfc3339
from controller.services.errors import ServiceError
from controller.store.models import FirmwareImageRow

FIRMWARE_KINDS: Final = frozenset({"speaker", "led_screen", "sensor", "wired_zone"})
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_VERSION: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
_SIGNATURE_BYTES: Final = 64
_WRITE_BATCH_BYTES: Final = 1 << 20
_STORED_FILE_MODE: Final = 0o644


class FirmwareRejected(ServiceError):  # noqa: N818  (named like MediaRejected, which clients know)
    """An image that cannot be stored; `field` names the part of the upload at fault."""


def key_id(public_key: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate_signing_key() -> tuple[bytes, str]:
    """A new private key (PKCS #8 PEM, for the image builder) and its public key (base64, for
    `firmware.trusted_keys` and for devices)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(public).decode()


def sign_image(image: Path, private_key_pem: bytes) -> str:
    """The base64 Ed25519 signature of `image` (over its SHA-256 digest)."""
    private = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise TypeError("the key is not an Ed25519 private key")
    digest = hashlib.sha256()
    with image.open("rb") as source:
        while chunk := source.read(_WRITE_BATCH_BYTES):
            digest.update(chunk)
    return base64.b64encode(private.sign(digest.digest())).decode()


def verify_signature(digest: bytes, signature_b64: str, trusted_keys: Sequence[bytes]) -> str:
    """The id of the trusted key that signed `digest`; FirmwareRejected naming `signature` otherwise."""
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise FirmwareRejected("signature", "is not base64") from error
    if len(signature) != _SIGNATURE_BYTES:
        raise FirmwareRejected("signature", f"decodes to {len(signature)} bytes; an Ed25519 signature is 64")
    if not trusted_keys:
        raise FirmwareRejected(
            "signature", "no trusted firmware signing key is configured (firmware.trusted_keys)", status=409
        )
    for raw in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, digest)
        except InvalidSignature:
            continue
        return key_id(raw)
    raise FirmwareRejected(
        "signature",
        "does not verify with any trusted firmware key: the image was tampered with or signed by an "
        "unknown key",
    )


@dataclass(frozen=True, slots=True)
class ImageUpload:
    kind: str
    version: str
    signature: str
    sha256: str | None
    filename: str | None
    uploaded_by: str | None


class FirmwareStore:
    """Images under `root/<sha256>`, uploads spooled in `root/tmp` (same file system: the final move
    is an atomic rename)."""

    def __init__(self, engine: Engine, clock: Clock, root: Path, *, max_bytes: int) -> None:
        self._engine = engine
        self._clock = clock
        self._root = root
        self._spool_dir = root / "tmp"
        self.max_bytes = max_bytes

    def path_for(self, sha256: str) -> Path:
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a SHA-256 digest in lowercase hex: {sha256!r}")
        return self._root / sha256

    async def ingest(
        self, chunks: AsyncIterator[bytes], upload: ImageUpload, trusted_keys: Sequence[bytes]
    ) -> FirmwareImageRow:
        _check_metadata(upload)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=self._spool_dir, prefix="image-", suffix=".part")
        spooled = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as sink:
                digest, size = await self._receive(chunks, sink)
            return await asyncio.to_thread(self._commit, spooled, digest, size, upload, trusted_keys)
        finally:
            await asyncio.to_thread(spooled.unlink, missing_ok=True)

    async def _receive(self, chunks: AsyncIterator[bytes], sink: Any) -> tuple[bytes, int]:
        digest = hashlib.sha256()
        size = 0
        pending = bytearray()
        async for chunk in chunks:
            size += len(chunk)
            if size > self.max_bytes:
                raise FirmwareRejected(
                    "file", f"the image is larger than the {self.max_bytes} byte limit", status=413
                )
            digest.update(chunk)
            pending += chunk
            if len(pending) >= _WRITE_BATCH_BYTES:
                await asyncio.to_thread(sink.write, bytes(pending))
                pending.clear()
        if size == 0:
            raise FirmwareRejected("file", "the image is empty")
        await asyncio.to_thread(_seal, sink, bytes(pending))
        return digest.digest(), size

    def _commit(
        self, spooled: Path, digest: bytes, size: int, upload: ImageUpload, trusted_keys: Sequence[bytes]
    ) -> FirmwareImageRow:
        sha256 = digest.hex()
        if upload.sha256 is not None and upload.sha256 != sha256:
            raise FirmwareRejected(
                "sha256", f"the image's SHA-256 is {sha256}, not the {upload.sha256} given with it"
            )
        signer = verify_signature(digest, upload.signature, trusted_keys)
        with Session(self._engine, expire_on_commit=False) as session:
            same_version = session.exec(
                select(FirmwareImageRow).where(
                    FirmwareImageRow.kind == upload.kind, FirmwareImageRow.version == upload.version
                )
            ).first()
            if same_version is not None:
                raise FirmwareRejected(
                    "version", f"{upload.kind} firmware {upload.version} is already stored", status=409
                )
            same_bytes = session.exec(
                select(FirmwareImageRow).where(FirmwareImageRow.sha256 == sha256)
            ).first()
            if same_bytes is not None:
                raise FirmwareRejected(
                    "file",
                    f"this image is already stored as {same_bytes.kind} firmware {same_bytes.version}",
                    status=409,
                )
            target = self.path_for(sha256)
            # A file left by a crash between the rename and the commit is not ours to delete on failure.
            existed = target.exists()
            row = FirmwareImageRow(
                id=str(uuid.uuid4()),
                kind=upload.kind,
                version=upload.version,
                sha256=sha256,
                size_bytes=size,
                signature=upload.signature.strip(),
                key_id=signer,
                filename=upload.filename,
                uploaded_by=upload.uploaded_by,
                uploaded_at=self._clock.now(),
            )
            session.add(row)
            spooled.chmod(_STORED_FILE_MODE)
            spooled.replace(target)
            try:
                session.commit()
            except IntegrityError as error:  # the same version uploaded twice at once: the other won
                session.rollback()
                kept = session.exec(
                    select(FirmwareImageRow.id).where(FirmwareImageRow.sha256 == sha256)
                ).first()
                if not existed and kept is None:
                    target.unlink(missing_ok=True)
                raise FirmwareRejected(
                    "version", "an image with this version or content was just stored", status=409
                ) from error
            except BaseException:
                if not existed:
                    target.unlink(missing_ok=True)
                raise
            return row

    def list_images(self) -> list[FirmwareImageRow]:
        with Session(self._engine) as session:
            return list(
                session.exec(
                    select(FirmwareImageRow).order_by(col(FirmwareImageRow.uploaded_at).desc())
                ).all()
            )

    def get(self, image_id: str) -> FirmwareImageRow | None:
        with Session(self._engine) as session:
            return session.get(FirmwareImageRow, image_id)


def _seal(sink: Any, tail: bytes) -> None:
    sink.write(tail)
    sink.flush()
    os.fsync(sink.fileno())


def _check_metadata(upload: ImageUpload) -> None:
    if upload.kind not in FIRMWARE_KINDS:
        raise FirmwareRejected("kind", f"{upload.kind!r} is not one of {', '.join(sorted(FIRMWARE_KINDS))}")
    if not _VERSION.fullmatch(upload.version):
        raise FirmwareRejected(
            "version", "use 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
        )
    if not upload.signature.strip():
        raise FirmwareRejected("signature", "the image is unsigned: give its detached Ed25519 signature")
    if upload.sha256 is not None and not _SHA256_HEX.fullmatch(upload.sha256):
        raise FirmwareRejected("sha256", "must be 64 lowercase hexadecimal digits")


def image_out(row: FirmwareImageRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "version": row.version,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "signature": row.signature,
        "key_id": row.key_id,
        "filename": row.filename,
        "uploaded_at": rfc3339(row.uploaded_at),
    }
