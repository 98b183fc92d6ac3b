"""Alerts for the IOC and operators: create, follow, cancel, cancel everything; and the audit log."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, HttpUrl

from controller.api.deps import Broadcaster, Canceller, Reader, RuntimeDep, require
from controller.api.errors import ApiError
from controller.domain.geo import GeoCircle, GeoError, GeoPolygon
from controller.domain.priority import SUB_PRIORITY_MAX, Priority, PriorityClass
from controller.services.alerts import AlertRequest, AlertTargets, template_list
from controller.services.auth import Action, Principal, Role
from controller.settings import AlertTemplate

router = APIRouter(tags=["alerts"])
# Who may follow every alert of the city: the roles that may send emergency alerts (admin, operator, ioc).
EmergencyBroadcaster = Annotated[Principal, Depends(require(Action.BROADCAST_EMERGENCY))]
# AlertRow.status (services.alerts.STATUSES).
AlertStatus = Literal["pending_approval", "active", "cancelled", "recorded", "superseded"]


class AlertTargetsIn(BaseModel):
    """Areas and devices by code, and/or a GeoJSON Polygon or a circle around a point."""

    model_config = ConfigDict(extra="forbid")

    areas: list[str] = Field(default_factory=list, max_length=1000)
    devices: list[str] = Field(default_factory=list, max_length=10000)
    polygon: dict[str, Any] | None = Field(default=None, description="a GeoJSON Polygon (lon, lat)")
    circle: dict[str, Any] | None = Field(default=None, description="{lat, lon, radius_m}")

    def parsed(self) -> AlertTargets:
        try:
            polygon = GeoPolygon.from_geojson(self.polygon, field="targets.polygon") if self.polygon else None
            circle = GeoCircle.from_dict(self.circle, field="targets.circle") if self.circle else None
        except GeoError as error:
            raise ApiError(400, "bad_request", error.field, error.detail) from error
        shapes = [
            (shape, name)
            for shape, name in ((polygon, "targets.polygon"), (circle, "targets.circle"))
            if shape
        ]
        if not (self.areas or self.devices or shapes):
            raise ApiError(400, "bad_request", "targets", "name areas, devices, a polygon or a circle")
        return AlertTargets(
            tuple(self.areas),
            tuple(self.devices),
            shapes=tuple(shape for shape, _ in shapes),
            shape_fields=tuple(name for _, name in shapes),
        )


class AlertIn(BaseModel):
    """Either the content and targets, or `template`: one of the city's pre-approved messages."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(default=None, max_length=100)
    headline: str | None = Field(default=None, min_length=1, max_length=200)
    text: str | None = Field(default=None, max_length=5000)
    media_id: str | None = None
    targets: AlertTargetsIn | None = None
    mode: Literal["live", "drill"] = "live"
    repeats: int = Field(default=1, ge=1, le=100)
    expires_at: AwareDatetime | None = None
    priority: PriorityClass = PriorityClass.EMERGENCY
    sub_priority: int = Field(default=0, ge=0, le=SUB_PRIORITY_MAX)
    webhook_url: HttpUrl | None = None


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="the same key and request again return the first alert instead of a second broadcast",
    ),
]


