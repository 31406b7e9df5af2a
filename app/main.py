"""The app factory: routes, error handlers and the model's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import BlinkError, InvalidParameter, error_body
from app.metrics import ServiceMetrics, mark_worker_exit
from app.openapi import build_openapi
from app.registry import ModelRegistry
from app.routes import admin, health, metrics, models, page
from app.routes.classify import ClassifyRoute, classify, classify_named, no_model
from app.settings import Settings, get_settings
from app.v2.routes import infer_asgi
from app.v2.routes import router as v2_router

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
MIDDLEWARE_REFUSED = (
    "middleware added to the FastAPI app would not see POST /classify or V2 infer, which BlinkApp "
    "answers before FastAPI: add it with BlinkApp.add_middleware (docs/development.md)"
)


def package_version() -> str:
    """The installed package's version: pyproject.toml is the one place it is written."""
    try:
        return version("blink")
    except PackageNotFoundError:  # a source tree run without installing it
        return "0+unknown"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry: ModelRegistry = app.state.registry
    registry.open(ServiceMetrics())
    warm_up = asyncio.create_task(registry.warm_up())
    if app.state.settings.workers > 1:
        # A worker takes connections only once warm, so one that replaces a dead worker (or a
        # rolling restart's) never answers "not ready" while the others could serve.
        await warm_up
    # Alone, accept connections at once (liveness), report ready only after warm-up.
    registry.start()
    try:
        yield
    finally:
        warm_up.cancel()
        await registry.close()
        mark_worker_exit()


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(error_body(code, message), status, headers, media_type="application/json")


async def blink_error(request: Request, exc: BlinkError) -> Response:
    return json_error(exc.status, exc.code, exc.message, exc.headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return json_error(exc.status_code, code, str(exc.detail), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return json_error(422, InvalidParameter.code, message)


async def internal_error(request: Request, exc: Exception) -> Response:
    return json_error(500, "internal", "internal error")


class BlinkApp:
    """The ASGI entry point: POST /classify and V2 infer go straight to their handlers, the rest
    to FastAPI.

    For a small CNN the framework layers cost more than inference (bench/run.py measures it),
    so the hot path skips FastAPI's middleware stack; the same handler stays mounted as a
    Starlette route (OpenAPI, other methods -> 405, mounts under a root path).

    The rule that follows: anything that must apply to every route (auth, CORS, tracing) is
    added here, with `add_middleware`, never on the FastAPI app. A middleware on the FastAPI app
    would silently miss the hot routes, so the app refuses to start with one (the lifespan
    startup fails with MIDDLEWARE_REFUSED).
    """

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.state = api.state
        self.registry: ModelRegistry = api.state.registry
        self._entry: ASGIApp = self._route

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        """Wrap every route, /classify and V2 infer included, in an ASGI middleware.

        Starlette-style: `middleware_class(app, *args, **kwargs)`; the last added runs first.
        """
        self._entry = middleware_class(self._entry, *args, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/classify":
                host = self.registry.default
                if host is None:
                    return await no_model(self.registry.no_default_message(), send)
                return await classify(host.serving(scope["headers"]), scope, receive, send)
            if path.startswith("/models/") and path.endswith("/classify"):
                return await classify_named(self.registry, path[8:-9], scope, receive, send)
            if path.startswith("/v2/") and await infer_asgi(self.registry, scope, receive, send):
                return None
        elif scope["type"] == "lifespan" and self.api.user_middleware:
            return await refuse_to_start(receive, send)
        await self.api(scope, receive, send)


async def refuse_to_start(receive: Receive, send: Send) -> None:
    """Fail the lifespan startup, so that the server exits with the message.

    Both steps are needed: uvicorn exits on `startup.failed` (an exception alone reads to it as
    "lifespan unsupported", and it would serve anyway); in-process runners act on the exception.
    """
    await receive()  # lifespan.startup
    await send({"type": "lifespan.startup.failed", "message": MIDDLEWARE_REFUSED})
    raise RuntimeError(MIDDLEWARE_REFUSED)


def create_app(settings: Settings | None = None) -> BlinkApp:
    app = FastAPI(
        title="Blink",
        version=package_version(),
        description="Low-latency image classification with dynamic micro-batching.",
        lifespan=lifespan,
        exception_handlers={
            BlinkError: blink_error,
            HTTPException: http_error,
            RequestValidationError: validation_error,
            Exception: internal_error,
        },
    )
    app.state.settings = settings or get_settings()
    app.state.registry = ModelRegistry(app.state.settings)
    app.router.routes.append(Route("/classify", ClassifyRoute(), methods=["POST"], name="classify"))
    app.router.routes.append(
        Route(
            "/models/{model_name}/classify",
            ClassifyRoute(),
            methods=["POST"],
            name="classify_model",
        )
    )
    for router in (page.router, health.router, models.router, metrics.router):
        app.include_router(router)
    if app.state.settings.admin_token:  # off unless the operator set a token
        app.include_router(admin.router)
    app.include_router(v2_router)  # the Open Inference Protocol (KServe V2)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return BlinkApp(app)
