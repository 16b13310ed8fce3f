"""The API's one error shape: ``{"error": {"code": ..., "message": ...}}`` (api.md, Errors).

The data layer raises :class:`ApiError` subclasses; the app turns each into its status code
and body. Messages name the field and the value, and go through the secret masker.
"""

from __future__ import annotations

from typing import Any

from ..redact import redact


class ApiError(Exception):
    """An error answered to the client: HTTP ``status``, a machine ``code`` and a message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = redact(message)
        if code:
            self.code = code
        self.field = field
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        error.update(self.extra)
        return {"error": error}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "payload_too_large"


class Invalid(ApiError):
    status, code = 422, "invalid"


class TooMany(ApiError):
    status, code = 429, "rate_limited"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """An error body for answers made outside the data layer (middleware, validation)."""
    return {"error": {"code": code, "message": redact(message), **extra}}
