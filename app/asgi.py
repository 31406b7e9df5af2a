"""Raw ASGI reading and writing for the hot paths that run below FastAPI (/classify, V2 infer).

Starlette's Request, Headers and Response objects cost tens of microseconds per request, more
than a small CNN's inference; these helpers do only what those paths need.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import Receive, Send

from app.batching import ClientGone
from app.errors import PayloadTooLarge

Headers = list[tuple[bytes, bytes]]


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def header_list(headers: dict[str, str]) -> Headers:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def check_length(headers: dict[bytes, bytes], limit: int) -> None:
    """Refuse a declared Content-Length over `limit` before reading a byte of the body."""
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body is {int(length)} bytes; the limit is {limit}")


async def read_body(receive: Receive, limit: int, hasher: Hasher | None = None) -> bytes:
    """The whole body, failing once more than `limit` bytes arrive (chunked uploads too).

    With a `hasher`, each chunk is hashed as it arrives: by the last one, the digest is almost
    ready (the response cache's key costs little more than the body's transfer)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if hasher is not None:
            hasher.update(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes, headers: Headers
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
