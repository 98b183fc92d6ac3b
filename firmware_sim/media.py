"""Fetching, verifying and caching the audio a `play` command points at (docs/protocol.md §1.8)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import soundfile

from firmware_sim.wire import MediaRef

logger = logging.getLogger(__name__)

_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")
_HTTP_OK = 200
_HTTP_PARTIAL_CONTENT = 206


class MediaFetchError(Exception):
    """The media cannot be played; `detail` is what the `failed` report says."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class VerifiedMedia:
    sha256: str
    size: int
    duration_s: float


@dataclass(slots=True)
class MediaCache:
    """What one device (or, with a shared cache, one process) has already fetched and verified.

    Only the verdict is kept, not the bytes: a real device stores the file, but thousands of
    simulated ones in a process cannot each hold a copy, and playback is simulated anyway.
    """

    verified: dict[str, VerifiedMedia] = field(default_factory=dict)
    in_flight: dict[str, asyncio.Task[VerifiedMedia]] = field(default_factory=dict)


class MediaFetcher:
    """One HTTP connection pool per process, used by every simulated device in it."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        concurrency: int = 8,
        shared_cache: bool = False,
        retry_window_s: float = 120.0,
        retry_delay_s: float = 0.2,
        max_retry_delay_s: float = 5.0,
    ) -> None:
        self._http = http
        # httpcore rescans its whole queue of waiting requests whenever a connection frees, which
        # turns thousands of simultaneous fetches quadratic; waiting here keeps its queue short.
        self._gate = asyncio.Semaphore(concurrency)
        self._shared = MediaCache() if shared_cache else None
        # A real receiver keeps retrying while the controller restarts; the command's own expiry
        # (enforced by the speaker) ends a wait that would be pointless.
        self._retry_window_s = retry_window_s
        self._retry_delay_s = retry_delay_s
        self._max_retry_delay_s = max_retry_delay_s
        self._downloads: set[asyncio.Task[VerifiedMedia]] = set()
        self.requests_sent = 0

    def cached(self, media: MediaRef, device_cache: MediaCache) -> VerifiedMedia | None:
        """The verified media if no network is needed: most plays of a broadcast take this path."""
        found = device_cache.verified.get(media.sha256)
        if found is None and self._shared is not None:
            found = self._shared.verified.get(media.sha256)
            if found is not None:
                device_cache.verified[media.sha256] = found
        return found

    async def fetch(self, media: MediaRef, device_cache: MediaCache) -> VerifiedMedia:
        """The verified media, from the device's cache, the process cache or the network."""
        cached = device_cache.verified.get(media.sha256)
        if cached is not None:
            return cached
        scope = self._shared if self._shared is not None else device_cache
        verified = await self._once(scope, media.sha256, lambda: self._download(media))
        device_cache.verified[media.sha256] = verified
        return verified

    async def aclose(self) -> None:
        for task in list(self._downloads):
            task.cancel()
        for task in list(self._downloads):
            with contextlib.suppress(asyncio.CancelledError, MediaFetchError):
                await task

    async def _once(
        self, scope: MediaCache, sha256: str, download: Callable[[], Coroutine[Any, Any, VerifiedMedia]]
    ) -> VerifiedMedia:
        cached = scope.verified.get(sha256)
        if cached is not None:
            return cached
        task = scope.in_flight.get(sha256)
        if task is None:
            task = asyncio.get_running_loop().create_task(download())
            scope.in_flight[sha256] = task
            self._downloads.add(task)

            def settle(done: asyncio.Task[VerifiedMedia]) -> None:
                self._downloads.discard(done)
                scope.in_flight.pop(sha256, None)
                if not done.cancelled() and done.exception() is None:
                    scope.verified[sha256] = done.result()

            task.add_done_callback(settle)
        # Several commands may wait on one download; a stop cancelling one of them must not cancel
        # the download the others wait on.
        return await asyncio.shield(task)

    async def _download(self, media: MediaRef) -> VerifiedMedia:
        body = bytearray()
        attempt = 0
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._retry_window_s
        delay_s = self._retry_delay_s
        while True:
            attempt += 1
            try:
                await self._receive(media.url, body)
                break
            except httpx.TransportError as error:
                # A dropped transfer resumes with a Range request (§1.8) instead of starting over.
                if loop.time() + delay_s > give_up_at:
                    raise MediaFetchError(f"fetch failed after {attempt} attempts: {error!r}") from error
                logger.info("media %s: attempt %d failed (%r), retrying", media.url, attempt, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._max_retry_delay_s)
            except httpx.HTTPError as error:
                raise MediaFetchError(f"fetch failed: {error!r}") from error
            except httpx.InvalidURL as error:
                raise MediaFetchError(f"fetch failed: {error}") from error
        if hashlib.sha256(body).hexdigest() != media.sha256:
            raise MediaFetchError("sha256 mismatch")
        return VerifiedMedia(sha256=media.sha256, size=len(body), duration_s=_audio_duration(body))

    async def _receive(self, url: str, body: bytearray) -> None:
        """Appends the rest of the resource to `body`, or all of it when the server ignores Range."""
        headers = {"Range": f"bytes={len(body)}-"} if body else {}
        self.requests_sent += 1
        async with self._gate, self._http.stream("GET", url, headers=headers) as response:
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
                raise MediaFetchError(f"fetch failed: HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                body += chunk


def _audio_duration(body: bytearray) -> float:
    try:
        info = soundfile.info(io.BytesIO(body))
    except (RuntimeError, TypeError, ValueError) as error:
        raise MediaFetchError(f"audio could not be decoded: {error}") from error
    duration = float(info.duration)
    if duration <= 0:
        raise MediaFetchError("audio could not be decoded: it holds no samples")
    return duration
