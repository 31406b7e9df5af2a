"""Errors in the protocol's shape: `{"error": "message"}` with the HTTP status."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from app.errors import BlinkError


class V2Error(BlinkError):
    """A service error in the protocol's shape: any status, a plain message."""

    code = "v2_error"

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status

    @classmethod
    def from_blink(cls, exc: BlinkError, prefix: str = "") -> V2Error:
        """The same status, message and headers (Retry-After) as the service's own error."""
        status = 400 if exc.status == 422 else exc.status  # the protocol has no 422
        return cls(status, prefix + exc.message, exc.headers)


def error_body(exc: V2Error) -> bytes:
    return orjson.dumps({"error": exc.message})


def error_response(exc: V2Error) -> Response:
    return Response(error_body(exc), exc.status, exc.headers, media_type="application/json")
