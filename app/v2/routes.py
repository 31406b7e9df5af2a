"""The Open Inference Protocol's REST routes under /v2, with errors as `{"error": "message"}`."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from app.admission import client_timeout_s
from app.asgi import Headers, check_length, header_list, read_body, send_response
from app.errors import BlinkError, Overloaded
from app.outcomes import Outcome, serve_request
from app.registry import ModelRegistry
from app.service import ModelService, workers_not_ready
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


def service_for(registry: ModelRegistry, name: str) -> ModelService:
    """The model's serving version; 404 (in V2's shape, by V2Route) if it is not served."""
    return registry.host(name).current


def model_for(request: Request, name: str, version: str | None = None) -> ServedModel:
    model = served_model(service_for(request.app.state.registry, name))
    model.check(name, version)
    return model


@router.get("", response_model=ServerMetadata, summary="Server metadata and extensions")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "blink", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is alive")
async def server_live() -> dict[str, Any]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="The model is loaded and warmed up",
    responses={503: {"model": ProtocolError}},
)
async def server_ready(request: Request) -> dict[str, Any]:
    reason = request.app.state.registry.not_ready_reason()
    if reason is not None:
        raise V2Error(503, reason, {"retry-after": "1"})
    return {"ready": True}


def check_ready(service: ModelService) -> None:
    reason = service.not_ready_reason()
    if reason is not None:  # a failed warm-up will not pass by retrying
        retry = {} if service.warm_up_error is not None else {"retry-after": "1"}
        raise V2Error(503, reason, retry)


@router.get("/models/stats", summary="Statistics of every model (statistics extension)")
async def all_statistics(request: Request) -> dict[str, Any]:
    hosts = sorted(request.app.state.registry.hosts.items())
    models = [served_model(host.current) for _, host in hosts]
    return {"model_stats": [model.stats.as_dict(model.name, model.version) for model in models]}


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=ERRORS,
    summary="Model metadata: its inputs and outputs",
)
async def model_metadata(
    request: Request, model_name: str, model_version: str = ""
) -> dict[str, Any]:
    return model_for(request, model_name, model_version).metadata


@router.get("/models/{model_name}/ready", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    responses=ERRORS,
    summary="The model can take requests",
)
async def model_ready(request: Request, model_name: str, model_version: str = "") -> dict[str, Any]:
    model = model_for(request, model_name, model_version)
    registry = request.app.state.registry
    check_ready(service_for(registry, model_name))
    others = workers_not_ready(registry.settings, registry.metrics.multiprocess)
    if others is not None:  # any worker may answer: ready means every worker is
        raise V2Error(503, others, {"retry-after": "1"})
    return {"name": model.name, "ready": True}


@router.get("/models/{model_name}/config", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/config",
    responses=ERRORS,
    summary="Triton's model configuration (model_configuration extension)",
)
async def model_config(
    request: Request, model_name: str, model_version: str = ""
) -> dict[str, Any]:
    return model_for(request, model_name, model_version).config


@router.get("/models/{model_name}/stats", responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}/stats",
    responses=ERRORS,
    summary="Per-stage counts and durations in Triton's shape (statistics extension)",
)
async def model_statistics(
    request: Request, model_name: str, model_version: str = ""
) -> dict[str, Any]:
    model = model_for(request, model_name, model_version)
    return {"model_stats": [model.stats.as_dict(model.name, model.version)]}


INFER_DOC: dict[str, Any] = {
    "summary": "Run inference (JSON tensors, or the binary tensor data extension)",
    "description": (
        "Send one input: the model's FP32 tensor `[N, C, H, W]`, preprocessed as the manifest "
        "says, or `image`, a BYTES tensor `[N]` of encoded images decoded as /classify does. "
        "With binary data, the JSON header's length goes in `Inference-Header-Content-Length` "
        "and the tensors' bytes follow it. Bodies may be gzip or deflate (`Content-Encoding`). "
        "`probabilities` are the served scores (calibrated when the bundle is); with "
        "`parameters.coverage`, the `prediction_set` output holds each image's conformal "
        "prediction set as a JSON object, one BYTES element per image."
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
    return ServedBelow()


class ServedBelow(Response):
    """Answers with the same ASGI handler BlinkApp calls, from FastAPI's route."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = scope["app"].state.registry
        name = scope["path_params"]["model_name"]
        host = registry.hosts.get(name)
        if host is None:
            await unknown_model(registry, name, send)
            return
        await serve_infer(host.answering(scope, version_named(scope)), scope, receive, send)


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def infer_asgi(registry: ModelRegistry, scope: Scope, receive: Receive, send: Send) -> bool:
    """The hot path below FastAPI's middleware, as /classify is; False if not an infer path."""
    match = INFER_PATH.fullmatch(scope["path"])
    if match is None:
        return False
    host = registry.hosts.get(match[1])
    if host is None:
        await unknown_model(registry, match[1], send)
    else:
        await serve_infer(host.answering(scope, match[2]), scope, receive, send)
    return True


