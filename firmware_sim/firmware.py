"""A simulated device's firmware update (docs/protocol.md §1.16), written from the text alone.

On a `firmware_update` the device reports `downloading`, fetches the image over HTTP (resuming with a
Range request when the transfer breaks), checks its SHA-256 and the Ed25519 signature over that digest
against the keys it trusts, reports `verified`, then `updating`, and "installs" it: it reboots (the
broker sees a clean disconnect and a new connection) and reports `updated` from the new version, whose
state document shows it. An install that fails reboots into the previous version and reports `failed`
with `rolled_back: true`.

Faults to inject (per device): the install fails (`fail_install`, or an image holding
`FAIL_INSTALL_MARKER`), the download is cut once half-way (`cut_download_once`), the downloaded bytes
are corrupted (`corrupt_download`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_sim import wire

if TYPE_CHECKING:
    from firmware_sim.device import MqttDevice

logger = logging.getLogger(__name__)

# An image holding these bytes fails to install on every simulated device (a broken build).
FAIL_INSTALL_MARKER: Final = b"WARDCAST-SIM-FAIL-INSTALL"
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")
_HTTP_OK: Final = 200
_HTTP_PARTIAL_CONTENT: Final = 206
_DOWNLOAD_ATTEMPTS: Final = 8
_RETRY_DELAY_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class FirmwareFaults:
    fail_install: bool = False
    cut_download_once: bool = False
    corrupt_download: bool = False


class FirmwareUpdateError(Exception):
    """The update cannot go on; `detail` is what the `failed` report says."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _DownloadCut(Exception):  # noqa: N818  (a fault we inject, not an error of ours)
    """The injected cut: the transfer stops half-way, as a dropped 4G link would."""


