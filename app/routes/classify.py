"""POST /classify: the hot path, written against ASGI directly.

For a small CNN, HTTP and Python overhead, not ONNX Runtime, bound throughput, so this route
skips FastAPI's dependency and validation layer (see bench/ for the measured difference).
Its OpenAPI description is written by hand in app/openapi.py.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from app.admission import client_timeout_s
from app.asgi import Hasher, Headers, check_length, header_list, read_body, send_response
from app.cache import ResponseCache, cache_bypassed, new_digest
from app.disconnect import disconnect_probe, wait_all
from app.errors import (
    BadImage,
    BlinkError,
    InvalidParameter,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_body,
)
from app.outcomes import Outcome, serve_request
from app.postprocess import prediction_set, top_k
from app.registry import ModelRegistry
from app.service import ModelService, coverage_threshold

ROUTE = "/classify"  # the request metrics' route label, for /models/{name}/classify too
DEFAULT_TOP_K = 5
RAW_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/gif",
        "application/octet-stream",
        "",  # no Content-Type: sniff the bytes
    }
)
RAW_CONTENT_TYPES = frozenset(t.encode() for t in RAW_MEDIA_TYPES)
MULTIPART = "multipart/form-data"
# A plain decimal: float() would also take "nan", "1e-1", " 0.9" and "0_9".
DECIMAL = re.compile(r"[0-9]{0,3}(?:\.[0-9]{1,17})?")
# What `coverage` asks for: the level and the score threshold the bundle recorded for it.
Conformal = tuple[float, float]
HIT, MISS, COALESCED, BYPASS = "hit", "miss", "coalesced", "bypass"  # app.metrics.CACHE_RESULTS
HIT_HEADER, MISS_HEADER = HIT.encode(), MISS.encode()
COALESCED_HEADER, BYPASS_HEADER = COALESCED.encode(), BYPASS.encode()


async def answer(
    service: ModelService,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict[bytes, bytes],
    request_id: bytes,
    started: float,
) -> None:
    k, conformal = parse_query(scope["query_string"], service)
    timeout_s = client_timeout_s(headers, service.settings.request_timeout_ms / 1000)
    deadline = time.monotonic() + timeout_s
    service.admission.check(1, timeout_s)  # before reading the body: a refusal costs almost nothing
    cache = service.cache
    if cache is None:
        data = await read_image(scope, receive, headers, service.settings.max_body_bytes)
        body, stages = await infer_answer(service, data, k, conformal, deadline, receive)
        extra = [(b"x-request-id", request_id)]
    else:
        hasher = new_digest()  # fed as the body arrives
        data = await read_image(scope, receive, headers, service.settings.max_body_bytes, hasher)
        body, stages, cached = await cached_answer(
            cache, service, headers, data, hasher.digest(), k, conformal, deadline, receive
        )
        extra = [(b"x-request-id", request_id), (b"x-cache", cached)]
    total = (time.perf_counter() - started) * 1000
    extra.append((b"server-timing", b"%s, total;dur=%.3f" % (stages, total)))
    await send_response(send, 200, body, b"application/json", extra)


async def infer_answer(
    service: ModelService,
    data: bytes,
    k: int,
    conformal: Conformal | None,
    deadline: float,
    receive: Receive,
) -> tuple[bytes, bytes]:
    """Decode, batch and postprocess: the answer's JSON and its Server-Timing stages."""
    tensor, decode_s = await service.preprocess(data)
    probe = disconnect_probe(receive)
    pending = service.submit(tensor, deadline, probe)
    (result,) = await wait_all(service.batcher, [pending], receive, probe)
    service.answered.append(result.outputs)
    shadow = service.shadow
    if shadow is not None:  # a copy to the shadow version, which the answer does not wait for
        shadow.offer(service, tensor, data, result)
    outputs = result.outputs[0]
    reply: dict[str, Any] = {
        "model": service.model_fields,
        "predictions": top_k(
            outputs,
            k,
            service.labels,
            probabilities=service.probabilities,
            temperature=service.temperature,
        ),
    }
    if conformal is not None:
        reply["prediction_set"] = prediction_set(
            outputs,
            *conformal,
            service.labels,
            probabilities=service.probabilities,
            temperature=service.temperature,
        )
    stages = b"decode;dur=%.3f, queue;dur=%.3f, inference;dur=%.3f" % (
        decode_s * 1000,
        result.queue_s * 1000,
        result.inference_s * 1000,
    )
    return orjson.dumps(reply), stages


