"""Every error answers `{error, field, detail}` with the 4xx/5xx code that fits."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.domain.areas import AreaError
from controller.services.errors import ServiceError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        field: str | None,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.field = field
        self.detail = detail
        self.headers = headers


def error_body(error: str, field: str | None, detail: str) -> dict[str, str | None]:
    return {"error": error, "field": field, "detail": detail}


def _field_from_location(location: tuple[int | str, ...]) -> str:
    parts = [part for part in location if part not in ("body", "query", "path", "header")]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


_STATUS_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.error, exc.field, exc.detail), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        body = {**error_body(_STATUS_NAMES.get(exc.status, "invalid"), exc.field, exc.detail), **exc.extra}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(AreaError)
    async def _area_error(_request: Request, exc: AreaError) -> JSONResponse:
        body = exc.as_response()
        status = (
            404 if body["error"] == "unknown_area" else 409 if "already exists" in exc.first.message else 422
        )
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        field = _field_from_location(tuple(first["loc"]))
        if first.get("type") == "json_invalid":
            field = "body"
        detail = "; ".join(f"{_field_from_location(tuple(e['loc']))}: {e['msg']}" for e in errors)
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("bad_request", field, detail), status_code=400)
        return JSONResponse(error_body("invalid", field, detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(_STATUS_NAMES.get(exc.status_code, "error"), None, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )
