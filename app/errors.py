"""Errors a client can cause, each with its HTTP status and a stable code.

Every failure answers `{"error": {"code", "message"}}`; see DESIGN.md for the statuses.
"""

from __future__ import annotations

import orjson


class BlinkError(Exception):
    status = 500
    code = "internal"
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only class default

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers

    def body(self) -> bytes:
        return error_body(self.code, self.message)


class BadImage(BlinkError):
    status, code = 400, "bad_image"


class PayloadTooLarge(BlinkError):
    status, code = 413, "too_large"


class UnsupportedMediaType(BlinkError):
    status, code = 415, "unsupported_media_type"


class ModelNotFound(BlinkError):
    status, code = 404, "model_not_found"


class InvalidParameter(BlinkError):
    status, code = 422, "invalid_parameter"


class Overloaded(BlinkError):
    """Refused for load; `reason` names the limit that was hit (see app/admission.py)."""

    status, code = 503, "overloaded"
    headers = {"retry-after": "1"}  # noqa: RUF012
    reason = "queue_full"
    retry_after = 1
    hold_s = 0.0  # how long the server should not read this client's connection afterwards

    @classmethod
    def because(cls, reason: str, retry_after: int, hold_s: float = 0.0) -> Overloaded:
        exc = cls(OVERLOAD_MESSAGES[reason], headers={"retry-after": str(retry_after)})
        exc.reason, exc.retry_after, exc.hold_s = reason, retry_after, hold_s
        return exc

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"code": self.code, "message": self.message, "reason": self.reason}}
        )


# The limits an overload answer names (app/admission.py decides them).
QUEUE_FULL, CONCURRENCY, DEADLINE_UNMEETABLE = "queue_full", "concurrency", "deadline_unmeetable"
OVERLOAD_MESSAGES = {
    "queue_full": "the batching queue is full",
    "concurrency": "too many requests in progress",
    "deadline_unmeetable": "the queue ahead cannot drain before the request's deadline",
}


class NotReady(BlinkError):
    status, code = 503, "not_ready"
    headers = {"retry-after": "1"}  # noqa: RUF012


class DeadlineExceeded(BlinkError):
    status, code = 504, "deadline_exceeded"


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})