@router.post("/api/v1/alerts", status_code=status.HTTP_201_CREATED)
async def create_alert(
    body: AlertIn,
    response: Response,
    runtime: RuntimeDep,
    principal: Broadcaster,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Accept an alert and dispatch it at once: `201 {id, status, device_count, broadcast_id}` (`200`
    with the same alert when the Idempotency-Key and request were seen before)."""
    headline, text, targets = _content_of(body, runtime.settings.alerts.templates)
    request = AlertRequest(
        headline=headline,
        text=text,
        targets=targets,
        template=body.template,
        mode=body.mode,
        repeats=body.repeats,
        expires_at=body.expires_at,
        priority=Priority(body.priority, body.sub_priority),
        media_id=body.media_id,
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        idempotency_key=idempotency_key,
    )
    accepted = await runtime.alerts.create(request, principal)
    if not accepted.created:
        response.status_code = status.HTTP_200_OK
    return {
        "id": accepted.id,
        "status": accepted.status,
        "device_count": accepted.device_count,
        "broadcast_id": accepted.broadcast_id,
    }


_CAP_TYPES = ("application/cap+xml", "application/xml", "text/xml")
_MAX_CAP_BYTES = 1024 * 1024


@router.post(
    "/api/v1/alerts/cap",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": {"content": {"application/cap+xml": {"schema": {"type": "string"}}}}},
)
async def receive_cap(
    request: Request, response: Response, runtime: RuntimeDep, principal: Broadcaster
) -> dict[str, Any]:
    """An OASIS CAP 1.2 message (`application/cap+xml` or `application/xml`): Alert, Update or Cancel;
    status Actual plays live, Exercise and Test as a drill, System and Draft are only recorded. A message
    that breaks a CAP rule is refused with 400 naming the element (`alert/info[0]/area[1]/polygon[0]`)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _CAP_TYPES:
        raise ApiError(
            415, "unsupported_media_type", "Content-Type", f"send CAP as {' or '.join(_CAP_TYPES[:2])}"
        )
    body = await _bounded_body(request)
    outcome = await runtime.cap_intake.receive(body, principal)
    if not outcome.alert.created:
        response.status_code = status.HTTP_200_OK
    return {
        "id": outcome.alert.id,
        "status": outcome.alert.status,
        "device_count": outcome.alert.device_count,
        "broadcast_id": outcome.alert.broadcast_id,
        "cancelled": list(outcome.cancelled),
    }


async def _bounded_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_CAP_BYTES:
            raise ApiError(413, "too_large", "body", f"a CAP message may be at most {_MAX_CAP_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_of(body: AlertIn, templates: Mapping[str, AlertTemplate]) -> tuple[str, str, AlertTargets]:
    if body.template is None:
        if body.headline is None:
            raise ApiError(422, "invalid", "headline", "required (or name a template)")
        if body.targets is None:
            raise ApiError(422, "invalid", "targets", "required (or name a template)")
        return body.headline.strip(), (body.text or "").strip(), body.targets.parsed()
    template = templates.get(body.template)
    if template is None:
        known = ", ".join(sorted(templates)) or "none configured"
        raise ApiError(422, "invalid", "template", f"unknown template {body.template!r} (known: {known})")
    for name in ("headline", "text", "media_id", "targets"):
        if getattr(body, name) is not None:
            raise ApiError(
                422, "invalid", name, "comes from the template; a pre-approved message is sent as it is"
            )
    targets = AlertTargets(tuple(template.targets.areas), tuple(template.targets.devices))
    return template.headline, template.text, targets


@router.post("/api/v1/alerts/{alert_id}/approve")
async def approve_alert(alert_id: str, runtime: RuntimeDep, principal: Broadcaster) -> dict[str, Any]:
    """The second person (admin or operator, another key) lets a city-wide live alert play."""
    accepted = await runtime.alerts.approve(alert_id, principal)
    return {
        "id": accepted.id,
        "status": accepted.status,
        "device_count": accepted.device_count,
        "broadcast_id": accepted.broadcast_id,
    }


@router.get("/api/v1/alerts")
async def list_alerts(
    runtime: RuntimeDep,
    _principal: EmergencyBroadcaster,
    alert_status: Annotated[
        list[AlertStatus] | None,
        Query(alias="status", description="only alerts in these states (repeat the parameter for several)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[dict[str, Any]]:
    """The newest alerts first, each with who created (and approved) it by name, its counts per delivery
    state and `open`, the deliveries not ended yet: `?status=pending_approval` lists the alerts waiting
    for a second person, `?status=active` those sent. Admin, operator and ioc keys."""
    return await asyncio.to_thread(runtime.alerts.summaries, statuses=alert_status or (), limit=limit)


@router.get("/api/v1/alerts/templates")
async def list_alert_templates(runtime: RuntimeDep, _principal: EmergencyBroadcaster) -> list[dict[str, Any]]:
    """The city's pre-approved messages (`alerts.templates`): send one with `{"template": name}`."""
    return template_list(runtime.settings.alerts)


@router.get("/api/v1/alerts/{alert_id}")
async def get_alert(alert_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    """The alert, its counts per delivery state and each device's delivery with its events."""
    result: dict[str, Any] = await asyncio.to_thread(runtime.alerts.describe, alert_id, principal)
    return result


@router.post("/api/v1/alerts/cancel-all")
async def cancel_all_alerts(runtime: RuntimeDep, principal: Canceller) -> dict[str, Any]:
    """Stop every active alert on every device (all-clear): operator, admin or ioc."""
    return await runtime.alerts.cancel_all(principal)


@router.post("/api/v1/alerts/{alert_id}/cancel")
async def cancel_alert(alert_id: str, runtime: RuntimeDep, principal: Canceller) -> dict[str, Any]:
    stopped = await runtime.alerts.cancel(alert_id, principal)
    return {"id": alert_id, "status": "cancelled", "deliveries_stopped": stopped}


@router.get("/api/v1/audit")
async def read_audit(
    runtime: RuntimeDep,
    principal: Reader,
    action: str | None = None,
    subject: str | None = None,
    start: Annotated[AwareDatetime | None, Query(alias="from")] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to")] = None,
    after_id: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[dict[str, Any]]:
    """Who did what, when, in the order it happened. Admins and operators see everything; an IOC key
    sees its own entries."""
    key_id = _audit_scope(principal)
    return await asyncio.to_thread(
        runtime.audit.read,
        start=start,
        end=end,
        action=action,
        subject=subject,
        key_id=key_id,
        after_id=after_id,
        limit=limit,
    )


def _audit_scope(principal: Principal) -> str | None:
    if principal.role in {Role.ADMIN, Role.OPERATOR}:
        return None
    if principal.role is Role.IOC:
        return principal.key_id
    raise ApiError(403, "forbidden", None, f"role {principal.role} may not read the audit log")
