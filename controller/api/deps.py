"""Annotated dependencies shared by the routers."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.api.errors import ApiError
from controller.services.auth import Action, Principal, Role

if TYPE_CHECKING:
    from controller.app import Runtime

# Alert calls are rate-limited for every key; every call of an `ioc` key is (alerts.rate_limit_per_minute).
_ALERT_PATHS = ("/api/v1/alerts",)
_bearer = HTTPBearer(auto_error=False, description="An API key made with `wardcast apikey create`")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "Authorization", "send Authorization: Bearer <token>")
    runtime = get_runtime(request)
    principal = await runtime.authenticate(credentials.credentials)
    if principal is None:
        raise ApiError(401, "unauthorized", "Authorization", "unknown or revoked token")
    # Read by the audit middleware once the response is known (every call of an IOC key is audited).
    request.state.principal = principal
    if principal.role is Role.IOC or request.url.path.startswith(_ALERT_PATHS):
        retry_after = runtime.rate_limiter.admit(principal.key_id, runtime.clock.now())
        if retry_after is not None:
            raise ApiError(
                429,
                "too_many_requests",
                "Authorization",
                f"more than {runtime.settings.alerts.rate_limit_per_minute} calls a minute with this key; "
                f"retry in {math.ceil(retry_after)} s",
                headers={"Retry-After": str(math.ceil(retry_after))},
            )
    return principal


def require(action: Action) -> Callable[..., Coroutine[Any, Any, Principal]]:
    async def _check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.may(action):
            raise ApiError(
                403, "forbidden", None, f"role {principal.role} may not {action.value.replace('_', ' ')}"
            )
        return principal

    return _check


Reader = Annotated[Principal, Depends(require(Action.READ))]
AreaManager = Annotated[Principal, Depends(require(Action.MANAGE_AREAS))]
DeviceManager = Annotated[Principal, Depends(require(Action.MANAGE_DEVICES))]
MediaUploader = Annotated[Principal, Depends(require(Action.UPLOAD_MEDIA))]
Broadcaster = Annotated[Principal, Depends(require(Action.BROADCAST))]
Canceller = Annotated[Principal, Depends(require(Action.CANCEL))]
RuleManager = Annotated[Principal, Depends(require(Action.MANAGE_RULES))]
Provisioner = Annotated[Principal, Depends(require(Action.PROVISION))]
KeyManager = Annotated[Principal, Depends(require(Action.MANAGE_KEYS))]
FirmwareManager = Annotated[Principal, Depends(require(Action.MANAGE_FIRMWARE))]
