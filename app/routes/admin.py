"""Operator routes, mounted only when `BLINK_ADMIN_TOKEN` is set, and checked against it."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.errors import BlinkError
from app.schemas import ErrorResponse, ReloadResult

router = APIRouter(prefix="/admin", tags=["admin"])


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
    summary="Load the version `latest` names now, in the worker that answers",
    responses={
        401: {"model": ErrorResponse, "description": "No or wrong admin token"},
        422: {"model": ReloadResult, "description": "It failed; the serving version stays"},
    },
)
async def reload(request: Request) -> JSONResponse:
    check_token(request)
    outcome = await request.app.state.host.reload("admin")
    failed = outcome.result not in ("success", "unchanged")
    return JSONResponse(outcome.as_dict(), status_code=422 if failed else 200)
