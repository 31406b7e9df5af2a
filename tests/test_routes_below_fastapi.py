"""/classify and V2 infer are served below FastAPI (app.main.BlinkApp); the same handlers stay
mounted in FastAPI's router for apps that reach it directly (e.g. mounted under a path). Both
ways must give the same answers, errors included."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import tritonclient.http as triton
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.images import png


def v2_binary_request(body: bytes) -> tuple[bytes, dict[str, str]]:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=True)
    output = triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    content, json_size = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[output]
    )
    return content, {"inference-header-content-length": str(json_size)}


async def test_fast_path_and_fastapi_routes_answer_alike(bundle_dir):
    app = create_app(Settings(model=bundle_dir, threads=1))
    async with LifespanManager(app, startup_timeout=60) as manager:
        fast = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://b"
        )
        routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.api), base_url="http://b")
        async with fast, routed:
            for _ in range(600):
                if (await fast.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            name = app.state.registry.default.current.bundle.manifest.name
            content, headers = v2_binary_request(png(seed=3))
            requests = [
                ("/classify", {"content": png(seed=3), "headers": {"content-type": "image/png"}}),
                ("/classify?top_k=0", {"content": png(), "headers": {"content-type": "image/png"}}),
                (f"/v2/models/{name}/infer", {"content": content, "headers": headers}),
                (f"/v2/models/{name}/infer", {"content": b"{", "headers": {}}),
                ("/v2/models/nope/infer", {"content": content, "headers": headers}),
            ]
            for path, request in requests:
                a, b = await fast.post(path, **request), await routed.post(path, **request)
                assert (a.status_code, a.headers["content-type"]) == (
                    b.status_code,
                    b.headers["content-type"],
                ), path
                if path == "/classify":
                    assert a.status_code == 200
                    assert a.json()["predictions"] == b.json()["predictions"]
                else:
                    assert a.content == b.content, path
                    header = a.headers.get("inference-header-content-length")
                    assert header == b.headers.get("inference-header-content-length")
            statuses = [(await fast.post(p, **r)).status_code for p, r in requests]
    assert statuses == [200, 422, 200, 400, 404]
