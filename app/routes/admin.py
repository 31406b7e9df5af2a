"""Operator routes, mounted only when `BLINK_ADMIN_TOKEN` is set, and checked against it."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app.bundle import BundleError, point_latest, promote
from app.candidate import CANARY, SHADOW
from app.candidate_spec import parse_fraction
from app.errors import BlinkError, InvalidParameter
from app.registry import ModelRegistry
from app.reload import ModelHost, ReloadOutcome
from app.schemas import CandidateState, ErrorResponse, ReloadResult

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
    host = named_host(request, model)
    return reload_answer(host.name, await host.reload("admin"))


def named_host(request: Request, model: str | None) -> ModelHost:
    """The model named, or the default model."""
    registry: ModelRegistry = request.app.state.registry
    if model is not None:
        return registry.host(model)
    if registry.default is not None:
        return registry.default
    raise InvalidParameter(registry.no_default_message("name it with ?model=NAME"))


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


ModelQuery = Annotated[str | None, Query(description="The model; omitted, the default model")]
VersionQuery = Annotated[
    str, Query(description="A version directory of the model, or the path of another bundle")
]
FractionQuery = Annotated[
    str, Query(description="Share of requests, above 0 and at most 1", examples=["0.1"])
]
CANDIDATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ADMIN_ERRORS,
    422: {"model": ErrorResponse, "description": "No such bundle, or it failed to load"},
}


async def start_candidate(
    request: Request, role: str, model: str | None, version: str, fraction: str
) -> dict[str, Any]:
    check_token(request)
    host = named_host(request, model)
    try:
        share = parse_fraction(fraction)
    except ValueError as exc:
        raise InvalidParameter(f"fraction: {exc}") from exc
    try:
        await host.start_candidate(role, version, share)
    except BlinkError:
        raise
    except Exception as exc:  # BundleError, the engine's: it cannot serve, nothing changed
        raise InvalidParameter(f"the {role} did not start: {exc}") from exc
    return candidate_state(host)


async def stop_candidate(request: Request, role: str, model: str | None) -> dict[str, Any]:
    check_token(request)
    host = named_host(request, model)
    await host.stop_candidate(role)
    return candidate_state(host)


def candidate_state(host: ModelHost) -> dict[str, Any]:
    return {"model": host.name, **host.candidates()}


@router.post(
    "/shadow",
    response_model=CandidateState,
    summary="Mirror a fraction of a model's requests to a candidate version (in the worker "
    "that answers)",
    responses=CANDIDATE_RESPONSES,
)
async def start_shadow(
    request: Request,
    version: VersionQuery,
    model: ModelQuery = None,
    fraction: FractionQuery = "1",
) -> dict[str, Any]:
    """The candidate is loaded and warmed up first; it replaces any shadow running."""
    return await start_candidate(request, SHADOW, model, version, fraction)


@router.delete(
    "/shadow",
    response_model=CandidateState,
    summary="Stop a model's shadow",
    responses=ADMIN_ERRORS,
)
async def stop_shadow(request: Request, model: ModelQuery = None) -> dict[str, Any]:
    return await stop_candidate(request, SHADOW, model)


@router.post(
    "/canary",
    response_model=CandidateState,
    summary="Answer a fraction of a model's requests by a candidate version (in the worker "
    "that answers)",
    responses=CANDIDATE_RESPONSES,
)
async def start_canary(
    request: Request,
    version: VersionQuery,
    fraction: FractionQuery,
    model: ModelQuery = None,
) -> dict[str, Any]:
    """The candidate is loaded and warmed up first; it replaces any canary running."""
    return await start_candidate(request, CANARY, model, version, fraction)


@router.delete(
    "/canary",
    response_model=CandidateState,
    summary="Stop a model's canary: the serving version answers every request",
    responses=ADMIN_ERRORS,
)
async def stop_canary(request: Request, model: ModelQuery = None) -> dict[str, Any]:
    return await stop_candidate(request, CANARY, model)
