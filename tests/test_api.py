"""POST /classify and the API surface over HTTP, against the real in-process app and model.

Every answer is compared with the bundle's model run directly (its own ONNX Runtime session on
`app.preprocess` output, then `app.postprocess.top_k`): the service must give exactly that.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio
from PIL import Image

from app.bundle import load_bundle
from app.postprocess import top_k
from app.preprocess import Preprocessor
from app.settings import Settings
from tests.conftest import running_app
from tests.images import encode, grey, png, rgb
from tests.malformed import bomb_png, png_header_only, truncated
from tests.metrics_text import parse, value
from tests.onnx_models import LABELS, write_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

Reference = Callable[[bytes, int], list[dict]]
JPEG, PNG = {"content-type": "image/jpeg"}, {"content-type": "image/png"}
HTML = b"<!doctype html>\n<html><head><title>x</title></head><body>not an image</body></html>\n"
BOUNDARY = "blinkboundary"


def settings(bundle: Path, **overrides: object) -> Settings:
    return Settings(model=bundle, threads=1, max_batch_size=4, **overrides)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(bundle_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One app for the module: every test leaves it as it found it."""
    async with running_app(settings(bundle_dir)) as client:
        yield client


def make_reference(bundle: Path, variant: str) -> Reference:
    loaded = load_bundle(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(loaded.variant_path(variant)), options, providers=["CPUExecutionProvider"]
    )
    preprocessor = Preprocessor(loaded.manifest.input)

    def predict(data: bytes, k: int = 5) -> list[dict]:
        (logits,) = session.run(None, {"input": preprocessor(data)})
        return top_k(logits[0], k, loaded.manifest.labels)

    return predict


@pytest.fixture(scope="module")
def reference(bundle_dir: Path) -> Reference:
    # auto on CPU serves int8 when the bundle has it (asserted in test_models)
    return make_reference(bundle_dir, "int8")


def assert_answers(response: httpx.Response, want: list[dict]) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"] == {"name": "tiny", "version": "1", "variant": "int8"}
    assert body["predictions"] == want  # exactly: same label, index and score


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    assert sorted(body["error"]) == ["code", "message"]
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def multipart(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    return b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts) + (
        f"--{boundary}--\r\n".encode()
    )