async def cached_answer(
    cache: ResponseCache,
    service: ModelService,
    headers: dict[bytes, bytes],
    data: bytes,
    digest: bytes,
    k: int,
    conformal: Conformal | None,
    deadline: float,
    receive: Receive,
) -> tuple[bytes, bytes, bytes]:
    """The answer through the response cache: (JSON, Server-Timing stages, X-Cache).
    `digest` is the image's SHA-256."""
    skip_lookup, no_store = cache_bypassed(headers.get(b"cache-control"))
    counts = service.metrics.cache
    looked_up = time.perf_counter()
    key = (*service.cache_scope, k, conformal, digest)
    if skip_lookup:
        counts[BYPASS].inc()
        fresh, stages = await infer_answer(service, data, k, conformal, deadline, receive)
        if not no_store:
            cache.put(key, fresh)
        return fresh, stages, BYPASS_HEADER
    hit = cache.get(key)
    if hit is not None:
        counts[HIT].inc()
        return hit, b"cache;dur=%.3f" % ((time.perf_counter() - looked_up) * 1000), HIT_HEADER
    waiting = cache.claim(key)
    if waiting is not None:  # an identical request is computing it
        shared = await cache.wait(waiting, deadline - time.monotonic())
        if shared is not None:
            counts[COALESCED].inc()
            stages = b"cache;dur=%.3f" % ((time.perf_counter() - looked_up) * 1000)
            return shared, stages, COALESCED_HEADER
        # it failed: this one computes its own, unshared
        fresh, stages = await infer_answer(service, data, k, conformal, deadline, receive)
        cache.put(key, fresh)
        counts[MISS].inc()
        return fresh, stages, MISS_HEADER
    try:
        fresh, stages = await infer_answer(service, data, k, conformal, deadline, receive)
    except BaseException:
        cache.settle(key, None)
        raise
    cache.settle(key, fresh)
    counts[MISS].inc()
    return fresh, stages, MISS_HEADER


def error_answer(outcome: Outcome, exc: BaseException) -> tuple[int, bytes, Headers]:
    """`{"error": {"code", "message"}}`; overload answers come pre-encoded."""
    if isinstance(exc, Overloaded):
        return (outcome.status, *overload_answer(exc.reason, exc.retry_after))
    if isinstance(exc, BlinkError):
        return outcome.status, exc.body(), header_list(exc.headers)
    return outcome.status, error_body(outcome.code, "internal error"), []


@functools.cache
def overload_answer(reason: str, retry_after: int) -> tuple[bytes, Headers]:
    """One encoding per (limit, Retry-After): refusing under load must cost next to nothing."""
    exc = Overloaded.because(reason, retry_after)
    return exc.body(), header_list(exc.headers)


def parse_query(query_string: bytes, service: ModelService) -> tuple[int, Conformal | None]:
    """`top_k` and `coverage` from one parse of the query string; none: 5 classes, no set."""
    num_classes = service.num_classes
    if not query_string:
        return min(DEFAULT_TOP_K, num_classes), None
    # keep_blank_values: "top_k=" is a bad value, not an absent one
    query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    top_k_values = query.get("top_k")
    if top_k_values is None:
        k = min(DEFAULT_TOP_K, num_classes)
    else:
        k = parse_top_k(top_k_values[-1], num_classes)
    coverage_values = query.get("coverage")
    if coverage_values is None:
        return k, None
    # checked before the body is read: a request the model cannot answer costs nothing more
    coverage = parse_coverage(coverage_values[-1])
    return k, (coverage, coverage_threshold(service.calibration, coverage))


