"""The ASGI entry's rule: what must apply to every route is added at BlinkApp, not on FastAPI.

POST /classify and V2 infer are answered before FastAPI's middleware stack, so a middleware on
the FastAPI app would silently miss them: the app refuses to start with one, and
BlinkApp.add_middleware wraps every route instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import MIDDLEWARE_REFUSED, create_app, package_version
from app.settings import Settings
from tests.conftest import running_app, wait_until_ready
from tests.images import png

PNG = {"content-type": "image/png"}


class StampEveryResponse:
    """A plain ASGI middleware that adds a header to every answer."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app, self.value = app, value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-stamp", self.value)]
            await send(message)

        await self.app(scope, receive, stamped if scope["type"] == "http" else send)


async def test_middleware_on_the_fastapi_app_fails_the_start(bundle_dir: Path) -> None:
    app = create_app(Settings(model=bundle_dir, threads=1))

    @app.api.middleware("http")
    async def never_sees_classify(request: Request, call_next):  # type: ignore[no-untyped-def]
        return await call_next(request)

    with pytest.raises(RuntimeError, match=r"BlinkApp\.add_middleware"):
        async with LifespanManager(app):
            pass
    assert "/classify" in MIDDLEWARE_REFUSED


async def test_uvicorn_exits_instead_of_serving_without_the_middleware(bundle_dir: Path) -> None:
    import uvicorn

    app = create_app(Settings(model=bundle_dir, threads=1))
    app.api.add_middleware(StampEveryResponse, value="missed")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    with contextlib.suppress(SystemExit):  # uvicorn exits with status 3 on a failed startup
        await server.serve()
    assert not server.started


async def test_add_middleware_wraps_the_hot_routes_too(bundle_dir: Path) -> None:
    app = create_app(Settings(model=bundle_dir, threads=1))
    app.add_middleware(StampEveryResponse, value="seen")
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://blink") as client:
            await wait_until_ready(client, timeout=30)
            answers = [
                await client.post("/classify", content=png(), headers=PNG),
                await client.post("/v2/models/tiny/infer", json={"inputs": []}),
                await client.get("/healthz"),
            ]
    assert answers[0].status_code == 200, answers[0].text
    assert [a.headers.get("x-stamp") for a in answers] == ["seen"] * 3


async def test_the_api_reports_the_package_version(bundle_dir: Path) -> None:
    async with running_app(Settings(model=bundle_dir, threads=1)) as client:
        info = (await client.get("/openapi.json")).json()["info"]
    assert info["version"] == package_version() != "0+unknown"


async def test_running_app_fails_with_a_message_when_never_ready(slow_bundle_dir: Path) -> None:
    import tests.conftest as conftest

    original = conftest.READY_TIMEOUT_S
    conftest.READY_TIMEOUT_S = 0.0
    try:
        with pytest.raises(AssertionError, match=r"not ready after .* /readyz answered 503"):
            # warming this bundle up over every batch size takes far longer than no time at all
            async with running_app(Settings(model=slow_bundle_dir, threads=1, max_batch_size=4)):
                pass
    finally:
        conftest.READY_TIMEOUT_S = original