def version_named(scope: Scope) -> str | None:
    return scope["path_params"].get("model_version") or None


async def unknown_model(registry: ModelRegistry, name: str, send: Send) -> None:
    """404 for a model that is not served (not counted: only served models have series)."""
    error = V2Error(404, registry.unknown_message(name))
    await send_response(send, 404, error_body(error), JSON, [])


def model_names(scope: Scope) -> tuple[str, str]:
    """The model name and version the request addresses (version "" for the latest)."""
    params = scope.get("path_params")
    if params and "model_name" in params:  # FastAPI has matched the route
        return params["model_name"], params.get("model_version", "")
    match = INFER_PATH.search(scope["path"])
    assert match is not None  # infer_asgi matched it
    return match[1], match[2] or ""


async def answer(
    service: ModelService,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict[bytes, bytes],
    request_id: bytes,
    started: float,
) -> None:
    arrival = time.monotonic()
    model = served_model(service)
    model.check(*model_names(scope))
    try:
        timeout_s = client_timeout_s(headers, service.settings.request_timeout_ms / 1000)
        service.admission.check(1, timeout_s)  # before the body is read: refusing is cheap
        result = await run(headers, receive, service, model, arrival, timeout_s)
        status, content_type, body, extra = respond(result, headers.get(b"accept-encoding"))
        extra.append((b"x-request-id", request_id))
        await send_response(send, status, body, content_type, extra)
    except BaseException:
        model.stats.record_failure(time.perf_counter() - started)
        raise
    model.stats.record_success(
        result.images, time.perf_counter() - started, result.times, result.results
    )


def error_answer(outcome: Outcome, exc: BaseException) -> tuple[int, bytes, Headers]:
    """`{"error": "message"}` with the status the protocol uses; overload answers pre-encoded."""
    if isinstance(exc, Overloaded):
        return (outcome.status, *overload_answer(exc.reason, exc.retry_after))
    if isinstance(exc, V2Error):
        error = exc
    elif isinstance(exc, BlinkError):
        error = V2Error.from_blink(exc)
    else:
        error = V2Error(outcome.status, "internal error")
    status = outcome.status if isinstance(exc, Overloaded) else error.status
    return status, error_body(error), header_list(error.headers)


serve_infer = functools.partial(serve_request, INFER_ROUTE, answer, error_answer)


@functools.cache
def overload_answer(reason: str, retry_after: int) -> tuple[bytes, Headers]:
    error = V2Error.from_blink(Overloaded.because(reason, retry_after))
    return error_body(error), header_list(error.headers)


async def run(
    headers: dict[bytes, bytes],
    receive: Receive,
    service: ModelService,
    model: ServedModel,
    arrival: float,
    timeout_s: float,
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
    return await infer(service, model, body, length, arrival, receive, timeout_s)


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


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def not_in_protocol(request: Request, path: str) -> Response:
    """Anything else under /v2 (shared memory, repository, trace...) answers in V2's shape."""
    routes = cast("list[APIRoute]", router.routes)  # every route here is a V2Route
    allowed = {
        method
        for route in routes
        if route.path != "/v2/{path:path}" and route.matches(request.scope)[0] == Match.PARTIAL
        # starlette declares `methods` optional; an APIRoute always sets it
        for method in route.methods  # type: ignore[union-attr]
    }
    if allowed:  # RFC 9110: a 405 lists the methods the resource has
        allow = ", ".join(sorted(allowed))
        raise V2Error(405, f"{request.method} is not allowed on /v2/{path}", {"allow": allow})
    raise V2Error(404, f"/v2/{path} is not part of this server's API (extensions: {EXTENSIONS})")