def decode_public_key(text: str) -> bytes:
    """A raw 32-byte Ed25519 public key from base64; ValueError otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{text!r} is not base64") from error
    if len(raw) != 32:  # noqa: PLR2004  (an Ed25519 public key is 32 bytes)
        raise ValueError(f"{text!r} decodes to {len(raw)} bytes; an Ed25519 public key is 32")
    return raw


def failing_devices(addresses: Sequence[str], fraction: float) -> tuple[str, ...]:
    """`round(fraction × n)` of the addresses, picked by a hash of each address: the same ones on every
    run and in every process of a fleet."""
    if not 0 <= fraction <= 1:
        raise ValueError("the fraction must be within [0, 1]")
    count = round(fraction * len(addresses))
    ranked = sorted(addresses, key=lambda address: (zlib.crc32(address.encode()), address))
    return tuple(sorted(ranked[:count]))


def signature_verifies(digest: bytes, signature_b64: str, trusted_keys: Sequence[bytes]) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    for raw in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, digest)
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


class FirmwareUpdater:
    """One device's firmware updates: at most one at a time."""

    def __init__(self, device: MqttDevice[Any, Any]) -> None:
        self._device = device
        self.faults = FirmwareFaults()
        self._cut_done = False
        self._task: asyncio.Task[None] | None = None
        self.updates_finished = 0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def handle(self, envelope: wire.Envelope) -> None:
        device = self._device
        try:
            command = wire.parse_firmware_command(envelope, device.address, device.kind)
        except wire.CommandRejectedError as rejection:
            self._report(envelope.command_id, envelope.correlation_id, "rejected", detail=rejection.detail)
            return
        if device.runtime.clock() > command.expires_at:
            self._report(command.id, command.correlation_id, "expired", detail="arrived after expires_at")
            return
        if not device.runtime.firmware_keys:
            self._report(command.id, command.correlation_id, "rejected", detail="no trusted firmware key")
            return
        if self.busy:
            self._report(command.id, command.correlation_id, "rejected", detail="another update is running")
            return
        self._task = device.runtime.services.loop.create_task(
            self._update(command), name=f"firmware-{device.address}"
        )

    def _report(
        self,
        command_id: str,
        correlation_id: str,
        state: wire.ReportState,
        *,
        detail: str | None = None,
        rolled_back: bool | None = None,
    ) -> None:
        extra: dict[str, object] = {"firmware": self._device.firmware_version}
        if rolled_back is not None:
            extra["rolled_back"] = rolled_back
        self._device._report(command_id, correlation_id, state, None, detail=detail, extra=extra)  # noqa: SLF001

    async def _update(self, command: wire.FirmwareUpdateCommand) -> None:
        image = command.firmware
        self._report(command.id, command.correlation_id, "downloading")
        try:
            body = await self._download(image)
            self._verify(image, body)
        except FirmwareUpdateError as error:
            self._report(command.id, command.correlation_id, "failed", detail=error.detail, rolled_back=False)
            return
        self._report(command.id, command.correlation_id, "verified")
        self._report(command.id, command.correlation_id, "updating")
        previous = self._device.firmware_version
        fails = self.faults.fail_install or FAIL_INSTALL_MARKER in body
        await asyncio.sleep(self._device.runtime.install_s / self._device.runtime.speed)
        if fails:
            await self._reboot(previous)
            self._report(
                command.id,
                command.correlation_id,
                "failed",
                detail=f"the install failed; rolled back to {previous}",
                rolled_back=True,
            )
        else:
            await self._reboot(image.version)
            self._report(command.id, command.correlation_id, "updated")
        self.updates_finished += 1

    def _verify(self, image: wire.FirmwareImage, body: bytearray) -> None:
        if self.faults.corrupt_download and body:
            body[len(body) // 2] ^= 0xFF
        digest = hashlib.sha256(body).digest()
        if digest.hex() != image.sha256:
            raise FirmwareUpdateError("sha256 mismatch: the image was not installed")
        if not signature_verifies(digest, image.signature, self._device.runtime.firmware_keys):
            raise FirmwareUpdateError("signature does not verify with a trusted key: not installed")

    async def _reboot(self, version: str) -> None:
        """Off and on again, running `version`: the broker sees the session end and a new one start,
        whose retained state shows the version."""
        device = self._device
        await device.stop()
        device.firmware_version = version
        await device.start(timeout=60)

    async def _download(self, image: wire.FirmwareImage) -> bytearray:
        body = bytearray()
        http = self._device.runtime.services.http
        delay_s = _RETRY_DELAY_S
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            try:
                await self._receive(http, image, body)
                return body
            except (httpx.TransportError, _DownloadCut) as error:
                logger.info(
                    "%s: firmware download broke at %d bytes (attempt %d: %r); resuming",
                    self._device.address,
                    len(body),
                    attempt,
                    error,
                )
                await asyncio.sleep(delay_s)
                delay_s *= 2
            except httpx.HTTPError as error:
                raise FirmwareUpdateError(f"download failed: {error!r}") from error
        raise FirmwareUpdateError(f"download failed after {_DOWNLOAD_ATTEMPTS} attempts")

    async def _receive(self, http: httpx.AsyncClient, image: wire.FirmwareImage, body: bytearray) -> None:
        """Appends the rest of the image to `body` (a Range request when it holds a part already)."""
        resumed_from = len(body)
        headers = {"Range": f"bytes={resumed_from}-"} if body else {}
        async with http.stream("GET", image.url, headers=headers) as response:
            if response.status_code == _HTTP_PARTIAL_CONTENT and body:
                match = _CONTENT_RANGE_START.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != len(body):
                    body.clear()
                    raise httpx.RemoteProtocolError(
                        "the server resumed at another offset", request=response.request
                    )
            elif response.status_code == _HTTP_OK:
                body.clear()
            else:
                raise FirmwareUpdateError(f"download failed: HTTP {response.status_code}")
            if resumed_from:
                self._log_resume(image, resumed_from, response.status_code)
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > image.size:
                    raise FirmwareUpdateError(f"the image is larger than the {image.size} bytes announced")
                if self.faults.cut_download_once and not self._cut_done and len(body) >= image.size // 2:
                    self._cut_done = True
                    raise _DownloadCut(f"injected cut at {len(body)} bytes")

    def _log_resume(self, image: wire.FirmwareImage, offset: int, status: int) -> None:
        play_log = self._device.runtime.services.play_log
        if play_log is not None:
            play_log.record(
                {
                    "address": self._device.address,
                    "event": "firmware_download_resumed",
                    "version": image.version,
                    "resumed_from": offset,
                    "status": status,
                }
            )
