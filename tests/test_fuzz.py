"""Property-based fuzzing of the decoders and the V2 codec against a real server (Hypothesis).

Mutated valid PNG, JPEG, WebP, GIF and BMP bytes, headers claiming any size, truncations, and
random V2 JSON headers with random binary sections: every answer is a client error or a success,
never a 5xx, always within the client's timeout (no hang), and the server still classifies a
good image afterwards and counted no 500.

The fast suite runs a few dozen examples per property; `BLINK_FUZZ_EXAMPLES=2000` (what
`python -m loadtest.faults` sets) runs the long profile.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.settings import Settings
from tests.conftest import live_server
from tests.images import encode, grey, rgb
from tests.malformed import png_header_only
from tests.metrics_text import scrape, value

EXAMPLES = int(os.environ.get("BLINK_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a hang is caught by the client's timeout, not by Hypothesis' timer
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=EXAMPLES <= 100,  # the fast suite runs the same examples every time
    database=None,
)
TIMEOUT_S = 15
MAX_PIXELS = Settings().max_image_pixels
CLIENT_ERRORS = {400, 404, 413, 415, 422}


def seeds() -> dict[str, bytes]:
    """One small valid image per accepted format, grey and colour."""
    images = {}
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {}), ("BMP", {})):
        images[f"{fmt}-L"] = encode(grey(28), fmt, **options)
        images[f"{fmt}-RGB"] = encode(rgb(40, 30), fmt, **options)
    frames = [grey(28, seed) for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    images["GIF"] = buffer.getvalue()
    return images


SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image with some bytes flipped, spliced in or cut, and maybe truncated."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


SIZES = st.integers(0, 2**31 - 1) | st.integers(0, 70_000)


@st.composite
def claimed_size(draw: st.DrawFn) -> tuple[bytes, int]:
    """Headers that claim any width and height, with little or no pixel data behind them; and
    the number of pixels they claim."""
    width, height = draw(SIZES), draw(SIZES)
    kind = draw(st.sampled_from(["png", "bmp", "gif", "jpeg"]))
    if kind in ("gif", "jpeg"):  # 16-bit sizes
        width, height = width % 65536, height % 65536
    return claim(draw, kind, width, height), width * height


def claim(draw: st.DrawFn, kind: str, width: int, height: int) -> bytes:
    if kind == "png":
        return png_header_only(width, height)
    if kind == "bmp":
        # BITMAPFILEHEADER + BITMAPINFOHEADER (signed height: negative = top-down), 8-bit
        info = struct.pack(
            "<IiiHHIIiiII", 40, width, draw(st.sampled_from([1, -1])) * height, 1, 8, 0, 0,
            0, 0, 0, 0,
        )  # fmt: skip
        return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info
    if kind == "gif":
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        return b"GIF89a" + screen + image + b"\x08\x02\x4c\x01\x00\x3b"
    # a real JPEG whose SOF0 claims another size: the decoder meets too little data
    data = bytearray(SEEDS["JPEG-L"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[: draw(st.integers(sof + 9, len(data)))])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
DATATYPES = st.sampled_from(["FP32", "BYTES", "UINT8", "INT64", "FP16", "BOOL", "STRING", ""])


@st.composite
def v2_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A V2 infer body: a JSON header of plausible or random inputs, then random binary data."""
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        tensor: dict = {
            "name": draw(st.sampled_from(["input", "image", "other", ""])),
            "datatype": draw(DATATYPES),
            "shape": draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 40), max_size=5)),
        }
        if draw(st.booleans()):
            size = draw(st.integers(-1, 2**33) | st.integers(0, 4096))
            tensor["parameters"] = {"binary_data_size": size}
        else:
            tensor["data"] = draw(JSON_VALUES)
        inputs.append(tensor)
    header: dict = {"inputs": inputs}
    if draw(st.booleans()):
        header["parameters"] = draw(st.dictionaries(st.sampled_from(["timeout", "x"]), JSON_VALUES))
    if draw(st.booleans()):
        header["outputs"] = draw(JSON_VALUES)
    encoded = orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS)
    binary = draw(st.binary(max_size=512))
    if draw(st.booleans()):  # a valid image in the binary section, length-prefixed as BYTES
        image = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
        binary = struct.pack("<I", len(image)) + image + binary[: draw(st.integers(0, 4))]
    length = draw(
        st.sampled_from([len(encoded), None]) | st.integers(-5, len(encoded) + len(binary) + 5)
    )
    headers = {"content-type": "application/octet-stream"}
    if length is not None:
        headers["inference-header-content-length"] = str(length)
    return encoded + binary, headers


