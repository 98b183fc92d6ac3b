"""The operators' emergency panel (/emergency): send an alert, as a drill or live, from the city's
pre-approved templates or typed in; approve another operator's city-wide live alert; follow and cancel the
active alerts; cancel everything. The page renders what does not change while it is open (templates, the
area tree, the drill wording); its script does everything else through the alerts API."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from controller.console.dashboard import build_dashboard
from controller.console.i18n import Translator, requested_language
from controller.console.pages import Viewer, render, runtime_of, viewer
from controller.services.alerts import template_list
from controller.services.auth import Action

if TYPE_CHECKING:
    from controller.app import Runtime
    from controller.services.auth import Principal

router = APIRouter(include_in_schema=False)

# Delivery states, in the order the panel shows their counts (controller/domain/deliveries.py).
DELIVERY_STATES = (
    "queued",
    "sent",
    "delivered",
    "playing",
    "completed",
    "interrupted",
    "failed",
    "expired",
    "cancelled",
)
ALERT_STATUSES = ("pending_approval", "active", "cancelled", "recorded", "superseded")
# What the operator types to confirm a live alert (the catalogue key of the words).
CONFIRM_WORDS_KEY = "emergency.confirm.words"


@dataclass(frozen=True, slots=True)
class TargetArea:
    code: str
    name: str
    kind: str
    depth: int
    ancestors: tuple[str, ...]
    devices: tuple[tuple[str, str], ...]  # (id, name) of the area's own devices


def _target_tree(runtime: Runtime, principal: Principal) -> list[TargetArea]:
    """The areas (depth-first) with their devices; blocking (database)."""
    board = build_dashboard(runtime, principal)
    path: list[str] = []
    found: list[TargetArea] = []
    for area in board.areas:
        del path[area.depth :]
        found.append(
            TargetArea(
                area.code,
                area.name,
                area.kind,
                area.depth,
                tuple(path),
                tuple((device.id, device.name) for device in area.devices if device.kind != "sensor"),
            )
        )
        path.append(area.code)
    return found


def _labels(t: Translator) -> dict[str, Any]:
    """The texts the page's script writes (from the catalogue)."""
    return {
        "states": {state: t(f"emergency.state.{state}") for state in DELIVERY_STATES},
        "state_order": list(DELIVERY_STATES),  # (tojson sorts the keys of `states`)
        "statuses": {status: t(f"emergency.status.{status}") for status in ALERT_STATUSES},
        "modes": {"drill": t("emergency.mode.drill"), "live": t("emergency.mode.live")},
        "send": {"drill": t("emergency.send.drill"), "live": t("emergency.send.live")},
        "approve": t("emergency.approve"),
        "cancel": t("emergency.cancel_one"),
        "created_by": t("emergency.created_by"),
        "approved_by": t("emergency.approved_by"),
        "devices": t("emergency.devices_count"),
        "none_pending": t("emergency.pending.none"),
        "none_active": t("emergency.active.none"),
        "none_history": t("emergency.history.none"),
        "sent_active": t("emergency.result.active"),
        "sent_pending": t("emergency.result.pending"),
        "approved": t("emergency.result.approved"),
        "cancelled": t("emergency.result.cancelled"),
        "cancelled_all": t("emergency.result.cancelled_all"),
        "no_targets": t("emergency.targets.none"),
        "template_in_use": t("emergency.template.in_use"),
        "yours": t("emergency.pending.yours"),
        "confirm_words": t(CONFIRM_WORDS_KEY),
        "expires": t("emergency.expires"),
    }


@router.get("/emergency")
async def emergency_panel(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.BROADCAST_EMERGENCY))]
) -> Response:
    runtime = runtime_of(request)
    settings = runtime.settings.alerts
    tree = await asyncio.to_thread(_target_tree, runtime, who.principal)
    names = {area.code: area.name for area in tree} | {
        device_id: name for area in tree for device_id, name in area.devices
    }
    templates = [
        {
            **template,
            "target_names": [
                names.get(code, code)
                for code in (*template["targets"]["areas"], *template["targets"]["devices"])
            ],
        }
        for template in template_list(settings)
    ]
    t = Translator(requested_language(request)[0])
    return render(
        request,
        "emergency.html",
        {
            "tree": tree,
            "templates": templates,
            "drill_announcement": settings.drill_announcement,
            "max_repeats": settings.max_repeats,
            "default_expiry_min": max(1, round(settings.default_expiry_s / 60)),
            "page_data": {
                "labels": _labels(t),
                "me": who.principal.key_id,
                "timezone": runtime.settings.timezone,
                "language": t.language,
                "names": names,
                "areas": [
                    {"code": a.code, "ancestors": list(a.ancestors), "devices": [d for d, _ in a.devices]}
                    for a in tree
                ],
                "templates": {template["name"]: template for template in templates},
            },
        },
        who.session,
        viewer=who,
    )
