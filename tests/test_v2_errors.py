"""V2 errors and edge cases with plain httpx on the in-process app: shapes, codes, limits."""

from __future__ import annotations

import asyncio
import base64
import gzip
import struct
import zlib

import orjson
import pytest

from app.settings import Settings
from tests.conftest import running_app
from tests.images import png
from tests.metrics_text import parse, value

INFER = "/v2/models/tiny/infer"
SHAPE = [1, 1, 28, 28]


def binary_request(header: dict, blob: bytes) -> dict:
    """httpx keyword arguments for a body with the binary tensor data extension."""
    encoded = orjson.dumps(header)
    return {
        "content": encoded + blob,
        "headers": {"inference-header-content-length": str(len(encoded))},
    }


def image_request(*bodies: bytes, **header: object) -> dict:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in bodies)
    tensor = {
        "name": "image",
        "shape": [len(bodies)],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(blob)},
    }
    return binary_request({"inputs": [tensor], **header}, blob)


def pixels_input(shape=SHAPE, datatype="FP32", data=None) -> dict:
    count = 1
    for d in shape:
        count *= d
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data or [0.0] * count}


async def classify(client, body: bytes, k: int = 10) -> list[dict]:
    response = await client.post(
        "/classify", content=body, params={"top_k": k}, headers={"content-type": "image/png"}
    )
    return response.json()["predictions"]


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for fragment in fragments:
        assert fragment in body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/tiny/versions/9"),
        ("GET", "/v2/models/nope/ready"),
        ("GET", "/v2/models/nope/config"),
        ("GET", "/v2/models/tiny/versions/9/stats"),
        ("POST", "/v2/models/nope/infer"),
        ("POST", "/v2/models/tiny/versions/9/infer"),
    ],
)
async def test_unknown_model_or_version_is_404(client, method, path):
    response = await client.request(method, path, **image_request(png()))
    assert_error(response, 404, "unknown")


async def test_wrong_shape_or_datatype_is_400_with_the_expected_shape(client):
    wrong_shape = await client.post(INFER, json={"inputs": [pixels_input([1, 3, 28, 28])]})
    assert_error(wrong_shape, 400, "[-1, 1, 28, 28]", "FP32 [1, 3, 28, 28]")
    wrong_type = await client.post(INFER, json={"inputs": [pixels_input(datatype="INT32")]})
    assert_error(wrong_type, 400, "must be FP32 with shape [-1, 1, 28, 28]")
    images = {"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}
    wrong_bytes = await client.post(INFER, json={"inputs": [images]})
    assert_error(wrong_bytes, 400, "shape [-1]")


FP32_SIZE = 28 * 28 * 4
BAD_REQUESTS = {
    "not JSON": ({"content": b"{nope"}, "not valid JSON"),
    "no inputs": ({"json": {"inputs": []}}, "non-empty 'inputs'"),
    "header longer than body": (
        {"content": b"{}", "headers": {"inference-header-content-length": "99"}},
        "does not fit",
    ),
    "binary size off": (
        binary_request(
            {"inputs": [{**pixels_input(), "data": None, "parameters": {"binary_data_size": 10}}]},
            b"\0" * 10,
        ),
        "10 bytes of data for 784 FP32 elements",
    ),
    "unclaimed bytes": (
        binary_request({"inputs": [pixels_input()]}, b"\0" * 8),
        "8 bytes of binary data belong to no input",
    ),
    "unknown input": ({"json": {"inputs": [{**pixels_input(), "name": "x"}]}}, "unknown input 'x'"),
    "two inputs": (
        {"json": {"inputs": [pixels_input(), {**pixels_input(), "name": "image"}]}},
        "exactly one input",
    ),
    "unknown output": (
        {"json": {"inputs": [pixels_input()], "outputs": [{"name": "scores"}]}},
        "unknown output 'scores'",
    ),
    "not an image": (image_request(b"GIF89a but not really"), "image 0: not a decodable"),
    "NaN in binary": (
        binary_request(
            {
                "inputs": [
                    {**pixels_input(), "data": None, "parameters": {"binary_data_size": FP32_SIZE}}
                ]
            },
            struct.pack("<f", float("nan")) * (28 * 28),
        ),
        "NaN or infinite",
    ),
    "bad base64": (
        {
            "json": {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": ["@@@"],
                        "parameters": {"content_type": "base64"},
                    }
                ]
            }
        },
        "not valid base64",
    ),
    "negative timeout": (
        {"json": {"inputs": [pixels_input()], "parameters": {"timeout": -5}}},
        "parameters.timeout",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_malformed_requests_are_400(client, case):
    kwargs, fragment = BAD_REQUESTS[case]
    assert_error(await client.post(INFER, **kwargs), 400, fragment)


async def test_base64_json_bytes_with_json_classification(client):
    body = png(3)
    images = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(body).decode()],
        "parameters": {"content_type": "base64"},
    }
    request = {
        "id": "json-1",
        "inputs": [images],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    response = await client.post(INFER, json=request)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "json-1" and answer["model_name"] == "tiny"
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 2]
    expected = [
        f"{p['score']!r}:{p['index']}:{p['label']}" for p in await classify(client, body, 2)
    ]
    assert output["data"] == expected


