"""The controller's side of the simulator tests, written from docs/protocol.md like the simulator.

A tiny HTTP server for media (with Range and a fault that cuts a transfer), a controller probe that
publishes commands with the `controller` account and collects every report and state, command
builders, a clock a test can move forward, and the test's own controller key: the probe signs what it
sends (docs/protocol.md §1.15) with the controller's signature code, and the simulators verify with
`TEST_COMMAND_KEY` through their own, so the two implementations are checked against each other.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import re
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiomqtt
import numpy as np
import soundfile
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.domain.command_signing import SignatureHeader, Target, payload_sha256
from controller.services.command_signing import key_id, raw_public_key
from firmware_sim.signature import CommandKey
from firmware_sim.speaker import SimulatedSpeaker, SpeakerRuntime
from tests.support.broker import TestBroker

T = TypeVar("T")
TERMINAL_STATES = frozenset({"completed", "interrupted", "stopped", "failed", "expired", "rejected"})
WAIT_S = 10.0
_RANGE = re.compile(r"bytes=(\d+)-$")

# The controller key of the simulator tests, and the public half the simulators are given.
TEST_SIGNING_KEY = Ed25519PrivateKey.generate()
TEST_COMMAND_KEY = CommandKey(raw_public_key(TEST_SIGNING_KEY.public_key()))
TEST_COMMAND_KEY_TEXT = base64.b64encode(TEST_COMMAND_KEY.raw).decode()
# One counter for the whole session: seqs only grow, as the controller's do across restarts.
_SEQUENCE = itertools.count(1)
_MISSING = "-"  # what the header says for a member the document lacks (a malformed-command test)


def sign_document(
    document: dict[str, Any],
    *,
    kind: str = "command",
    key: Ed25519PrivateKey = TEST_SIGNING_KEY,
    seq: int | None = None,
) -> dict[str, Any]:
    """`document` signed as the controller signs (docs/protocol.md §1.15), with the next seq of the
    session (also put in a command's own `seq`, unless a test made that malformed). A header member
    the document lacks or has malformed is signed as it stands, so the device sees the mismatch."""
    signed = {name: value for name, value in document.items() if name != "sig"}
    seq = next(_SEQUENCE) if seq is None else seq
    if kind == "programme":
        signed.setdefault("id", str(uuid.uuid4()))
        issued_at, expires_at = signed.get("generated_at"), signed.get("valid_until")
    else:
        if type(signed.get("seq")) is int:
            signed["seq"] = seq
        issued_at, expires_at = signed.get("issued_at"), signed.get("expires_at")
    target = (
        Target("area", str(signed["area"]))
        if "area" in signed
        else Target("device", str(signed.get("device")))
    )
    header = SignatureHeader(
        key_id=key_id(key.public_key()),
        document="programme" if kind == "programme" else "command",
        id=_text_or_missing(signed.get("id")),
        target=target,
        issued_at=_text_or_missing(issued_at),
        expires_at=_text_or_missing(expires_at),
        seq=seq,
        payload_sha256=payload_sha256(signed),
    )
    signed["sig"] = header.block(base64.b64encode(key.sign(header.signed_bytes())).decode())
    return signed


def _text_or_missing(value: object) -> str:
    return value if isinstance(value, str) and value and value.isprintable() else _MISSING


def timestamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The audio most simulator tests play: short enough to finish quickly at their playback speeds.
MEDIA_S = 0.5


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    samples = np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate).astype(np.float32) * 0.2
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class ShiftableClock:
    """Wall-clock time plus an offset a test moves forward, instead of sleeping until an expiry."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass
class _Resource:
    body: bytes
    content_type: str
    cut_first_transfer: bool = False
    required_token: str | None = None
    # A held resource answers only once the test releases it; `requested` tells the test it was asked.
    release: threading.Event | None = None
    requested: threading.Event = field(default_factory=threading.Event)


@dataclass
class MediaServer:
    """GET /media/{sha256} with Range support, plus JSON resources for API lookups."""

    resources: dict[str, _Resource] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        # A short poll interval keeps shutdown() (which waits for the next poll) from slowing every test.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.02,), name="media-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        for resource in self.resources.values():
            if resource.release is not None:
                resource.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_media(self, body: bytes, *, cut_first_transfer: bool = False, held: bool = False) -> str:
        """Serves `body` at /media/{sha256}; a `held` one answers only after `release(sha256)`."""
        sha256 = hashlib.sha256(body).hexdigest()
        self.resources[f"/media/{sha256}"] = _Resource(
            body, "audio/wav", cut_first_transfer, release=threading.Event() if held else None
        )
        return sha256

    async def requested(self, sha256: str, timeout: float = WAIT_S) -> None:
        """Returns once a request for the media arrived (a held one is then waiting for `release`)."""
        event = self.resources[f"/media/{sha256}"].requested
        if not await asyncio.to_thread(event.wait, timeout):
            raise AssertionError(f"nobody asked for /media/{sha256} within {timeout} s")

    def release(self, sha256: str) -> None:
        release = self.resources[f"/media/{sha256}"].release
        assert release is not None, "only a held resource can be released"
        release.set()

    def add_json(self, path: str, document: object, *, token: str) -> None:
        self.resources[path] = _Resource(
            json.dumps(document).encode(), "application/json", required_token=token
        )

    def media_url(self, sha256: str) -> str:
        return f"{self.base_url}/media/{sha256}"

    def requests_for(self, sha256: str) -> list[str | None]:
        with self._lock:
            return [range_header for path, range_header in self.requests if path == f"/media/{sha256}"]

    def _record(self, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((path, range_header))


def _handler_for(server: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            range_header = self.headers.get("Range")
            server._record(path, range_header)
            resource = server.resources.get(path)
            if resource is None:
                self.send_error(404)
                return
            resource.requested.set()
            if resource.release is not None:
                resource.release.wait(WAIT_S)
            if (
                resource.required_token
                and self.headers.get("Authorization") != f"Bearer {resource.required_token}"
            ):
                self.send_error(401)
                return
            body, start = resource.body, 0
            match = _RANGE.match(range_header or "")
            if match is not None:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", resource.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if resource.cut_first_transfer:
                resource.cut_first_transfer = False
                self.wfile.write(body[start : start + (len(body) - start) // 2])
                self.close_connection = True
                return
            self.wfile.write(body[start:])

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
            """Quiet: the test output is for failures."""

    return Handler


class DeviceTopicsProbe:
    """An MQTT client on the controller's account that records what devices publish on some of their
    topics (`leaves`), and lets a test wait until what it recorded satisfies a predicate."""

    def __init__(self, broker: TestBroker, leaves: tuple[str, ...], name: str) -> None:
        self._client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=broker.controller.username,
            password=broker.controller.password,
            identifier=f"{name}-{uuid.uuid4().hex[:8]}",
        )
        self._leaves = leaves
        self.states: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        await self._client.subscribe([(f"wardcast/v1/dev/+/{leaf}", 1) for leaf in self._leaves])
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self._client.messages:
            _, _, _, address, leaf = message.topic.value.split("/")
            assert isinstance(message.payload, bytes | bytearray)
            document = json.loads(message.payload)
            async with self._changed:
                self._record(address, leaf, document)
                self._changed.notify_all()

    def _record(self, address: str, leaf: str, document: dict[str, Any]) -> None:  # noqa: ARG002  (subclasses sort by leaf)
        """Keeps a message; states by address here, other leaves in subclasses."""
        self.states.setdefault(address, []).append(document)

    async def wait_until(self, predicate: Callable[[], T | None], timeout: float = WAIT_S) -> T:
        async with asyncio.timeout(timeout), self._changed:
            return await self._changed.wait_for(predicate)  # type: ignore[arg-type]


class ControllerProbe(DeviceTopicsProbe):
    """Publishes commands as the controller and records every report and state, by topic."""

    def __init__(self, broker: TestBroker) -> None:
        super().__init__(broker, ("ack", "state"), "probe")
        self.reports: list[dict[str, Any]] = []

    def _record(self, address: str, leaf: str, document: dict[str, Any]) -> None:
        if leaf == "ack":
            self.reports.append({**document, "_address": address})
        else:
            super()._record(address, leaf, document)

    def reports_for(self, command_id: str) -> list[dict[str, Any]]:
        return [report for report in self.reports if report["command_id"] == command_id]

    def states_of(self, command_id: str) -> list[str]:
        return [report["state"] for report in self.reports_for(command_id)]

    async def report(self, command_id: str, state: str, timeout: float = WAIT_S) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in self.reports_for(command_id) if r["state"] == state), None)

        try:
            return await self.wait_until(found, timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {state!r} report for {command_id} within {timeout} s; got {self.states_of(command_id)}"
            ) from None

    async def final_report(self, command_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in self.reports_for(command_id) if r["state"] in TERMINAL_STATES), None)

        try:
            return await self.wait_until(found, timeout)
        except TimeoutError:
            raise AssertionError(
                f"{command_id} did not end within {timeout} s; got {self.states_of(command_id)}"
            ) from None

    async def state(self, address: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((s for s in reversed(self.states.get(address, [])) if predicate(s)), None)

        return await self.wait_until(found)

    async def send(self, command: dict[str, Any], *, signed: bool = True) -> dict[str, Any]:
        """Publishes the command on its device's topic, signed (as the controller does) unless told
        not to; returns what was sent."""
        document = sign_document(command) if signed else command
        await self.send_raw(command["device"], json.dumps(document).encode())
        return document

    async def send_raw(self, address: str, payload: bytes) -> None:
        await self._client.publish(f"wardcast/v1/dev/{address}/cmd", payload, qos=1)

    async def publish_programme(self, address: str, document: dict[str, Any] | bytes) -> None:
        """Publishes the device's retained programme document (§1.10), signed (§1.15); bytes go as
        they are (`b""` empties the broker's retained copy)."""
        payload = (
            document
            if isinstance(document, bytes)
            else json.dumps(sign_document(document, kind="programme")).encode()
        )
        await self._client.publish(f"wardcast/v1/dev/{address}/schedule", payload, qos=1, retain=True)


def programme_document(
    address: str,
    items: list[tuple[datetime, dict[str, Any]]],
    *,
    generated_at: datetime | None = None,
    valid_for_s: float = 3600.0,
    comm_loss: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A §1.10 programme: `items` are (start_at, play command) pairs."""
    generated = generated_at or datetime.now(UTC)
    return {
        "v": 1,
        "device": address,
        "generated_at": timestamp(generated),
        "valid_from": timestamp(generated - timedelta(seconds=60)),
        "valid_until": timestamp(generated + timedelta(seconds=valid_for_s)),
        "comm_loss": comm_loss or {"policy": "keep"},
        "items": [{"start_at": timestamp(start_at), "command": command} for start_at, command in items],
    }


_BANDS = {"normal": 0, "priority": 1, "emergency": 2}


def play_command(
    address: str,
    media_url: str,
    sha256: str,
    *,
    duration_s: float,
    band: str = "normal",
    sub: int = 0,
    repeats: int = 1,
    max_duration_s: float = 600.0,
    expires_in_s: float = 60.0,
    mode: str = "live",
    now: datetime | None = None,
    playlist: list[dict[str, Any]] | None = None,
    gap_s: float | None = None,
) -> dict[str, Any]:
    """A valid `play`; with `playlist`, `media` is its first item (and the url/sha256/duration
    arguments are ignored); `gap_s` is left out unless given."""
    issued = now or datetime.now(UTC)
    media = dict(playlist[0]) if playlist else media_object(media_url, sha256, duration_s=duration_s)
    command: dict[str, Any] = {
        "v": 1,
        "type": "play",
        "id": str(uuid.uuid4()),
        "correlation_id": f"delivery-{uuid.uuid4().hex[:12]}",
        "device": address,
        "issued_at": timestamp(issued),
        "expires_at": timestamp(issued + timedelta(seconds=expires_in_s)),
        "seq": 1,
        "broadcast_id": f"broadcast-{uuid.uuid4().hex[:8]}",
        "priority": {"class": band, "sub": sub, "rank": _BANDS[band] * 256 + sub},
        "mode": mode,
        "media": media,
        "repeats": repeats,
        "max_duration_s": max_duration_s,
    }
    if playlist is not None:
        command["playlist"] = [dict(item) for item in playlist]
    if gap_s is not None:
        command["gap_s"] = gap_s
    return command


def media_object(media_url: str, sha256: str, *, duration_s: float) -> dict[str, Any]:
    """A §1.3 media object, as `media` or as a `playlist` item."""
    return {"url": media_url, "sha256": sha256, "duration_s": duration_s, "content_type": "audio/wav"}


def stop_command(address: str, target: str, reason: str = "cancelled") -> dict[str, Any]:
    issued = datetime.now(UTC)
    return {
        "v": 1,
        "type": "stop",
        "id": str(uuid.uuid4()),
        "correlation_id": f"stop-{uuid.uuid4().hex[:12]}",
        "device": address,
        "issued_at": timestamp(issued),
        "expires_at": timestamp(issued + timedelta(seconds=60)),
        "seq": 2,
        "target": target,
        "reason": reason,
    }


def show_command(
    address: str,
    headline: str,
    *,
    body: str | None = None,
    display_s: float = 1.0,
    style: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A valid LED-screen `show` (§1.11): the members it shares with a `play` (§1.3; `band`, `sub`,
    `expires_in_s`, `mode` and `now` as in `play_command`), its text and how long it stays up."""
    command = play_command(address, "http://unused.invalid/", "0" * 64, duration_s=1.0, **options)
    for member in ("media", "repeats", "max_duration_s"):
        del command[member]
    command["type"] = "show"
    command["text"] = {"headline": headline} if body is None else {"headline": headline, "body": body}
    command["display_s"] = display_s
    if style is not None:
        command["style"] = style
    return command


def setting(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A mutation of a command for malformed-command tests: sets the member at a dotted `path`."""

    def mutate(command: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        _member_parent(command, parents)[leaf] = value

    return mutate


def without(path: str) -> Callable[[dict[str, Any]], None]:
    """A mutation of a command for malformed-command tests: removes the member at a dotted `path`."""

    def mutate(command: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        del _member_parent(command, parents)[leaf]

    return mutate


def _member_parent(command: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    target = command
    for parent in parents:
        target = target[parent]
    return target


REPO_ROOT = Path(__file__).resolve().parent.parent


async def start_fleet_cli(broker: TestBroker, *options: str) -> asyncio.subprocess.Process:
    """`python -m firmware_sim fleet` with the device account of `broker`, stdout piped (for READY)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim",
        "fleet",
        "--mqtt-url",
        broker.url,
        "--username",
        broker.simulator.username,
        f"--password={broker.simulator.password}",  # it may start with "-"
        "--command-key",
        TEST_COMMAND_KEY_TEXT,
        *options,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def started(runtime: SpeakerRuntime, address: str = "spk-1", **options: Any) -> SimulatedSpeaker:
    """A speaker of `runtime`, connected and subscribed."""
    speaker = runtime.speaker(address, **options)
    await speaker.start(timeout=WAIT_S)
    return speaker
