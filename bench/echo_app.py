"""The HTTP ceiling: a bare ASGI app that reads the whole body and answers a fixed JSON."""

from __future__ import annotations

ANSWER = (
    b'{"model":{"name":"echo","version":"1","variant":"none"},"predictions":'
    b'[{"label":"T-shirt/top","index":0,"score":0.9}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
