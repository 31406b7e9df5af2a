"""The Open Inference Protocol's REST routes under /v2, with errors as `{"error": "message"}`."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from app.batching import ClientGone
from app.errors import BlinkError, NotReady, Overloaded
from app.service import ModelService
from app.v2.codec import compress, decompress
from app.v2.errors import V2Error, error_response
from app.v2.infer import Answer, infer
from app.v2.model import ServedModel, served_model
from app.v2.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ProtocolError,
    ServerMetadata,
    inline_schema,
)

log = logging.getLogger("blink.v2")

EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
INFER_ROUTE = "/v2/models/{name}/infer"  # one label for the request metrics, whatever the name
REJECTION_REASONS = {Overloaded: "queue_full", NotReady: "not_ready"}  # the batcher counts expiry


class V2Route(APIRoute):
    """Answers errors in the protocol's shape, whatever route raised them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except V2Error as exc:
                return error_response(exc)
            except BlinkError as exc:
                return error_response(V2Error.from_blink(exc))

        return handle


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ProtocolError, "description": "Unknown model or version"},
}
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=V2Route)


def model_for(request: Request, name: str, version: str | None = None) -> ServedModel:
    model = served_model(request.app.state.service)
    model.check(name, version)
    return model


@router.get("", response_model=ServerMetadata, summary="Server metadata and extensions")
async def server_metadata(request: Request) -> dict:
    return {"name": "blink", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is alive")
async def server_live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="The model is loaded and warmed up",
    responses={503: {"model": ProtocolError}},
)
async def server_ready(request: Request) -> dict:
    check_ready(request.app.state.service)
    return {"ready": True}


def check_ready(service: ModelService) -> None:
    if service.warm_up_error is not None:
        raise V2Error(503, f"warm-up failed: {service.warm_up_error}")
    if not service.ready:
        raise V2Error(503, "model is warming up", {"retry-after": "1"})


@router.get("/models/stats", summary="Statistics of every model (statistics extension)")
async def all_statistics(request: Request) -> dict:
    model = served_model(request.app.state.service)
    return {"model_stats": [model.stats.as_dict(model.name, model.version)]}


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    summary="Model metadata: its inputs and outputs",
)
async def model_metadata(request: Request, model_name: str, model_version: str = "") -> dict:
    return model_for(request, model_name, model_version).metadata


@router.get("/models/{model_name}/ready", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    responses=ERRORS,
    summary="The model can take requests",
)
async def model_ready(request: Request, model_name: str, model_version: str = "") -> dict:
    model = model_for(request, model_name, model_version)
    check_ready(request.app.state.service)
    return {"name": model.name, "ready": True}


@router.get("/models/{model_name}/config", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/config",
    responses=ERRORS,
    summary="Triton's model configuration (model_configuration extension)",
)
async def model_config(request: Request, model_name: str, model_version: str = "") -> dict:
    return model_for(request, model_name, model_version).config


@router.get("/models/{model_name}/stats", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/stats",
    responses=ERRORS,
    summary="Per-stage counts and durations in Triton's shape (statistics extension)",
)
async def model_statistics(request: Request, model_name: str, model_version: str = "") -> dict:
    model = model_for(request, model_name, model_version)
    return {"model_stats": [model.stats.as_dict(model.name, model.version)]}


