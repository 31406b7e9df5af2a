"""The protocol's wire format: JSON tensors, the binary tensor data extension, compressed bodies.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is
then in `Inference-Header-Content-Length`, and each input that travels as bytes says how many in
`parameters.binary_data_size`, in input order. BYTES elements travel as a 4-byte little-endian
length then the bytes. Responses use the same layout for outputs asked for as binary.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.v2.errors import V2Error

NUMERIC_TYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
_LENGTH = struct.Struct("<I")
# Far beyond any input the service accepts (the body limit comes first), and within numpy's size.
MAX_ELEMENTS = 2**31 - 1


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # numeric: shaped as `shape`; BYTES: a flat object array of bytes


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # > 0: the top-k classes as "score:index:label" strings


@dataclass(slots=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # the request-wide default for outputs not asked for by name


def bad(message: str) -> V2Error:
    return V2Error(400, message)


# -- requests ------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding` (gzip, deflate), refusing output beyond `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported: use gzip or deflate")
    # 32 + 15 reads a zlib or gzip header; "deflate" is zlib by the HTTP spec, raw in practice too
    attempts = (47,) if encoding == "gzip" else (47, -15)
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            error = exc
            continue
        if len(data) > limit:  # a small body that inflates without end is refused, not expanded
            raise V2Error(413, f"decompressed body exceeds the limit of {limit} bytes")
        return data
    raise bad(f"body is not valid {encoding} data: {error}")


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    if header_length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if not 0 < header_length <= len(body):
            raise bad(
                f"Inference-Header-Content-Length {header_length} does not fit "
                f"the {len(body)}-byte body"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise bad(f"the request header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("the request header must be a JSON object")
    parameters = mapping(header.get("parameters"), "parameters")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad("the request needs a non-empty 'inputs' list")
    inputs, offset = [], 0
    for raw in raw_inputs:
        tensor, used = decode_input(raw, binary, offset)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad("parameters.binary_data_output must be true or false")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("'id' must be a string")
    return InferRequest(
        request_id, parameters, inputs, parse_outputs(header.get("outputs"), binary_output),
        binary_output,
    )  # fmt: skip


def mapping(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object")
    return value


def tensor_header(raw: object) -> tuple[str, str, tuple[int, ...], dict[str, Any]]:
    if not isinstance(raw, dict):
        raise bad("each input must be a JSON object")
    shape: Any  # a list of ints once `valid_shape` has held
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise bad("each input needs a 'name'")
    if datatype != BYTES and datatype not in NUMERIC_TYPES:
        raise bad(f"input {name!r}: unknown datatype {datatype!r}")
    valid_shape = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not valid_shape:
        raise bad(f"input {name!r}: 'shape' must be a list of non-negative integers")
    # A shape with a zero in it needs no data however large its other dimensions are; bound
    # them all, or reshaping to it fails inside numpy as a server error.
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise bad(f"input {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    return (
        name,
        datatype,
        tuple(shape),
        mapping(raw.get("parameters"), f"input {name!r} parameters"),
    )


def decode_input(raw: object, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One input tensor, and how many bytes of the binary section it used."""
    name, datatype, shape, parameters = tensor_header(raw)
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise bad(f"input {name!r}: binary_data_size {size} runs past the end of the body")
        data = from_binary(binary[offset : offset + size], datatype, count, name)
    elif "data" in raw:  # type: ignore[operator]
        data = from_json(raw["data"], datatype, count, name, parameters)  # type: ignore[index]
        size = 0
    else:
        raise bad(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if datatype != BYTES:
        data = data.reshape(shape)
    return Tensor(name, datatype, shape, data), size


def from_binary(chunk: memoryview, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == BYTES:
        return bytes_elements(chunk, count, name)
    dtype = NUMERIC_TYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise bad(
            f"input {name!r}: {len(chunk)} bytes of data for {count} {datatype} elements "
            f"(expected {count * dtype.itemsize})"
        )
    array = np.frombuffer(chunk, dtype)
    return array if array.flags.aligned else array.copy()


def bytes_elements(chunk: memoryview, count: int, name: str) -> np.ndarray:
    # Each element takes at least its 4-byte length: a shape claiming more elements than that
    # is refused before anything is allocated for them (a tiny body must not cost gigabytes).
    if count > len(chunk) // 4:
        raise bad(f"input {name!r}: {len(chunk)} bytes of binary data cannot hold {count} elements")
    elements = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(chunk):
            raise bad(f"input {name!r}: binary data ends before element {i} of {count}")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise bad(f"input {name!r}: element {i} runs past the end of its binary data")
        elements[i] = bytes(chunk[offset : offset + length])
        offset += length
    if offset != len(chunk):
        raise bad(f"input {name!r}: {len(chunk) - offset} bytes left after {count} elements")
    return elements


def from_json(
    data: object, datatype: str, count: int, name: str, parameters: dict[str, Any]
) -> np.ndarray:
    if datatype == BYTES:
        flat = flatten(data)
        if len(flat) != count:
            raise bad(f"input {name!r}: {len(flat)} elements for shape of {count}")
        # JSON cannot carry raw bytes: images travel base64-encoded, as MLServer's codec does
        base64_encoded = parameters.get("content_type") == "base64"
        elements = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise bad(f"input {name!r}: BYTES elements in JSON must be strings")
            elements[i] = json_bytes(item, base64_encoded, name, i)
        return elements
    try:
        array = np.asarray(data, dtype=NUMERIC_TYPES[datatype]).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad(f"input {name!r}: data is not a list of {datatype} numbers: {exc}") from exc
    if array.size != count:
        raise bad(f"input {name!r}: {array.size} elements for shape of {count}")
    return array


def json_bytes(item: str, base64_encoded: bool, name: str, index: int) -> bytes:
    if not base64_encoded:
        return item.encode()
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"input {name!r}: element {index} is not valid base64") from exc


def flatten(data: object) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if all(not isinstance(item, list) for item in data):
        return data
    return [leaf for item in data for leaf in flatten(item)]


def parse_outputs(raw: object, binary_default: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad("'outputs' must be a list")
    outputs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad("each requested output needs a 'name'")
        name = item["name"]
        parameters = mapping(item.get("parameters"), f"output {name!r} parameters")
        binary = parameters.get("binary_data", binary_default)
        classes = parameters.get("classification", 0)
        if not isinstance(binary, bool):
            raise bad(f"output {name!r}: binary_data must be true or false")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
            raise bad(f"output {name!r}: classification must be a non-negative integer")
        outputs.append(RequestedOutput(name, binary, classes))
    return outputs


# -- responses -----------------------------------------------------------------------------


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    data: np.ndarray  # numeric, or an object array of bytes for BYTES
    binary: bool


def encode_response(
    header: dict[str, Any], outputs: list[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    entries, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.data.shape),
        }
        if output.binary:
            blob = to_binary(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif output.datatype == BYTES:
            entry["data"] = [item.decode(errors="replace") for item in output.data.ravel()]
        else:
            entry["data"] = output.data.ravel()  # orjson writes float32 at float32 precision
        entries.append(entry)
    body = orjson.dumps({**header, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return body, None
    return b"".join([body, *blobs]), len(body)


def to_binary(output: OutputTensor) -> bytes:
    if output.datatype == BYTES:
        return b"".join(_LENGTH.pack(len(item)) + item for item in output.data.ravel())
    return np.ascontiguousarray(output.data, NUMERIC_TYPES[output.datatype]).tobytes()


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """Compress for a client that asked to (Accept-Encoding), as Triton does."""
    accepted = set()
    for token in accept_encoding.lower().split(","):
        coding, _, weight = token.partition(";")
        if weight.strip().replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            accepted.add(coding.strip())
    if "gzip" in accepted:
        gzipper = zlib.compressobj(wbits=31)  # 16 + 15: a gzip container
        return gzipper.compress(body) + gzipper.flush(), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body), "deflate"
    return body, None
