"""The Open Inference Protocol's REST routes under /v2, with errors as `{"error": "message"}`."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from app.asgi import check_length, read_body, send_response
from app.batching import ClientGone
from app.errors import BlinkError, NotReady, Overloaded
from app.service import ModelService
from app.v2.codec import compress, decompress
from app.v2.errors import V2Error, error_body, error_response
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
CLIENT_GONE = 499  # nginx's "client closed request": counted, never sent
JSON, OCTET_STREAM = b"application/json", b"application/octet-stream"


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
    reason = service.not_ready_reason()
    if reason is not None:  # a failed warm-up will not pass by retrying
        retry = {} if service.warm_up_error is not None else {"retry-after": "1"}
        raise V2Error(503, reason, retry)


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
    # Reached only where BlinkApp does not route the request first (e.g. mounted under a path).
    service = request.app.state.service
    headers = dict(request.scope["headers"])
    status, content_type, body, extra = await answer_infer(
        service, headers, request.receive, model_name, model_version
    )
    response = Response(body, status, media_type=content_type.decode())
    response.raw_headers.extend(extra)
    return response


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def infer_asgi(service: ModelService, scope: Scope, receive: Receive, send: Send) -> bool:
    """The hot path below FastAPI's middleware, as /classify is; False if not an infer path."""
    match = INFER_PATH.fullmatch(scope["path"])
    if match is None:
        return False
    name, version = match.groups()
    headers = dict(scope["headers"])  # lower-cased names; a repeated header keeps its last value
    status, content_type, body, extra = await answer_infer(
        service, headers, receive, name, version or ""
    )
    if status != CLIENT_GONE:  # nobody is there to read an answer
        await send_response(send, status, body, content_type, extra)
    return True


async def answer_infer(
    service: ModelService,
    headers: dict[bytes, bytes],
    receive: Receive,
    model_name: str,
    model_version: str,
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """Status, content type, body and extra headers of one infer request."""
    arrival, started = time.monotonic(), time.perf_counter()
    metrics = service.metrics
    model = served_model(service)
    status, addressed = 200, False
    service.request_started()
    try:
        model.check(model_name, model_version)
        addressed = True
        answer = await run(headers, receive, service, model, arrival)
        response = respond(answer, headers.get(b"accept-encoding"))
        model.stats.record_success(
            answer.images, time.perf_counter() - started, answer.times, answer.results
        )
        return response
    except ClientGone:
        status = CLIENT_GONE
        metrics.rejections.labels("disconnected").inc()
        return status, JSON, b"", []
    except (V2Error, BlinkError) as exc:
        reason = REJECTION_REASONS.get(type(exc))
        if reason is not None:
            metrics.rejections.labels(reason).inc()
        error = exc if isinstance(exc, V2Error) else V2Error.from_blink(exc)
        status = error.status
        return error_parts(error)
    except Exception:  # a bug, not the client's doing: answer 500 and keep serving
        status = 500
        log.exception("v2 infer failed")
        return error_parts(V2Error(500, "internal error"))
    finally:
        elapsed = time.perf_counter() - started
        service.request_finished()
        metrics.request_answered(INFER_ROUTE, status, elapsed)
        if addressed and status != 200:
            model.stats.record_failure(elapsed)


async def run(
    headers: dict[bytes, bytes],
    receive: Receive,
    service: ModelService,
    model: ServedModel,
    arrival: float,
) -> Answer:
    limit = service.settings.max_body_bytes
    check_length(headers, limit)
    encoding = headers.get(b"content-encoding", b"").decode("latin-1")
    body = decompress(await read_body(receive, limit), encoding, limit)
    header_length = headers.get(b"inference-header-content-length")
    if header_length is not None and not header_length.strip().isdigit():
        raise V2Error(
            400,
            f"Inference-Header-Content-Length {header_length.decode('latin-1')!r} is not a number",
        )
    length = None if header_length is None else int(header_length)
    return await infer(service, model, body, length, arrival, receive)


def respond(
    answer: Answer, accept_encoding: bytes | None
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    body, headers = answer.body, []
    if answer.header_length is not None:
        headers.append((b"inference-header-content-length", b"%d" % answer.header_length))
    if accept_encoding:
        body, encoding = compress(body, accept_encoding.decode("latin-1"))
        if encoding is not None:
            headers.append((b"content-encoding", encoding.encode()))
    binary = answer.header_length is not None
    return 200, OCTET_STREAM if binary else JSON, body, headers


def error_parts(exc: V2Error) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    return exc.status, JSON, error_body(exc), extra


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def not_in_protocol(request: Request, path: str) -> Response:
    """Anything else under /v2 (shared memory, repository, trace...) answers in V2's shape."""
    allowed = {
        method
        for route in router.routes
        if route.path != "/v2/{path:path}" and route.matches(request.scope)[0] == Match.PARTIAL
        for method in route.methods
    }
    if allowed:  # RFC 9110: a 405 lists the methods the resource has
        allow = ", ".join(sorted(allowed))
        raise V2Error(405, f"{request.method} is not allowed on /v2/{path}", {"allow": allow})
    raise V2Error(404, f"/v2/{path} is not part of this server's API (extensions: {EXTENSIONS})")