INFER_DOC: dict[str, Any] = {
    "summary": "Run inference (JSON tensors, or the binary tensor data extension)",
    "description": (
        "Send one input: the model's FP32 tensor `[N, C, H, W]`, preprocessed as the manifest "
        "says, or `image`, a BYTES tensor `[N]` of encoded images decoded as /classify does. "
        "With binary data, the JSON header's length goes in `Inference-Header-Content-Length` "
        "and the tensors' bytes follow it. Bodies may be gzip or deflate (`Content-Encoding`)."
    ),
    "response_model": InferenceResponse,
    "responses": {
        400: {"model": ProtocolError, "description": "Malformed request, wrong shape or type"},
        **ERRORS,
        413: {"model": ProtocolError, "description": "Body over the limit"},
        503: {"model": ProtocolError, "description": "Queue full or not ready (Retry-After)"},
        504: {"model": ProtocolError, "description": "The deadline passed before it ran"},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(InferenceRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


@router.post("/models/{model_name}/infer", **INFER_DOC)
@router.post("/models/{model_name}/versions/{model_version}/infer", **INFER_DOC)
async def model_infer(request: Request, model_name: str, model_version: str = "") -> Response:
    return await answer_infer(request.app.state.service, request, model_name, model_version)


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def infer_asgi(service: ModelService, scope: Scope, receive: Receive, send: Send) -> bool:
    """The hot path below FastAPI's middleware, as /classify is; False if not an infer path."""
    match = INFER_PATH.fullmatch(scope["path"])
    if match is None:
        return False
    name, version = match.groups()
    response = await answer_infer(service, Request(scope, receive), name, version or "")
    await response(scope, receive, send)
    return True


async def answer_infer(
    service: ModelService, request: Request, model_name: str, model_version: str
) -> Response:
    arrival, started = time.monotonic(), time.perf_counter()
    metrics = service.metrics
    model = served_model(service)
    status, addressed = 200, False
    service.request_started()
    try:
        model.check(model_name, model_version)
        addressed = True
        answer = await run(request, service, model, arrival)
        response = respond(answer, request.headers.get("accept-encoding"))
        model.stats.record_success(
            answer.images, time.perf_counter() - started, answer.times, answer.results
        )
        return response
    except ClientGone:
        status = 499  # nginx's "client closed request": nobody reads this answer
        metrics.rejections.labels("disconnected").inc()
        return Response(status_code=status)
    except (V2Error, BlinkError) as exc:
        reason = REJECTION_REASONS.get(type(exc))
        if reason is not None:
            metrics.rejections.labels(reason).inc()
        error = exc if isinstance(exc, V2Error) else V2Error.from_blink(exc)
        status = error.status
        return error_response(error)
    except Exception:  # a bug, not the client's doing: answer 500 and keep serving
        status = 500
        log.exception("v2 infer failed")
        return error_response(V2Error(500, "internal error"))
    finally:
        elapsed = time.perf_counter() - started
        service.request_finished()
        metrics.request_answered(INFER_ROUTE, status, elapsed)
        if addressed and status != 200:
            model.stats.record_failure(elapsed)


async def run(request: Request, service: ModelService, model: ServedModel, arrival: float):
    headers = request.headers
    limit = service.settings.max_body_bytes
    body = decompress(await read_body(request, limit), headers.get("content-encoding", ""), limit)
    header_length = headers.get("inference-header-content-length")
    if header_length is not None and not header_length.strip().isdigit():
        raise V2Error(400, f"Inference-Header-Content-Length {header_length!r} is not a number")
    length = None if header_length is None else int(header_length)
    return await infer(service, model, body, length, arrival, request.receive)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise V2Error(413, f"body is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise V2Error(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientGone() from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def respond(answer: Answer, accept_encoding: str | None) -> Response:
    body, headers = answer.body, {}
    if answer.header_length is not None:
        headers["inference-header-content-length"] = str(answer.header_length)
    if accept_encoding:
        body, encoding = compress(body, accept_encoding)
        if encoding is not None:
            headers["content-encoding"] = encoding
    binary = answer.header_length is not None
    media_type = "application/octet-stream" if binary else "application/json"
    return Response(body, 200, headers, media_type=media_type)


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def not_in_protocol(request: Request, path: str) -> Response:
    """Anything else under /v2 (shared memory, repository, trace...) answers in V2's shape."""
    for route in router.routes:
        if route.path != "/v2/{path:path}" and route.matches(request.scope)[0] == Match.PARTIAL:
            raise V2Error(405, f"{request.method} is not allowed on /v2/{path}")
    raise V2Error(404, f"/v2/{path} is not part of this server's API (extensions: {EXTENSIONS})")
