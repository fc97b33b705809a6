"""The error body every caller sees: {"error": {"code", "message", "details"}}."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .models import ErrorInfo


class RequestRejected(Exception):
    """Input we will not accept; `status` is the HTTP answer, the rest goes in the error body."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(code=code, message=message, details=details)
        self.headers = headers or {}


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(body)"


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    return [{"field": field_path(e["loc"], prefix), "message": e["msg"].removeprefix("Value error, ")}
            for e in exc.errors(include_url=False, include_input=False)]
