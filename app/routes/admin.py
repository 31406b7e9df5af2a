"""Operator routes, mounted only when `BLINK_ADMIN_TOKEN` is set, and checked against it."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app.bundle import BundleError, point_latest, promote
from app.errors import BlinkError, InvalidParameter
from app.registry import ModelRegistry
from app.reload import ReloadOutcome
from app.schemas import ErrorResponse, ReloadResult

router = APIRouter(prefix="/admin", tags=["admin"])
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No or wrong admin token"},
    404: {"model": ErrorResponse, "description": "No such model is served"},
}


class Unauthorized(BlinkError):
    status, code = 401, "unauthorized"
    headers = {"www-authenticate": "Bearer"}  # noqa: RUF012


def check_token(request: Request) -> None:
    expected = request.app.state.settings.admin_token
    sent = request.headers.get("authorization", "")
    scheme, _, token = sent.partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("send the admin token as 'Authorization: Bearer <token>'")


@router.post(
    "/reload",
    response_model=ReloadResult,
    summary="Load the version a model's `latest` names now, in the worker that answers",
    responses={
        **ADMIN_ERRORS,
        422: {"model": ReloadResult, "description": "It failed; the serving version stays"},
    },
)
async def reload(
    request: Request,
    model: Annotated[
        str | None, Query(description="The model to reload; omitted, the default model")
    ] = None,
) -> JSONResponse:
    check_token(request)
    registry: ModelRegistry = request.app.state.registry
    if model is not None:
        host = registry.host(model)
    elif registry.default is not None:
        host = registry.default
    else:
        raise InvalidParameter(registry.no_default_message("name it with ?model=NAME"))
    return reload_answer(host.name, await host.reload("admin"))


def reload_answer(name: str, outcome: ReloadOutcome) -> JSONResponse:
    """The outcome, 422 when the version did not come to serve."""
    failed = outcome.result not in ("success", "unchanged")
    return JSONResponse({"model": name, **outcome.as_dict()}, status_code=422 if failed else 200)


@router.post(
    "/promote",
    response_model=ReloadResult,
    summary="Move a model's `latest` to a version and serve it (rollback: the previous one)",
    responses={
        **ADMIN_ERRORS,
        422: {"model": ErrorResponse, "description": "No such version, or it failed to serve"},
    },
)
async def promote_version(
    request: Request,
    model: Annotated[str, Query(description="The model")],
    version: Annotated[str, Query(description="The version directory to serve")],
) -> JSONResponse:
    """The version is checked (manifest, hashes) before `latest` moves, and loaded and warmed
    up in the worker that answers; if it fails there, `latest` moves back. With several workers
    the others follow through the watcher (BLINK_WATCH_INTERVAL_S) or SIGHUP."""
    check_token(request)
    registry: ModelRegistry = request.app.state.registry
    host = registry.host(model)
    try:
        previous = await asyncio.to_thread(promote, host.source, version)
    except BundleError as exc:
        raise InvalidParameter(str(exc)) from exc
    outcome = await host.reload("promote")
    if outcome.result not in ("success", "unchanged") and previous:
        # the version that serves stays the one `latest` names
        await asyncio.to_thread(point_latest, host.source, previous)
    return reload_answer(host.name, outcome)