async def test_client_batch_above_max_batch_size_is_split_and_kept_in_order(bundle_dir):
    bodies = [png(seed) for seed in range(100, 105)]
    settings = Settings(model=bundle_dir, threads=1, max_batch_size=2, queue_capacity=5)
    async with running_app(settings) as client:
        response = await client.post(
            INFER, **image_request(*bodies, outputs=[{"name": "probabilities"}])
        )
        metrics = parse((await client.get("/metrics")).text)
        assert response.status_code == 200, response.text
        (output,) = response.json()["outputs"]
        assert output["shape"] == [5, 10]
        for i, body in enumerate(bodies):
            expected = [0.0] * 10
            for p in await classify(client, body):
                expected[p["index"]] = p["score"]
            assert output["data"][i * 10 : (i + 1) * 10] == pytest.approx(expected, rel=1e-6)
        too_many = await client.post(INFER, **image_request(*bodies, png(0)))
    assert value(metrics, "blink_batch_size_sum") == 5
    assert value(metrics, "blink_batch_size_count") == 3  # blocks of 2, 2 and 1
    assert_error(too_many, 400, "6 images exceed the queue's capacity of 5")


async def test_compressed_bodies_and_their_limits(bundle_dir):
    settings = Settings(model=bundle_dir, threads=1, max_body_bytes=4096)
    async with running_app(settings) as client:
        request = image_request(png(5))
        deflated = await client.post(
            INFER,
            content=zlib.compress(request["content"]),
            headers={**request["headers"], "content-encoding": "deflate"},
        )
        assert deflated.status_code == 200, deflated.text
        gzipped = await client.post(
            INFER,
            content=gzip.compress(request["content"]),
            headers={**request["headers"], "content-encoding": "gzip"},
        )
        assert gzipped.status_code == 200, gzipped.text
        assert gzipped.content == deflated.content

        bomb = gzip.compress(b" " * 1_000_000)  # ~1 kB that inflates to 1 MB
        assert len(bomb) < 4096
        response = await client.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
        assert_error(response, 413, "decompressed body exceeds the limit of 4096 bytes")
        response = await client.post(INFER, content=b"x" * 5000)
        assert_error(response, 413, "limit is 4096")
        response = await client.post(INFER, content=b"{}", headers={"content-encoding": "br"})
        assert_error(response, 415, "gzip or deflate")


async def test_overload_is_503_with_retry_after(slow_bundle_dir):
    settings = Settings(model=slow_bundle_dir, threads=1, max_batch_size=1, queue_capacity=1)
    async with running_app(settings) as client:
        responses = await asyncio.gather(
            *(client.post(INFER, **image_request(png(seed))) for seed in range(4))
        )
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert_error(rejected, 503, "queue is full")
    assert rejected.headers["retry-after"] == "1"


async def test_deadline_from_parameters_timeout_is_504(slow_bundle_dir):
    settings = Settings(model=slow_bundle_dir, threads=1, max_batch_size=1)
    async with running_app(settings) as client:
        busy = client.post(INFER, **image_request(png(1)))
        hurried = client.post(INFER, **image_request(png(2), parameters={"timeout": 2000}))
        first, second = await asyncio.gather(busy, hurried)
        stats = (await client.get("/v2/models/tiny/stats")).json()["model_stats"][0]
    assert first.status_code == 200
    assert_error(second, 504, "deadline")
    assert stats["inference_stats"]["fail"]["count"] == 1


async def test_paths_outside_the_protocol_answer_in_its_shape(client):
    assert_error(await client.get(INFER), 405, "GET is not allowed")
    assert_error(await client.post("/v2/repository/index"), 404, "not part of this server's API")
    assert (await client.get("/v2/health/live")).status_code == 200
