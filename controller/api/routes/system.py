from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from controller.api.deps import Reader, RuntimeDep

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    """200 when the database answers and the broker link is up; 503 naming what is down otherwise."""
    checks = await runtime.health()
    healthy = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", **checks}, status_code=200 if healthy else 503
    )


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/command-key")
async def command_key(runtime: RuntimeDep, _principal: Reader) -> dict[str, str]:
    """The public half of the key that signs every command and programme (docs/protocol.md §1.15):
    devices verify with it, so a provisioning bundle carries it. `public_key` is the raw 32-byte
    Ed25519 key in base64; `key_id` is what devices compare with a signature's `kid`."""
    signer = runtime.signer
    return {
        "alg": "ed25519",
        "key_id": signer.key_id,
        "public_key": signer.public_key,
        "public_key_pem": signer.public_key_pem,
    }


@router.get("/api/v1/events")
async def events(request: Request, runtime: RuntimeDep, principal: Reader) -> EventSourceResponse:
    """Server-sent events: `delivery` and `device` changes, as JSON in the data field."""
    visible_devices = await asyncio.to_thread(runtime.visible_device_ids, principal)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        async with runtime.bus.subscribe() as queue:
            yield {"event": "ready", "data": "{}"}
            while True:
                event = await queue.get()
                if event is None or await request.is_disconnected():
                    return
                if visible_devices is not None and event.get("device_id") not in visible_devices:
                    continue
                yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}

    return EventSourceResponse(stream(), ping=15)
