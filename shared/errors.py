"""Every exception the app raises on purpose, and the error body callers see.

    ProvisioningError                 root: catch this to catch anything the app raises on purpose
    ├── RequestRejected               input we will not accept; `.status` is the HTTP answer, `.info` the body
    ├── BacklogTooLong                booking would put a call further out than MAX_EXPECTED_WAIT_HOURS
    ├── RedeliverLater                make the host deliver a queue message again (visibilityTimeout)
    ├── StatusStoreUnavailable        the status table could not be read or written; retry later
    ├── KeyStoreUnavailable           the table of idempotency keys and seen signatures could not be reached
    ├── SettingsError                 configuration missing or invalid (also a RuntimeError); `.settings` names them
    ├── UploadFailed                  the Logs Ingestion API refused or could not be reached
    ├── SendDeadlinePassed            a rate-lease token's deadline passed before its request was written: nothing sent
    └── GraphFailure                  a provisionOnDemand (or job/schema) call did not succeed
        ├── GraphThrottled            429: the whole pool holds back for Retry-After
        ├── GraphTransient            408, 5xx, timeouts, resets, unreadable answers: try again later
        └── GraphPermanent            400, 401, 403, 404 and other 4xx: retrying cannot help

The error body every caller sees is {"error": {"code", "message", "details"}} (`ErrorInfo`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from shared.models import ErrorInfo

if TYPE_CHECKING:
    from shared.graph.client import SendTiming


class ProvisioningError(Exception):
    """Root of the app's own exceptions."""


class RequestRejected(ProvisioningError):
    """Input we will not accept; `status` is the HTTP answer, the rest goes in the error body."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(code=code, message=message, details=details)
        self.headers = headers or {}


class BacklogTooLong(ProvisioningError):
    """The last slot a booking needs is `wait` seconds away, more than the caller may be made to wait."""

    def __init__(self, wait: float):
        super().__init__(f"expected wait {wait:.0f} s")
        self.wait = wait


class RedeliverLater(ProvisioningError):
    """Raised to make the Functions host deliver the message again after host.json's
    visibilityTimeout: the queue defers it, no function waits."""


class StatusStoreUnavailable(ProvisioningError):
    """The status table could not be read or written; the caller retries later."""


class KeyStoreUnavailable(ProvisioningError):
    """The table of remembered answers (shared/intake/idempotency.py) could not be read or written;
    nothing was acted on, the caller retries later."""


class SettingsError(ProvisioningError, RuntimeError):
    """Raised at start-up when configuration is missing or invalid; the message says what to fix and
    `settings` names the app settings involved (names only: safe to show to callers)."""

    def __init__(self, message: str, settings: list[str] | None = None):
        super().__init__(message)
        self.settings = settings or []


class SendDeadlinePassed(ProvisioningError):
    """The request was stopped right before its headers were written because its lease token may
    already be back in the pool (the caller stalled longer than the token's hold). Nothing reached
    Graph; the call goes back on the queue without counting as an attempt."""

    def __init__(self, late_by: float):
        super().__init__(f"lease token deadline passed {late_by:.3f} s before the request could be written")
        self.late_by = late_by


@dataclass
class UploadFailed(ProvisioningError):
    code: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    permanent: bool = False  # retrying the same rows cannot succeed

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class GraphFailure(ProvisioningError):
    """A Graph call that did not succeed. Build one with `GraphFailure.of(kind, …)` to get the
    subclass that says what to do about it."""
    code: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    timing: SendTiming | None = None

    kind: Literal["transient", "permanent"] = "transient"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def transient(self) -> bool:
        return self.kind == "transient"

    @property
    def permanent(self) -> bool:
        return self.kind == "permanent"

    @property
    def throttled(self) -> bool:
        return isinstance(self, GraphThrottled)

    @staticmethod
    def of(kind: Literal["transient", "permanent"], code: str, message: str, status: int | None = None,
           retry_after: float | None = None, timing: SendTiming | None = None) -> "GraphFailure":
        cls = GraphPermanent if kind == "permanent" else GraphThrottled if status == 429 else GraphTransient
        return cls(code, message, status, retry_after, timing)


@dataclass
class GraphTransient(GraphFailure):
    kind: Literal["transient", "permanent"] = "transient"


@dataclass
class GraphThrottled(GraphTransient):
    kind: Literal["transient", "permanent"] = "transient"


@dataclass
class GraphPermanent(GraphFailure):
    kind: Literal["transient", "permanent"] = "permanent"


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
