"""A device that boots with only a factory secret and claims itself (docs/protocol.md §1.13).

    python -m firmware_sim claim --mqtt-url mqtt://host:port --username wardcast.claim --password=… \\
        --serial SN-0001 --factory-secret HEX --kind speaker --bundle-out bundle.json

connects with the shared claim account, publishes a claim request that proves the factory secret
(HMAC-SHA256 under a key derived by HKDF, the secret itself never on the wire), prints
`PENDING <claim id> <expires at>` once the controller has recorded it, waits for a technician's approval,
decrypts the bundle (AES-256-GCM under a second derived key), writes it to `--bundle-out` and prints
`CLAIMED <address>`. A refusal prints `REFUSED <field>: <detail>` and exits 1.

Written from the protocol text alone: nothing here comes from the controller's code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiomqtt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware_sim.device import parse_mqtt_url
from firmware_sim.wire import format_timestamp, utc_now

TOPIC_ROOT: Final = "wardcast/v1"
AUTH_INFO: Final = b"wardcast/v1 claim auth"
ENCRYPTION_INFO: Final = b"wardcast/v1 claim bundle"
_EXIT_OK: Final = 0
_EXIT_REFUSED: Final = 1
_EXIT_USAGE: Final = 2


class ClaimRefusedError(Exception):
    """The controller refused the request; `field` names what was wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClaimDevice:
    serial: str
    factory_secret: bytes
    kind: str = "speaker"
    firmware: str = "sim-1.0.0"

    def _key(self, info: bytes) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.serial.encode(), info=info)
        return hkdf.derive(self.factory_secret)

    def request(self, nonce: str, at: str) -> dict[str, Any]:
        message = f"wardcast-claim-v1\n{self.serial}\n{nonce}\n{at}\n{self.kind}".encode()
        mac = hmac.new(self._key(AUTH_INFO), message, hashlib.sha256).hexdigest()
        return {
            "v": 1,
            "serial": self.serial,
            "nonce": nonce,
            "at": at,
            "kind": self.kind,
            "firmware": self.firmware,
            "mac": mac,
        }

    def open_bundle(self, nonce: str, answer: dict[str, Any]) -> dict[str, Any]:
        try:
            iv = base64.b64decode(answer["iv"], validate=True)
            ciphertext = base64.b64decode(answer["ciphertext"], validate=True)
            plaintext = AESGCM(self._key(ENCRYPTION_INFO)).decrypt(
                iv, ciphertext, f"{self.serial}\n{nonce}".encode()
            )
        except (KeyError, TypeError, ValueError, InvalidTag) as error:
            raise ClaimRefusedError(
                "ciphertext", f"the answer does not open with our key ({error!r})"
            ) from error
        bundle: dict[str, Any] = json.loads(plaintext)
        return bundle


async def claim(
    device: ClaimDevice,
    *,
    host: str,
    port: int,
    username: str,
    password: str,
    timeout_s: float,
    on_pending: Any = None,
) -> dict[str, Any]:
    """Ask to be claimed and return the decrypted provisioning bundle once a technician approved."""
    nonce = secrets.token_hex(16)
    response_topic = f"{TOPIC_ROOT}/claim/{device.serial}/response"
    async with (
        asyncio.timeout(timeout_s),
        aiomqtt.Client(
            host, port, username=username, password=password, identifier=f"claim-{nonce[:12]}"
        ) as client,
    ):
        # Subscribed before asking, so that no answer can come before we listen.
        await client.subscribe(response_topic, qos=1)
        request = device.request(nonce, format_timestamp(utc_now()))
        await client.publish(f"{TOPIC_ROOT}/claim/{device.serial}/request", json.dumps(request), qos=1)
        async for message in client.messages:
            payload = message.payload
            try:
                answer = json.loads(payload if isinstance(payload, bytes | bytearray | str) else b"")
            except ValueError:
                continue
            if not isinstance(answer, dict) or answer.get("nonce", nonce) != nonce:
                continue  # another request's answer (or one without our nonce: a refusal of garbage)
            status = answer.get("status")
            if status == "refused":
                raise ClaimRefusedError(str(answer.get("field")), str(answer.get("detail")))
            if status == "pending" and on_pending is not None:
                on_pending(answer)
            if status == "approved":
                return device.open_bundle(nonce, answer)
    raise ClaimRefusedError("connection", "the broker closed the connection before an answer")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_sim claim", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mqtt-url", required=True)
    parser.add_argument("--username", required=True, help="the shared claim account")
    parser.add_argument("--password", help="its password (default: $WARDCAST_SIM_CLAIM_PASSWORD)")
    parser.add_argument("--serial", required=True)
    parser.add_argument("--factory-secret", required=True, help="hex")
    parser.add_argument("--kind", default="speaker", choices=["speaker", "led_screen", "sensor"])
    parser.add_argument("--bundle-out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS")
    try:
        arguments = parser.parse_args(argv)
        host, port = parse_mqtt_url(arguments.mqtt_url)
        secret = bytes.fromhex(arguments.factory_secret)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else _EXIT_USAGE
    except ValueError as error:
        sys.stderr.write(f"{error}\n")
        return _EXIT_USAGE
    password = arguments.password or os.environ.get("WARDCAST_SIM_CLAIM_PASSWORD", "")

    def announce(answer: dict[str, Any]) -> None:
        sys.stdout.write(f"PENDING {answer.get('claim_id')} {answer.get('expires_at')}\n")
        sys.stdout.flush()

    device = ClaimDevice(serial=arguments.serial, factory_secret=secret, kind=arguments.kind)
    try:
        bundle = asyncio.run(
            claim(
                device,
                host=host,
                port=port,
                username=arguments.username,
                password=password,
                timeout_s=arguments.timeout,
                on_pending=announce,
            )
        )
    except ClaimRefusedError as error:
        sys.stdout.write(f"REFUSED {error.field}: {error.detail}\n")
        return _EXIT_REFUSED
    except (TimeoutError, aiomqtt.MqttError) as error:
        sys.stdout.write(f"REFUSED connection: {error!r}\n")
        return _EXIT_REFUSED
    arguments.bundle_out.write_text(json.dumps(bundle))
    arguments.bundle_out.chmod(0o600)
    sys.stdout.write(f"CLAIMED {bundle.get('address')}\n")
    return _EXIT_OK
