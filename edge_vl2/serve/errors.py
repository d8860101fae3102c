"""Every error the server sends, in OpenAI's error JSON with the status that fits.

    {"error": {"message": "messages[0].role: unknown role 'bot' (use system, user or assistant)",
               "type": "invalid_request_error", "param": "messages[0].role", "code": null}}

Messages are one line and name the value and what was expected; the official `openai` client raises them as
`BadRequestError`, `AuthenticationError`, `NotFoundError`, `APIStatusError` (413, 503, 504) or `InternalServerError`.
"""

from __future__ import annotations

from ..errors import one_line

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """An HTTP error with OpenAI's body. `headers` are sent with it (Retry-After on 503)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.message = " ".join(message.split())
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code=code)


def unavailable(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, code="server_busy", headers={"Retry-After": str(retry_after_s)})


def internal(e: BaseException) -> ApiError:
    """A genuine bug: the client gets a short line, the log gets the traceback (logged by the caller)."""
    return ApiError(500, f"internal error ({type(e).__name__}: {one_line(e, 200)}); the server log has details",
                    code="internal_error")
