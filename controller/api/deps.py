"""Annotated dependencies shared by the routers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.api.errors import ApiError
from controller.console.session import CSRF_HEADER, SessionCodec, csrf_ok, session_user
from controller.services.auth import Action, Principal, Role
from controller.services.users import principal_of

if TYPE_CHECKING:
    from controller.app import Runtime

# Alert calls that change something are rate-limited for every key; every call of an `ioc` key is
# (alerts.rate_limit_per_minute).
_ALERT_PATHS = ("/api/v1/alerts",)
_bearer = HTTPBearer(auto_error=False, description="An API key made with `wardcast apikey create`")
# Methods that change nothing: a console session needs no CSRF header for them.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    runtime = get_runtime(request)
    if credentials is None:
        principal = await _console_user(request)
    elif credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "Authorization", "send Authorization: Bearer <token>")
    else:
        by_key = await runtime.authenticate(credentials.credentials)
        if by_key is None:
            raise ApiError(401, "unauthorized", "Authorization", "unknown or revoked token")
        principal = by_key
    # Read by the audit middleware once the response is known (every call of an IOC key is audited).
    request.state.principal = principal
    # Reading alerts (the emergency panel follows them every few seconds) spends no one's budget for
    # sending them; an IOC key's reads count as every call of it does.
    sends_alerts = request.url.path.startswith(_ALERT_PATHS) and request.method not in _SAFE_METHODS
    if principal.role is Role.IOC or sends_alerts:
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


async def _console_user(request: Request) -> Principal:
    """The web console calls the same API as every client, as the signed-in user: its session cookie
    (HttpOnly, SameSite=Strict) and, for a call that changes something, the session's CSRF token in
    the X-CSRF-Token header."""
    codec: SessionCodec | None = getattr(request.app.state, "console_sessions", None)
    session = codec.read(request) if codec is not None else None
    user = await asyncio.to_thread(session_user, get_runtime(request).engine, session)
    if user is None or session is None:
        raise ApiError(401, "unauthorized", "Authorization", "send Authorization: Bearer <token>")
    if request.method not in _SAFE_METHODS and not csrf_ok(session, request.headers.get(CSRF_HEADER)):
        raise ApiError(403, "forbidden", CSRF_HEADER, "missing or wrong CSRF token for this session")
    return principal_of(user)


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