def parse_top_k(text: str, num_classes: int) -> int:
    # plain decimal digits only: int() would also take " 5", "1_0" and non-ASCII digits
    k = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else 0
    if not 1 <= k <= num_classes:
        raise InvalidParameter(
            f"top_k must be an integer from 1 to {num_classes}, not {text[:32]!r}"
        )
    return k


def parse_coverage(text: str) -> float:
    coverage = float(text) if text and DECIMAL.fullmatch(text) else 0.0
    if not 0 < coverage < 1:
        raise InvalidParameter(
            f"coverage must be a number between 0 and 1, exclusive (e.g. 0.95), not {text[:32]!r}"
        )
    return coverage


async def read_image(
    scope: Scope,
    receive: Receive,
    headers: dict[bytes, bytes],
    limit: int,
    hasher: Hasher | None = None,
) -> bytes:
    """The image's bytes; with a `hasher`, those bytes (not a multipart envelope) hashed."""
    content_type = headers.get(b"content-type", b"")
    check_length(headers, limit)
    if content_type in RAW_CONTENT_TYPES:  # exactly as listed: no parameters to strip
        return await read_body(receive, limit, hasher)
    media_type = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
    if media_type in RAW_MEDIA_TYPES:
        return await read_body(receive, limit, hasher)
    if media_type == MULTIPART:
        data = await read_multipart_file(scope, limited(receive, limit))
        if hasher is not None:
            hasher.update(data)
        return data
    raise UnsupportedMediaType(
        f"Content-Type {media_type!r} is not accepted: send image/jpeg, image/png, image/webp, "
        "image/bmp, image/gif, application/octet-stream, or multipart/form-data with a 'file' field"
    )


def limited(receive: Receive, limit: int) -> Receive:
    """A `receive` that fails once more than `limit` body bytes have arrived (chunked uploads)."""
    seen = 0

    async def receive_within_limit() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        return message

    return receive_within_limit


async def read_multipart_file(scope: Scope, receive: Receive) -> bytes:
    request = Request(scope, receive)
    try:
        form = await request.form(max_files=1, max_fields=16)
    except BlinkError:
        raise
    except (
        Exception
    ) as exc:  # malformed multipart: Starlette and python-multipart raise several types
        raise BadImage(f"malformed multipart/form-data body: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidParameter("multipart/form-data needs the image in a field named 'file'")
        return await upload.read()
    finally:
        await form.close()


# classify(service, scope, receive, send): the answer above, with the shared bookkeeping
classify = functools.partial(serve_request, ROUTE, answer, error_answer)


async def classify_named(
    registry: ModelRegistry, name: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """POST /models/{name}/classify: the model by name, or 404 naming those served."""
    host = registry.hosts.get(name)
    if host is None:
        await no_model(registry.unknown_message(name), send)
        return
    await classify(host.serving(scope["headers"]), scope, receive, send)


async def no_model(message: str, send: Send) -> None:
    """404 for a model that is not served (not counted: only served models have series)."""
    exc = ModelNotFound(message)
    await send_response(send, exc.status, exc.body(), b"application/json", [])


class ClassifyRoute:
    """`classify` as an ASGI app object: Starlette's `Route` hands such objects the raw
    scope/receive/send instead of wrapping them in a Request/Response cycle."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry: ModelRegistry = scope["app"].state.registry
        name = scope.get("path_params", {}).get("model_name")
        if name is not None:
            await classify_named(registry, name, scope, receive, send)
        elif registry.default is None:
            await no_model(registry.no_default_message(), send)
        else:
            await classify(registry.default.serving(scope["headers"]), scope, receive, send)
