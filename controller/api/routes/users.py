"""Console users (issue 7): list, create, change role/wards, set a new password, lift a lock-out,
delete. Admins only (`manage_keys`: who may reach the controller). Password hashes never leave."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field

from controller.api.deps import KeyManager, RuntimeDep
from controller.api.errors import ApiError
from controller.domain.clock import rfc3339
from controller.services.auth import Principal
from controller.services.users import (
    USER_KEY_PREFIX,
    UserError,
    create_user,
    delete_user,
    list_users,
    update_user,
)
from controller.store.models import UserRow

router = APIRouter(prefix="/api/v1/users", tags=["users"])

ConsoleRole = Literal["admin", "operator", "ward_staff", "technician"]
UserId = Annotated[str, Path(min_length=1, max_length=36)]


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    role: ConsoleRole
    wards: list[str] = Field(
        default_factory=list, max_length=200, description="ward_staff: exactly one; technician: any"
    )
    password: str = Field(min_length=1, max_length=200)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: ConsoleRole | None = None
    wards: list[str] | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, min_length=1, max_length=200)
    unlock: bool = Field(default=False, description="lift a lock-out after failed sign-ins")


class UserOut(BaseModel):
    id: str
    username: str
    role: str
    wards: list[str]
    locked_until: str | None
    failed_attempts: int
    created_at: str


def _out(row: UserRow) -> UserOut:
    return UserOut(
        id=row.id,
        username=row.username,
        role=row.role,
        wards=[row.ward_code] if row.ward_code else list(row.wards or ()),
        locked_until=rfc3339(row.locked_until) if row.locked_until else None,
        failed_attempts=row.failed_attempts,
        created_at=rfc3339(row.created_at),
    )


def _api_error(error: UserError) -> ApiError:
    if error.field == "id":
        return ApiError(404, "not_found", "id", error.detail)
    if error.field == "username" and "exists" in error.detail:
        return ApiError(409, "conflict", "username", error.detail)
    # The service says "ward"; the body's field is "wards".
    return ApiError(422, "invalid", "wards" if error.field == "ward" else error.field, error.detail)


def _refuse_self(principal: Principal, user_id: str, what: str) -> None:
    if principal.key_id == USER_KEY_PREFIX + user_id:
        raise ApiError(409, "conflict", "id", f"you cannot {what} yourself: ask another admin")


@router.get("", response_model=list[UserOut])
async def get_users(runtime: RuntimeDep, _principal: KeyManager) -> list[UserOut]:
    rows = await asyncio.to_thread(list_users, runtime.engine)
    return [_out(row) for row in rows]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def post_user(body: UserIn, runtime: RuntimeDep, _principal: KeyManager) -> UserOut:
    try:
        row = await asyncio.to_thread(
            lambda: create_user(
                runtime.engine,
                username=body.username,
                password=body.password,
                role=body.role,
                wards=body.wards,
                now=runtime.clock.now(),
            )
        )
    except UserError as error:
        raise _api_error(error) from error
    return _out(row)


@router.patch("/{user_id}", response_model=UserOut)
async def patch_user(user_id: UserId, body: UserPatch, runtime: RuntimeDep, principal: KeyManager) -> UserOut:
    if body.role is not None or body.wards is not None:
        _refuse_self(principal, user_id, "change the role or wards of")
    try:
        row = await asyncio.to_thread(
            lambda: update_user(
                runtime.engine,
                user_id,
                role=body.role,
                wards=body.wards,
                password=body.password,
                unlock=body.unlock,
            )
        )
    except UserError as error:
        raise _api_error(error) from error
    return _out(row)


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_user(user_id: UserId, runtime: RuntimeDep, principal: KeyManager) -> Response:
    _refuse_self(principal, user_id, "delete")
    try:
        await asyncio.to_thread(delete_user, runtime.engine, user_id)
    except UserError as error:
        raise _api_error(error) from error
    return Response(status_code=status.HTTP_204_NO_CONTENT)
