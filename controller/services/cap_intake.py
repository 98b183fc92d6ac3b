"""CAP 1.2 messages turned into alerts (issue 4): Alert, Update, Cancel; Actual, Exercise, Test, System,
Draft.

| CAP | what happens |
|---|---|
| status Actual | broadcast live |
| status Exercise, Test | broadcast as a drill (prefix tone, spoken notice, mode `drill` on the wire) |
| status System, Draft; msgType Ack, Error | recorded, nothing played |
| msgType Alert | a new alert from the preferred `<info>` (Vietnamese first) |
| msgType Update | a new alert replacing the one `<references>` names (stopped, marked superseded) |
| msgType Cancel | every alert its `<references>` name is stopped |

A drill can never be updated into a live alert.

Targets: each `<area>`'s polygons and circles (speakers by coordinates) and its `<geocode>`s whose valueName
is one of `alerts.geocode_value_names` (our area codes). Priority: `controller.domain.cap.priority_for`.
The same message (sender, identifier) sent again returns the alert it created.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import datetime

from controller.domain.cap import (
    CapAlert,
    CapError,
    CapInfo,
    MsgType,
    parse_cap,
    preferred_info,
    priority_for,
)
from controller.domain.clock import Clock
from controller.domain.geo import GeoCircle, GeoError, GeoPolygon, GeoShape
from controller.domain.priority import Priority
from controller.services.alerts import (
    CANCELLED,
    RECORDED,
    AcceptedAlert,
    AlertError,
    AlertRequest,
    AlertService,
    AlertTargets,
    CapOrigin,
)
from controller.services.auth import Principal
from controller.settings import AlertSettings


@dataclass(frozen=True, slots=True)
class CapOutcome:
    alert: AcceptedAlert
    cancelled: tuple[str, ...] = ()  # the alerts a Cancel (or an Update) stopped


class CapIntake:
    def __init__(self, alerts: AlertService, settings: AlertSettings, clock: Clock) -> None:
        self._alerts = alerts
        self._settings = settings
        self._clock = clock

    async def receive(self, data: bytes, principal: Principal) -> CapOutcome:
        try:
            message = parse_cap(data)
        except CapError as error:
            raise AlertError(error.element, error.detail, status=400) from error
        xml = data.decode("utf-8", errors="replace")
        earlier = await asyncio.to_thread(self._alerts.by_cap_reference, message.sender, message.identifier)
        if earlier is not None:
            if earlier.cap_xml is not None and _same(earlier.cap_xml, xml):
                return CapOutcome(
                    AcceptedAlert(
                        earlier.id, earlier.status, earlier.device_count, False, earlier.broadcast_id
                    )
                )
            raise AlertError(
                "alert/identifier",
                f"{message.sender} already sent a different message {message.identifier}; "
                "CAP identifiers are unique per sender",
                status=409,
            )
        mode = message.status.broadcast_mode
        if message.msg_type in {MsgType.ACK, MsgType.ERROR} or mode is None:
            return CapOutcome(await self._record(message, xml, principal, RECORDED))
        if message.msg_type is MsgType.CANCEL:
            cancelled = await self._cancel_referenced(message, principal)
            return CapOutcome(await self._record(message, xml, principal, CANCELLED), cancelled)
        replaced = await self._referenced(message) if message.msg_type is MsgType.UPDATE else []
        if mode == "live" and any(row_mode == "drill" for _, row_mode, _ in replaced):
            raise AlertError("alert/status", "a drill can never be updated into a live alert", status=400)
        request = self._request(message, mode, xml, replaced[0][0] if replaced else None)
        accepted = await self._alerts.create(request, principal)
        stopped: list[str] = []
        for alert_id, _, status in replaced:
            if status == "active":
                await self._alerts.cancel(alert_id, principal, reason="updated")
            await asyncio.to_thread(self._alerts.mark_superseded, alert_id, accepted.id, principal)
            stopped.append(alert_id)
        return CapOutcome(accepted, tuple(stopped))

    # -- building the alert ------------------------------------------------------------------------
    def _request(self, message: CapAlert, mode: str, xml: str, replaces: str | None) -> AlertRequest:
        info = preferred_info(message)
        if info is None:
            raise AlertError("alert/info", "an Alert or Update needs an <info> to broadcast", status=400)
        index = message.infos.index(info)
        path = f"alert/info[{index}]"
        now = self._clock.now()
        if info.expires is not None and info.expires <= now:
            raise AlertError(
                f"{path}/expires", f"the alert expired at {info.expires.isoformat()}", status=400
            )
        priority = priority_for(info)
        headline = (info.headline or info.event).strip()[:200]
        text = " ".join(part.strip() for part in (info.description, info.instruction) if part)[:5000]
        return AlertRequest(
            headline=headline,
            text=text,
            targets=self._targets(info, path),
            mode=mode,
            expires_at=info.expires,
            priority=Priority(priority.priority_class, priority.sub_priority),
            language=info.language,
            source="cap",
            cap=CapOrigin(message.sender, message.identifier, xml, replaces),
        )

    def _targets(self, info: CapInfo, path: str) -> AlertTargets:
        codes: list[str] = []
        shapes: list[GeoShape] = []
        fields: list[str] = []
        wanted = set(self._settings.geocode_value_names)
        for area_index, area in enumerate(info.areas):
            area_path = f"{path}/area[{area_index}]"
            try:
                for number, points in enumerate(area.polygons):
                    field = f"{area_path}/polygon[{number}]"
                    shapes.append(GeoPolygon.from_cap(points, field=field))
                    fields.append(field)
                for number, circle in enumerate(area.circles):
                    field = f"{area_path}/circle[{number}]"
                    shapes.append(GeoCircle.from_cap(circle, field=field))
                    fields.append(field)
            except GeoError as error:
                raise AlertError(error.field, error.detail, status=400) from error
            codes.extend(
                pair.value for pair in area.geocodes if pair.value_name in wanted and pair.value not in codes
            )
        if not codes and not shapes:
            names = ", ".join(sorted(wanted))
            raise AlertError(
                f"{path}/area",
                f"no <area> with a polygon, a circle or a geocode named one of {names}",
                status=400,
            )
        return AlertTargets(areas=tuple(codes), shapes=tuple(shapes), shape_fields=tuple(fields))

    # -- references ---------------------------------------------------------------------------------
    async def _referenced(self, message: CapAlert) -> list[tuple[str, str, str]]:
        """(alert id, mode, status) of every alert `<references>` names that we hold."""
        found: list[tuple[str, str, str]] = []
        for reference in message.references:
            row = await asyncio.to_thread(
                self._alerts.by_cap_reference, reference.sender, reference.identifier
            )
            if row is not None:
                found.append((row.id, row.mode, row.status))
        if not found:
            raise AlertError("alert/references", "names no alert this controller received", status=400)
        return found

    async def _cancel_referenced(self, message: CapAlert, principal: Principal) -> tuple[str, ...]:
        cancelled: list[str] = []
        for alert_id, _, _ in await self._referenced(message):
            await self._alerts.cancel(alert_id, principal, reason="cap_cancel")
            cancelled.append(alert_id)
        return tuple(cancelled)

    async def _record(self, message: CapAlert, xml: str, principal: Principal, status: str) -> AcceptedAlert:
        info = preferred_info(message)
        headline = (
            (info.headline or info.event) if info is not None else f"{message.msg_type} {message.status}"
        )
        request = AlertRequest(
            headline=headline[:200],
            text=(info.description or "") if info is not None else (message.note or ""),
            targets=AlertTargets(),
            mode=message.status.broadcast_mode or "none",
            expires_at=_expiry(info),
            source="cap",
            cap=CapOrigin(message.sender, message.identifier, xml),
        )
        return await asyncio.to_thread(self._alerts.record_only, request, principal, status=status)


def _expiry(info: CapInfo | None) -> datetime | None:
    return info.expires if info is not None else None


def _same(stored: str, received: str) -> bool:
    return hashlib.sha256(stored.encode()).digest() == hashlib.sha256(received.encode()).digest()
