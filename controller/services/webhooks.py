"""Progress callbacks for alerts that asked for one (`webhook_url`), signed so the IOC can trust them.

Each callback is a JSON body `{alert_id, status, device_count, counts, finished, at}` POSTed to the alert's
URL with `X-Wardcast-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with
alerts.webhook_secret>`. Delivery changes are coalesced: at most one callback per alert per second, and
a last one once every delivery has ended. A callback that fails (network error or non-2xx) is retried
with exponential backoff (1, 2, 4 … s) up to `alerts.webhook_attempts` times; a newer callback for the
same alert replaces one still waiting to be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import httpx
import structlog
from prometheus_client import Counter

from controller.domain.clock import Clock, rfc3339
from controller.services.events import EventBus
from controller.settings import AlertSettings

log = structlog.get_logger(__name__)

WEBHOOK_CALLS = Counter("wardcast_alert_webhook_calls_total", "Alert progress callbacks", ["outcome"])
_COALESCE_S = 1.0
_TERMINAL = frozenset({"completed", "interrupted", "failed", "expired", "cancelled"})


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class AlertWebhooks:
    def __init__(
        self,
        bus: EventBus,
        settings: AlertSettings,
        clock: Clock,
        *,
        progress: Callable[[str], dict[str, Any]],
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._clock = clock
        self._progress = progress  # alert id -> {status, device_count, counts}
        self._watched: dict[str, tuple[str, str]] = {}  # broadcast id -> (alert id, url)
        self._dirty: set[str] = set()
        self._sending: dict[str, asyncio.Task[None]] = {}

    def watch(self, alert_id: str, broadcast_id: str, url: str) -> None:
        self._watched[broadcast_id] = (alert_id, url)
        self._dirty.add(broadcast_id)

    async def run(self) -> None:
        async with self._bus.subscribe() as queue:
            flusher = asyncio.create_task(self._flush_every_second(), name="webhook-flush")
            try:
                while (event := await queue.get()) is not None:
                    broadcast_id = event.get("broadcast_id")
                    if event.get("type") == "delivery" and broadcast_id in self._watched:
                        self._dirty.add(broadcast_id)
            finally:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(_COALESCE_S)
            dirty, self._dirty = self._dirty, set()
            for broadcast_id in dirty:
                alert_id, url = self._watched[broadcast_id]
                progress = await asyncio.to_thread(self._progress, alert_id)
                finished = bool(progress["counts"]) and set(progress["counts"]) <= _TERMINAL
                if finished or progress["status"] != "active":
                    self._watched.pop(broadcast_id, None)
                body = {
                    "alert_id": alert_id,
                    "status": progress["status"],
                    "device_count": progress["device_count"],
                    "counts": progress["counts"],
                    "finished": finished,
                    "at": rfc3339(self._clock.now()),
                }
                previous = self._sending.pop(alert_id, None)
                if previous is not None:
                    previous.cancel()  # superseded by newer progress
                task = asyncio.create_task(self._deliver(alert_id, url, body), name=f"webhook-{alert_id}")
                self._sending[alert_id] = task
                task.add_done_callback(functools.partial(self._forget, alert_id))

    def _forget(self, alert_id: str, task: asyncio.Task[None]) -> None:
        if self._sending.get(alert_id) is task:
            del self._sending[alert_id]

    async def _deliver(self, alert_id: str, url: str, body: dict[str, Any]) -> None:
        secret = self._settings.webhook_secret
        if secret is None:
            return
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        async with httpx.AsyncClient(timeout=self._settings.webhook_timeout_s) as client:
            for attempt in range(self._settings.webhook_attempts):
                timestamp = int(self._clock.now().timestamp())
                headers = {
                    "Content-Type": "application/json",
                    "X-Wardcast-Signature": sign(secret.get_secret_value().encode(), timestamp, payload),
                    "X-Wardcast-Alert": alert_id,
                }
                try:
                    response = await client.post(url, content=payload, headers=headers)
                except httpx.HTTPError as error:
                    outcome = f"{type(error).__name__}: {error}"
                else:
                    if response.is_success:
                        WEBHOOK_CALLS.labels("ok").inc()
                        return
                    outcome = f"HTTP {response.status_code}"
                WEBHOOK_CALLS.labels("retried").inc()
                log.warning("alert webhook failed", alert_id=alert_id, attempt=attempt + 1, outcome=outcome)
                await asyncio.sleep(2**attempt)
        WEBHOOK_CALLS.labels("gave_up").inc()
        log.error("alert webhook given up", alert_id=alert_id, url=url)
