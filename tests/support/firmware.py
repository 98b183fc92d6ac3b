"""Firmware signing keys, images and a controller that trusts the test's key (issue 6, rollouts)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.broker import TestBroker
from tests.support.system import ControllerHandle


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public_b64(self) -> str:
        return base64.b64encode(
            self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        ).decode()

    def sign(self, image: bytes) -> str:
        """docs/protocol.md §1.16: Ed25519 over the image's 32-byte SHA-256 digest, in base64."""
        return base64.b64encode(self.private.sign(hashlib.sha256(image).digest())).decode()


def make_image(version: str, size: int = 200_000) -> bytes:
    """Deterministic bytes standing for an image of `version`."""
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def upload_image(
    client: httpx.Client,
    image: bytes,
    *,
    version: str,
    signature: str | None,
    kind: str = "speaker",
    sha256: str | None = None,
) -> httpx.Response:
    data = {"kind": kind, "version": version}
    if signature is not None:
        data["signature"] = signature
    if sha256 is not None:
        data["sha256"] = sha256
    return client.post("/api/v1/firmware", data=data, files={"file": (f"fw-{version}.bin", image)})


@pytest.fixture
def signing_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


@pytest.fixture
def firmware_controller(
    tmp_path: Path, database_url: str, mosquitto: TestBroker, signing_key: SigningKey
) -> Iterator[ControllerHandle]:
    """A controller that trusts `signing_key` for firmware, with no maintenance window by default."""
    handle = ControllerHandle(
        workdir=tmp_path,
        database_url=database_url,
        broker=mosquitto,
        extra_env={
            "WARDCAST_FIRMWARE__TRUSTED_KEYS": json.dumps([signing_key.public_b64]),
            "WARDCAST_FIRMWARE__DIR": str(tmp_path / "firmware"),
            "WARDCAST_FIRMWARE__MAX_BYTES": str(1_000_000),
            "WARDCAST_FIRMWARE__TICK_S": "0.2",
        },
    )
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()