def form_part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename:
        disposition += f'; filename="{filename}"\r\nContent-Type: image/png'
    return disposition.encode() + b"\r\n\r\n" + data


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth RGB image (noise upscaled), closer to a photo than raw noise."""
    return rgb(max(2, width // 16), max(2, height // 16), seed).resize((width, height))


FORMATS = {
    "jpeg": (encode(photo(), "JPEG", quality=90), "image/jpeg"),
    "jpg-alias": (encode(photo(seed=1), "JPEG"), "image/jpg"),
    "png": (encode(photo(seed=2), "PNG"), "image/png"),
    "webp": (encode(photo(seed=3), "WEBP"), "image/webp"),
    "bmp": (encode(photo(seed=4), "BMP"), "image/bmp"),
    "gif": (encode(photo(seed=5), "GIF"), "image/gif"),
    "octet-stream": (encode(photo(seed=6), "PNG"), "application/octet-stream"),
    "with-parameters": (encode(photo(seed=7), "PNG"), "Image/PNG; charset=binary"),
    "no-content-type": (encode(photo(seed=8), "WEBP"), None),
}


@pytest.mark.parametrize("name", FORMATS)
async def test_each_format_as_raw_body(api, reference, name):
    data, media_type = FORMATS[name]
    headers = {"content-type": media_type} if media_type else {}
    request = api.build_request("POST", "/classify", content=data, headers=headers)
    assert ("content-type" in request.headers) == (media_type is not None)
    assert_answers(await api.send(request), reference(data))


@pytest.mark.parametrize("name", ["jpeg", "png", "webp", "gif"])
async def test_multipart_file_field(api, reference, name):
    data, media_type = FORMATS[name]
    response = await api.post("/classify", files={"file": (f"x.{name}", data, media_type)})
    assert_answers(response, reference(data))


async def test_multipart_like_curl_with_other_fields(api, reference):
    """`curl -F file=@x.png -F note=hi`: the file may come after other fields."""
    data = png(seed=11)
    body = multipart(form_part("note", b"hi"), form_part("file", data, "x.png"))
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    assert_answers(await api.post("/classify", content=body, headers=headers), reference(data))


async def test_big_jpeg_goes_through_the_draft_path(api, reference):
    """1024x768: decoded at 1/8 scale (see test_preprocess), same answer as the model run alone."""
    data = encode(photo(1024, 768, seed=21), "JPEG", quality=90)
    want = reference(data, 10)
    response = await api.post("/classify", content=data, headers=JPEG, params={"top_k": 10})
    assert_answers(response, want)


@pytest.mark.parametrize(
    ("name", "data", "media_type"),
    [
        ("1x1", encode(Image.new("L", (1, 1), 200), "PNG"), "image/png"),
        ("1x1-jpeg", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "JPEG"), "image/jpeg"),
        ("tall-thin", encode(rgb(3, 500, seed=2), "PNG"), "image/png"),
        (
            "animated-gif",
            encode(
                rgb(32, 32, seed=1),
                "GIF",
                save_all=True,
                append_images=[rgb(32, 32, seed=2), rgb(32, 32, seed=3)],
                duration=40,
                loop=0,
            ),
            "image/gif",
        ),
        (
            "16-bit-png",
            encode(Image.fromarray((np.arange(900).reshape(30, 30) * 70).astype(np.uint16)), "PNG"),
            "image/png",
        ),
        ("cmyk-jpeg", encode(photo(seed=4).convert("CMYK"), "JPEG"), "image/jpeg"),
        ("grey-jpeg", encode(grey(40, seed=5), "JPEG"), "image/jpeg"),
        ("rgba-png", encode(photo(seed=6).convert("RGBA"), "PNG"), "image/png"),
        ("rgba-webp", encode(photo(seed=7).convert("RGBA"), "WEBP"), "image/webp"),
        ("1-bit-bmp", encode(grey(30, seed=8).convert("1"), "BMP"), "image/bmp"),
        (
            "palette-transparency",
            encode(photo(seed=9).convert("P"), "PNG", transparency=0),
            "image/png",
        ),
    ],
)
async def test_unusual_but_valid_images(api, reference, name, data, media_type):
    response = await api.post("/classify", content=data, headers={"content-type": media_type})
    assert_answers(response, reference(data))


async def test_grey_image_into_an_rgb_model(tmp_path):
    bundle = write_bundle(tmp_path / "rgb" / "1", channels=3, size=32)
    predict = make_reference(bundle, "fp32")
    data = png(seed=3)
    async with running_app(settings(bundle)) as client:
        response = await client.post("/classify", content=data, headers=PNG)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == predict(data)


@pytest.mark.parametrize(("query", "expected"), [({}, 5), ({"top_k": 1}, 1), ({"top_k": 10}, 10)])
async def test_top_k(api, reference, query, expected):
    data = png(seed=4)
    response = await api.post("/classify", content=data, headers=PNG, params=query)
    assert_answers(response, reference(data, expected))
    predictions = response.json()["predictions"]
    assert len(predictions) == expected
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)  # best first
    assert len({p["index"] for p in predictions}) == expected
    assert all(LABELS[p["index"]] == p["label"] for p in predictions)
    if expected == len(LABELS):
        assert sum(scores) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "top_k_value", ["0", "-1", "abc", "11", str(10**30), "", "1.5", "1_0", "²", "9" * 5000]
)
async def test_invalid_top_k(api, top_k_value):
    response = await api.post(f"/classify?top_k={top_k_value}", content=png(), headers=PNG)
    assert_error(response, 422, "invalid_parameter")
    assert "top_k" in response.json()["error"]["message"]


async def test_request_id_is_echoed_or_generated(api):
    sent = await api.post("/classify", content=png(), headers={**PNG, "x-request-id": "abc-123"})
    assert sent.headers["x-request-id"] == "abc-123"
    first, second = [await api.post("/classify", content=png(), headers=PNG) for _ in range(2)]
    assert re.fullmatch(r"[0-9a-f]{16}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    failed = await api.post("/classify", content=b"", headers={**PNG, "x-request-id": "bad-1"})
    assert failed.status_code == 400 and failed.headers["x-request-id"] == "bad-1"


async def test_server_timing(api):
    response = await api.post("/classify", content=png(), headers=PNG)
    entries = dict(
        re.fullmatch(r"(\w+);dur=(\d+\.\d+)", part.strip()).groups()  # type: ignore[union-attr]
        for part in response.headers["server-timing"].split(",")
    )
    assert list(entries) == ["decode", "queue", "inference", "total"]
    durations = {name: float(ms) for name, ms in entries.items()}
    assert all(ms >= 0 for ms in durations.values())
    assert durations["total"] >= durations["decode"]
    assert durations["total"] >= durations["inference"]


def raw(data: bytes, media_type: str | None = "image/png", **params: object) -> dict:
    return {
        "content": data,
        "headers": {"content-type": media_type} if media_type else {},
        "params": params,
    }


def parts(*items: bytes, content_type: str | None = None) -> dict:
    media_type = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    return {"content": multipart(*items), "headers": {"content-type": media_type}}


BAD_INPUTS: dict[str, tuple[dict, int, str]] = {
    "empty-body": (raw(b""), 400, "bad_image"),
    "empty-body-no-type": (raw(b"", None), 400, "bad_image"),
    "truncated-png": (raw(truncated(encode(photo(300, 200), "PNG"))), 400, "bad_image"),
    "truncated-jpeg": (
        raw(truncated(encode(photo(300, 200), "JPEG")), "image/jpeg"),
        400,
        "bad_image",
    ),
    "random-bytes": (
        raw(np.random.default_rng(0).bytes(5000), "application/octet-stream"),
        400,
        "bad_image",
    ),
    "text-plain": (raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
    "json-body": (raw(b'{"image": "x"}', "application/json"), 415, "unsupported_media_type"),
    "html-named-png": (raw(HTML), 400, "bad_image"),
    "html-in-multipart": (parts(form_part("file", HTML, "x.png")), 400, "bad_image"),
    "tiff": (raw(encode(grey(16), "TIFF"), "application/octet-stream"), 400, "bad_image"),
    "decompression-bomb": (raw(bomb_png()), 413, "too_large"),
    "over-pixel-limit": (raw(bomb_png(7000)), 413, "too_large"),
    "0x0-image": (raw(png_header_only(0, 0)), 400, "bad_image"),
    "0x28-image": (raw(png_header_only(0, 28)), 400, "bad_image"),
    "top_k=0": (raw(png(), top_k=0), 422, "invalid_parameter"),
    "top_k=-1": (raw(png(), top_k=-1), 422, "invalid_parameter"),
    "top_k=abc": (raw(png(), top_k="abc"), 422, "invalid_parameter"),
    "top_k=huge": (raw(png(), top_k=10**30), 422, "invalid_parameter"),
    "multipart-without-file": (parts(form_part("image", png(), "x.png")), 422, "invalid_parameter"),
    "multipart-file-as-text": (parts(form_part("file", b"abc")), 422, "invalid_parameter"),
    "multipart-no-boundary": (
        parts(form_part("file", png(), "x.png"), content_type="multipart/form-data"),
        400,
        "bad_image",
    ),
    "multipart-garbage": (
        raw(b"this is not multipart at all", f"multipart/form-data; boundary={BOUNDARY}"),
        400,
        "bad_image",
    ),
    "multipart-part-without-name": (parts(b"\r\n" + png()), 400, "bad_image"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
async def test_bad_input(api, name):
    request, status, code = BAD_INPUTS[name]
    assert_error(await api.post("/classify", **request), status, code)


async def test_bomb_is_refused_from_the_header(api):
    decoded = value(await metrics(api), "blink_decode_duration_seconds_count")
    response = await api.post("/classify", **raw(bomb_png()))
    assert_error(response, 413, "too_large")
    assert "limit is 40000000" in response.json()["error"]["message"]
    # refused in open_image, before anything was decoded (a decode would be observed)
    assert value(await metrics(api), "blink_decode_duration_seconds_count") == decoded
    # under Pillow's own guard but over the service's limit (40M pixels by default)
    response = await api.post("/classify", **raw(bomb_png(7000)))
    assert_error(response, 413, "too_large")
    assert "7000x7000 = 49000000 pixels" in response.json()["error"]["message"]
    assert value(await metrics(api), "blink_decode_duration_seconds_count") == decoded
    good = await api.post("/classify", content=png(), headers=PNG)
    assert value(await metrics(api), "blink_decode_duration_seconds_count") == decoded + 1
    assert good.status_code == 200


async def metrics(api: httpx.AsyncClient) -> dict:
    return parse((await api.get("/metrics")).text)


async def test_bad_inputs_do_not_wedge_the_service(api, reference):
    """All the bad inputs at once, mixed with good ones; then a good request still works."""
    good = [png(seed=s) for s in range(8)]
    bad = [api.post("/classify", **request) for request, _, _ in BAD_INPUTS.values()]
    fine = [api.post("/classify", content=data, headers=PNG) for data in good]
    responses = await asyncio.gather(*bad, *fine)
    for (_, status, code), response in zip(BAD_INPUTS.values(), responses, strict=False):
        assert_error(response, status, code)
    for data, response in zip(good, responses[len(bad) :], strict=True):
        assert_answers(response, reference(data))
    data = encode(photo(seed=99), "JPEG")
    assert_answers(await api.post("/classify", content=data, headers=JPEG), reference(data))
    samples = await metrics(api)
    assert value(samples, "blink_requests_in_flight") == 0
    assert value(samples, "blink_queue_depth") == 0
    assert value(samples, "blink_requests_total", route="/classify", status="500") == 0


async def test_body_over_the_byte_limit(bundle_dir, reference):
    limit = 4096
    small = png(seed=1)
    big = encode(rgb(64, 64, seed=2), "PNG")
    assert len(small) < limit < len(big)

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    form = multipart(form_part("file", big, "x.png"))
    form_type = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with running_app(settings(bundle_dir, max_body_bytes=limit)) as client:
        with_length = await client.post("/classify", content=big, headers=PNG)
        assert_error(with_length, 413, "too_large")
        request = client.build_request("POST", "/classify", content=chunks(big), headers=PNG)
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        assert_error(await client.send(request), 413, "too_large")
        assert_error(
            await client.post("/classify", content=form, headers=form_type), 413, "too_large"
        )
        streamed = client.build_request(
            "POST", "/classify", content=chunks(form), headers=form_type
        )
        assert_error(await client.send(streamed), 413, "too_large")
        # under the limit, chunked or not, still fine
        assert_answers(await client.post("/classify", content=small, headers=PNG), reference(small))
        response = await client.post("/classify", content=chunks(small), headers=PNG)
        assert_answers(response, reference(small))


async def test_unknown_route_is_json_404(api):
    for method in ("GET", "POST"):
        assert_error(await api.request(method, "/nope"), 404, "not_found")
    assert_error(await api.get("/classify/extra"), 404, "not_found")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_is_json_405(api, method):
    response = await api.request(method, "/classify")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


async def test_wrong_method_on_other_routes(api):
    assert_error(await api.post("/healthz"), 405, "method_not_allowed")
    assert_error(await api.delete("/v1/models"), 405, "method_not_allowed")


async def test_health_and_readiness(api):
    healthz, readyz = await api.get("/healthz"), await api.get("/readyz")
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    assert (readyz.status_code, readyz.json()["status"]) == (200, "ready")
    served = readyz.json()["model"]
    assert [w["version"] for w in readyz.json()["workers"]] == [served["version"]]


async def test_models(api, bundle_dir):
    response = await api.get("/v1/models")
    assert response.status_code == 200
    (model,) = response.json()["models"]
    manifest = load_bundle(bundle_dir).manifest
    assert model["name"] == "tiny" and model["version"] == "1"
    assert model["labels"] == LABELS
    assert model["input"] == {
        "name": "input",
        "shape": ["batch", 1, 28, 28],
        "layout": "NCHW",
        "color": "L",
        "resize": manifest.input.resize,
        "crop_fraction": 1.0,
        "interpolation": "bilinear",
        "mean": [0.5],
        "std": [0.25],
    }
    assert model["output"] == {"name": "logits", "kind": "logits"}
    assert model["variant"] == "int8"
    assert model["provider"] == "CPUExecutionProvider"
    assert model["max_batch_size"] == 4
    assert model["metrics"] == manifest.metrics
    # no calibration in this bundle: plain softmax scores, no prediction sets (test_calibration)
    assert model["calibration"]["calibrated"] is False
    assert model["calibration"]["coverage_levels"] == []


async def test_openapi_documents_every_route(api):
    response = await api.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    paths = document["paths"]
    for path, method in [
        ("/classify", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/v1/models", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
        assert paths[path][method].get("summary"), path

    classify = paths["/classify"]["post"]
    content = classify["requestBody"]["content"]
    for media_type in (
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/gif",
        "application/octet-stream",
    ):
        assert content[media_type]["schema"] == {"type": "string", "format": "binary"}
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert form["properties"]["file"]["format"] == "binary"
    (top_k_parameter,) = [p for p in classify["parameters"] if p["name"] == "top_k"]
    assert top_k_parameter["in"] == "query"
    assert top_k_parameter["schema"]["default"] == 5
    (coverage,) = [p for p in classify["parameters"] if p["name"] == "coverage"]
    assert coverage["in"] == "query" and coverage["schema"]["type"] == "number"
    assert "prediction_set" in coverage["description"]
    responses = classify["responses"]
    ok = responses["200"]["content"]["application/json"]
    assert ok["example"]["predictions"][0].keys() == {"label", "index", "score"}
    assert ok["example"]["prediction_set"].keys() == {"coverage", "labels", "indices", "scores"}
    assert {"X-Request-ID", "Server-Timing"} <= responses["200"]["headers"].keys()
    for status in ("400", "413", "415", "422", "503", "504"):
        assert responses[status]["description"], status
        assert "application/json" in responses[status]["content"], status

    # every reference resolves, and error responses have an example to show
    schemas = document["components"]["schemas"]
    for ref in re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', response.text):
        assert ref in schemas, ref
    error = schemas["ErrorResponse"]
    assert error["properties"].keys() == {"error"}
    assert "prediction_set" in schemas["ClassifyResponse"]["properties"]
    assert schemas["PredictionSetOut"]["required"] == ["coverage", "labels", "indices", "scores"]
    detail = schemas["ErrorDetail"]
    assert detail["properties"]["code"]["examples"]


async def test_docs_page(api):
    response = await api.get("/docs")
    assert response.status_code == 200
    assert "openapi.json" in response.text
