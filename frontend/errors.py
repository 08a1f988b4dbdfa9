"""Errors are values at the edges: one exception type for user mistakes (-> 4xx naming the field),
one for an engine that can't serve (-> 503). Anything else is a bug: 500 without internal text."""

from __future__ import annotations


class RequestError(ValueError):
    """A user mistake. ``param`` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status

    def to_json(self) -> dict:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(self.status,
                                                                           "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


class EngineUnavailable(Exception):
    """The engine died or is not ready: the request fails fast with 503."""


def server_error_json(request_id: str | None = None) -> dict:
    msg = "internal server error"
    if request_id:
        msg += f" (request id {request_id})"
    return {"error": {"message": msg, "type": "server_error", "param": None, "code": 500}}
