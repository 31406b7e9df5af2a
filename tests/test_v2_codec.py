"""The V2 wire format, checked against the official client's own encoder and decoder."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from app.v2.codec import (
    OutputTensor,
    compress,
    decompress,
    encode_response,
    parse_request,
)
from app.v2.errors import V2Error


def client_request(inputs, outputs=None, **options) -> tuple[bytes, int | None]:
    return triton.InferenceServerClient.generate_request_body(inputs, outputs, **options)


def test_parses_the_clients_binary_and_json_tensors():
    images = np.array([b"\x89PNG\0\0", b"", b"jpeg\xff"], dtype=object)
    pixels = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    binary = triton.InferInput("image", [3], "BYTES")
    binary.set_data_from_numpy(images, binary_data=True)
    inline = triton.InferInput("input", list(pixels.shape), "FP32")
    inline.set_data_from_numpy(pixels, binary_data=False)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False, class_count=3)]

    body, header_length = client_request([binary, inline], outputs, request_id="r1", timeout=5)
    request = parse_request(body, header_length)

    assert request.id == "r1" and request.parameters["timeout"] == 5
    first, second = request.inputs
    assert first.name == "image" and first.data.tolist() == images.tolist()
    assert second.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(second.data, pixels)
    (output,) = request.outputs or []
    assert (output.name, output.binary, output.classification) == ("probabilities", False, 3)


def test_no_outputs_named_means_all_in_binary_as_the_client_asks():
    tensor = triton.InferInput("input", [1, 1, 1, 1], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 1, 1), np.float32))
    request = parse_request(*client_request([tensor]))
    assert request.outputs is None and request.binary_output is True


def test_nested_json_data_is_read_in_row_major_order():
    header = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}]
    }
    (tensor,) = parse_request(orjson.dumps(header), None).inputs
    np.testing.assert_array_equal(tensor.data, [[1, 2], [3, 4]])


def test_responses_decode_with_the_clients_result_parser():
    scores = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    labels = np.array([[b"0.75:1:b"], [b"0.5:0:a"]], dtype=object)
    outputs = [
        OutputTensor("probabilities", "FP32", scores, binary=True),
        OutputTensor("top", "BYTES", labels, binary=True),
        OutputTensor("logits", "FP32", scores, binary=False),
    ]
    body, header_length = encode_response({"model_name": "m", "id": "7"}, outputs)

    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), scores)
    assert result.as_numpy("top").tolist() == labels.tolist()
    np.testing.assert_array_equal(result.as_numpy("logits"), scores)
    assert result.get_response()["id"] == "7"
    # the binary section is byte for byte what the client library would write
    assert body[header_length:] == scores.tobytes() + serialize_byte_tensor(labels).item()


def test_json_only_response_has_no_header_length():
    body, header_length = encode_response(
        {}, [OutputTensor("logits", "FP32", np.ones((1, 2), np.float32), binary=False)]
    )
    assert header_length is None
    assert orjson.loads(body)["outputs"][0]["data"] == [1.0, 1.0]


def test_decompress_refuses_bodies_that_inflate_past_the_limit():
    data = b"x" * 1000
    assert decompress(gzip.compress(data), "gzip", 1000) == data
    assert decompress(zlib.compress(data), "deflate", 1000) == data
    raw = zlib.compressobj(wbits=-15)
    assert decompress(raw.compress(data) + raw.flush(), "deflate", 1000) == data
    with pytest.raises(V2Error) as error:
        decompress(gzip.compress(data), "gzip", 999)
    assert error.value.status == 413
    with pytest.raises(V2Error) as error:
        decompress(b"not gzip", "gzip", 1000)
    assert error.value.status == 400


def test_compress_follows_accept_encoding():
    body = b"{}" * 100
    packed, encoding = compress(body, "deflate, gzip;q=0.5")
    assert encoding == "gzip" and gzip.decompress(packed) == body
    packed, encoding = compress(body, "gzip;q=0, deflate")
    assert encoding == "deflate" and zlib.decompress(packed) == body
    assert compress(body, "br") == (body, None)
