"""The technician's pages (issue 7): devices (list, register, CSV import), one device (properties,
availability, operations, credentials, decommissioning), claims awaiting approval, firmware rollouts.

Read-only data is rendered here through the very functions the API routes run (so the ward confinement
is the API's own); every action is a call of the JSON API from static/tech.js as the signed-in user."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from controller.api.errors import ApiError
from controller.api.routes.devices import DeviceOut, get_device, get_device_availability, list_devices
from controller.api.routes.firmware import list_images
from controller.api.routes.provisioning import pending_claims
from controller.console.dashboard import device_status
from controller.console.i18n import catalogue, requested_language
from controller.console.pages import Viewer, areas_in_view, local_zone, render, runtime_of, viewer
from controller.domain.operations import KINDS_FOR
from controller.services.auth import Action, Principal
from controller.services.errors import ServiceError

if TYPE_CHECKING:
    from controller.app import Runtime

router = APIRouter(include_in_schema=False)

# The kinds the registration form offers: an MQTT device needs nothing more than its area. Wired zones,
# Modbus, CoAP and serial devices need their link settings: the API and the CLI take those.
FORM_KINDS = ("speaker", "led_screen", "sensor")
_ROLLOUTS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class AreaOption:
    code: str
    name: str
    depth: int

    @property
    def label(self) -> str:
        return "\u00a0\u00a0" * self.depth + self.name


def area_options(runtime: Runtime, principal: Principal) -> list[AreaOption]:
    """The areas a user may put devices in (their wards' subtrees; everything for the city), parents
    before children."""
    return [AreaOption(area.code, area.name, depth) for area, depth in areas_in_view(runtime, principal)]


def local_time(runtime: Runtime, stamp: str | None) -> str:
    """An RFC 3339 instant as people read it in the city: dd/mm/yyyy HH:MM:SS, local time."""
    if not stamp:
        return "—"
    return datetime.fromisoformat(stamp).astimezone(local_zone(runtime)).strftime("%d/%m/%Y %H:%M:%S")


def script_labels(request: Request) -> dict[str, str]:
    """The texts static/tech.js writes (every `tech.*` key, and the device statuses), in the page's
    language."""
    entries = catalogue(requested_language(request)[0])
    return {key: text for key, text in entries.items() if key.startswith(("tech.", "status."))}


def _page_context(request: Request, runtime: Runtime, **values: Any) -> dict[str, Any]:
    return {
        "labels": script_labels(request),
        "timezone": runtime.settings.timezone,
        "when": lambda stamp: local_time(runtime, stamp),
        **values,
    }


def _status(runtime: Runtime, device: DeviceOut) -> str:
    if device.decommissioned_at is not None:
        return "decommissioned"
    playing = runtime.tracker.playing_on(device.id) is not None
    return device_status(online=device.online, playing=playing).value


@router.get("/devices")
async def devices_page(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.PROVISION, Action.MANAGE_DEVICES))]
) -> Response:
    runtime = runtime_of(request)
    devices = await list_devices(runtime=runtime, principal=who.principal, area=None, kind=None, online=None)
    areas = await asyncio.to_thread(area_options, runtime, who.principal)
    names = {area.code: area.name for area in areas}
    rows = [
        {
            "device": device,
            "status": _status(runtime, device),
            "area_name": names.get(device.area, device.area),
        }
        for device in devices
    ]
    kinds = sorted({device.kind for device in devices} | set(FORM_KINDS))
    context = _page_context(
        request,
        runtime,
        rows=rows,
        areas=areas,
        kinds=kinds,
        form_kinds=FORM_KINDS,
        may_provision=who.may(Action.PROVISION),
        may_register=who.may(Action.MANAGE_DEVICES),
    )
    return render(request, "tech_devices.html", context, who.session, viewer=who)


@router.get("/devices/{device_id}")
async def device_page(
    device_id: str,
    request: Request,
    who: Annotated[Viewer, Depends(viewer(Action.PROVISION, Action.MANAGE_DEVICES))],
) -> Response:
    runtime = runtime_of(request)
    try:
        device = await get_device(device_id=device_id, runtime=runtime, principal=who.principal)
        availability = await get_device_availability(
            device_id=device_id, runtime=runtime, principal=who.principal, start=None, end=None, limit=1000
        )
    except (ApiError, ServiceError):
        # Another ward's device is as unknown to this user as one that does not exist.
        context = {"device_id": device_id}
        return render(request, "tech_device_missing.html", context, who.session, viewer=who, status_code=404)
    telemetry = (
        await asyncio.to_thread(runtime.telemetry.store.latest, device.id) if device.kind == "sensor" else []
    )
    names = {area.code: area.name for area in await asyncio.to_thread(area_options, runtime, who.principal)}
    context = _page_context(
        request,
        runtime,
        device=device,
        status=_status(runtime, device),
        area_name=names.get(device.area, device.area),
        transitions=list(reversed(availability["transitions"])),
        telemetry=telemetry,
        operations={op: device.kind in kinds for op, kinds in KINDS_FOR.items()},
        may_provision=who.may(Action.PROVISION),
        may_operate=who.may(Action.MANAGE_DEVICES) and device.decommissioned_at is None,
    )
    return render(request, "tech_device.html", context, who.session, viewer=who)


@router.get("/claims")
async def claims_page(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.PROVISION))]
) -> Response:
    runtime = runtime_of(request)
    claims = await pending_claims(runtime=runtime, _principal=who.principal)
    areas = await asyncio.to_thread(area_options, runtime, who.principal)
    context = _page_context(request, runtime, claims=claims, areas=areas)
    return render(request, "tech_claims.html", context, who.session, viewer=who)


async def _rollouts(runtime: Runtime) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        listed = runtime.rollouts.list_rollouts()[:_ROLLOUTS_SHOWN]
        return [runtime.rollouts.describe(rollout["id"]) for rollout in listed]

    return await asyncio.to_thread(read)


@router.get("/rollouts")
async def rollouts_page(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.PROVISION, Action.MANAGE_FIRMWARE))]
) -> Response:
    runtime = runtime_of(request)
    images = await list_images(runtime=runtime, _principal=who.principal)
    areas = await asyncio.to_thread(area_options, runtime, who.principal)
    context = _page_context(
        request,
        runtime,
        images=images,
        rollouts=await _rollouts(runtime),
        areas=areas,
        may_manage=who.may(Action.MANAGE_FIRMWARE),
    )
    return render(request, "tech_rollouts.html", context, who.session, viewer=who)


@router.get("/console/rollouts")
async def rollouts_fragment(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.PROVISION, Action.MANAGE_FIRMWARE))]
) -> Response:
    """The rollouts with their progress alone, which the page refreshes (htmx) every few seconds."""
    runtime = runtime_of(request)
    context = _page_context(
        request, runtime, rollouts=await _rollouts(runtime), may_manage=who.may(Action.MANAGE_FIRMWARE)
    )
    return render(request, "_tech_rollouts.html", context, who.session, viewer=who)