@pytest.fixture(scope="module")
def server(bundle_dir) -> Iterator[httpx.Client]:
    with (
        live_server(bundle_dir, threads=1, max_batch_size=4) as url,
        httpx.Client(base_url=url, timeout=TIMEOUT_S) as client,
    ):
        yield client
        # afterwards: still answering, and no request of the whole module was a 500
        good = client.post("/classify", content=SEEDS["PNG-L"], headers={"content-type": ""})
        assert good.status_code == 200, good.text
        assert client.get("/readyz").status_code == 200
        samples = scrape(url)
        for route in ("/classify", "/v2/models/{name}/infer"):
            assert value(samples, "blink_requests_total", route=route, status="500") == 0


def check(response: httpx.Response) -> None:
    assert response.status_code == 200 or response.status_code in CLIENT_ERRORS, (
        response.status_code,
        response.text[:300],
    )
    assert response.headers["content-type"].startswith("application/")
    if response.status_code != 200:
        assert response.json()["error"], "a JSON error that says what was wrong"


@FUZZ
@given(data=mutated(), content_type=st.sampled_from(["", "image/png", "application/octet-stream"]))
def test_mutated_images_get_an_answer_never_a_server_error(server, data, content_type):
    check(server.post("/classify", content=data, headers={"content-type": content_type}))


@FUZZ
@given(claimed=claimed_size())
def test_headers_claiming_any_size_are_refused_cleanly(server, claimed):
    data, pixels = claimed
    response = server.post("/classify", content=data, headers={"content-type": ""})
    check(response)
    # a small claim may even decode (a 1x1 GIF); one over the pixel limit is never decoded
    assert response.status_code in (200, 400, 413), response.text[:300]
    if pixels > MAX_PIXELS:
        assert response.status_code != 200, pixels


@FUZZ
@given(data=mutated(), top_k=st.text(max_size=12) | st.integers(-5, 50).map(str))
def test_multipart_and_query_fuzz(server, data, top_k):
    response = server.post("/classify", params={"top_k": top_k}, files={"file": ("x", data)})
    check(response)


@FUZZ
@given(request=v2_request(), version=st.sampled_from(["", "/versions/1", "/versions/x"]))
def test_v2_headers_and_binary_sizes_never_cause_a_server_error(server, request, version):
    body, headers = request
    response = server.post(f"/v2/models/tiny{version}/infer", content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert response.json()["error"]


def test_a_tiny_body_claiming_billions_of_elements_is_refused_before_allocating(server):
    """Found by the long fuzzing profile: an 80-byte request whose BYTES shape claimed 2**31
    elements made the server allocate an object array for all of them, and be killed (2**30
    here: within the bound on shapes, so the binary data's own check is what refuses it)."""
    header = orjson.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2**30],
                     "parameters": {"binary_data_size": 4}}]}
    )  # fmt: skip
    headers = {"inference-header-content-length": str(len(header))}
    response = server.post("/v2/models/tiny/infer", content=header + bytes(4), headers=headers)
    assert response.status_code == 400 and "cannot hold" in response.json()["error"]


def test_an_empty_tensor_with_huge_dimensions_is_refused(server):
    """Found by the long fuzzing profile: a shape with a zero in it needs no data, and its other
    dimensions overflowed numpy's reshape as a 500 (whose logged traceback then filled the
    test's unread pipe and wedged the server)."""
    header = orjson.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [0, 2**40, 2**40], "data": []}]}
    )
    headers = {"inference-header-content-length": str(len(header))}
    response = server.post("/v2/models/tiny/infer", content=header, headers=headers)
    assert response.status_code == 400 and "more than" in response.json()["error"]


def test_fuzzing_starts_from_valid_images(server):
    """The seeds themselves decode and are served: mutations start from accepted images."""
    for data in SEEDS.values():
        Image.open(io.BytesIO(data)).load()
        assert server.post("/classify", content=data).status_code == 200
