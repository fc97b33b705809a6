"""Calls Microsoft Graph provisionOnDemand and says what a failure means: retry later or give up."""
from __future__ import annotations

import logging
import time
from typing import Callable
from urllib.parse import quote

import httpx
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError

from shared.errors import GraphFailure, SendDeadlinePassed
from shared.graph.retry_policy import parse_retry_after
from shared.models import GraphKeyValue, WorkItem
from shared.settings import Settings

log = logging.getLogger(__name__)

REQUIRED_ROLES_HINT = (
    "The app's managed identity needs the Microsoft Graph application permission "
    "Synchronization.ReadWrite.All, or Application.ReadWrite.OwnedBy with the identity added as an "
    "owner of the target service principal (the enterprise application, not only the app registration)."
)


class SendTiming:
    """When the request went onto the wire (local monotonic clock), from httpcore's trace events,
    and the last-moment check of the rate lease's deadline.

    The rate lease counts from the moment Graph could have received the call: the end of the body
    write. A call that failed before its headers started never reached Graph at all. httpcore calls
    the trace hook right before it writes the request headers, after any wait for a connection; a
    lease whose `send_by` has passed by then raises SendDeadlinePassed there, and nothing is written.
    """

    def __init__(self, on_sent: Callable[[float], None] | None = None, send_by: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.started: float | None = None
        self.sent: float | None = None
        self._on_sent = on_sent
        self._send_by = send_by
        self._clock = clock

    def trace(self, event: str, info: dict) -> None:
        if event.endswith("send_request_headers.started"):
            now = self._clock()
            if self._send_by is not None and now > self._send_by:
                raise SendDeadlinePassed(now - self._send_by)
            self.started = now
        elif event.endswith("send_request_body.complete") and self.sent is None:
            self.sent = self._clock()
            if self._on_sent is not None:
                self._on_sent(self.sent)


def provision_path(version: str, service_principal_id: str, job_id: str) -> str:
    # Every segment is percent-encoded in full, so no identifier can add path or query parts.
    return (f"/{quote(version, safe='.')}/servicePrincipals/{quote(service_principal_id, safe='')}"
            f"/synchronization/jobs/{quote(job_id, safe='')}/provisionOnDemand")


def job_path(version: str, service_principal_id: str, job_id: str) -> str:
    return provision_path(version, service_principal_id, job_id).removesuffix("/provisionOnDemand")


def _graph_error(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error") or {}
        return str(error.get("code") or f"HTTP{response.status_code}"), str(error.get("message") or "")
    except (ValueError, AttributeError):
        return f"HTTP{response.status_code}", response.text[:500]


def classify(response: httpx.Response) -> GraphFailure:
    status = response.status_code
    code, message = _graph_error(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429 or status == 408 or status >= 500:
        return GraphFailure.of("transient", code, message or f"Graph answered {status}", status, retry_after)
    if status == 403:
        message = f"{message} {REQUIRED_ROLES_HINT}".strip()
    elif status == 404:
        message = (f"{message} Check servicePrincipalId and jobId: the service principal or its "
                   "synchronization job was not found.").strip()
    return GraphFailure.of("permanent", code, message or f"Graph answered {status}", status)


def _json_object(response: httpx.Response) -> dict:
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise GraphFailure.of("transient", "InvalidGraphResponse", "Graph answered 200 with a body that is not a JSON object",
                           response.status_code)
    return document


class GraphClient:
    def __init__(self, settings: Settings, credential: TokenCredential, http: httpx.Client | None = None):
        self._settings = settings
        self._credential = credential
        self._http = http or httpx.Client(
            base_url=settings.graph_root,
            timeout=httpx.Timeout(settings.graph_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_keepalive_connections=20),
        )

    def token(self) -> str:
        """A Graph token; taken before a lease token so that a slow identity endpoint never holds capacity."""
        try:
            return self._credential.get_token(self._settings.graph_scope).token
        except (AzureError, OSError, ValueError) as exc:
            # The identity endpoint being down is an outage to wait out, not a reason to give up.
            raise GraphFailure.of("transient", "IdentityUnavailable",
                               f"could not get a managed identity token: {type(exc).__name__}") from None

    def provision_on_demand(self, item: WorkItem, token: str, timing: SendTiming) -> GraphKeyValue:
        path = provision_path(self._settings.graph_api_version, item.servicePrincipalId, item.jobId)
        headers = {"Authorization": f"Bearer {token}", "client-request-id": item.requestId,
                   "return-client-request-id": "true"}
        try:
            response = self._http.post(path, json=item.graph_body(), headers=headers,
                                       extensions={"trace": timing.trace})
        except httpx.TimeoutException:
            raise GraphFailure.of("transient", "Timeout", "Graph did not answer in time", timing=timing) from None
        except httpx.TransportError as exc:
            raise GraphFailure.of("transient", "ConnectionError", f"{type(exc).__name__} talking to Graph",
                               timing=timing) from None
        if response.status_code != 200:
            failure = classify(response)
            failure.timing = timing
            raise failure
        try:
            return GraphKeyValue.model_validate(response.json())
        except ValueError:
            raise GraphFailure.of("transient", "InvalidGraphResponse",
                               "Graph answered 200 with a body that is not a JSON object", 200, timing=timing) from None

    def get_job(self, service_principal_id: str, job_id: str, token: str) -> dict:
        """The synchronizationJob (status, schedule); raises GraphFailure like provision_on_demand."""
        path = job_path(self._settings.graph_api_version, service_principal_id, job_id)
        return _json_object(self._job_request("GET", path, token))

    def get_schema(self, service_principal_id: str, job_id: str, token: str) -> dict:
        """The job's synchronizationSchema (synchronizationRules hold the ruleIds provisionOnDemand takes)."""
        path = job_path(self._settings.graph_api_version, service_principal_id, job_id) + "/schema"
        return _json_object(self._job_request("GET", path, token))

    def start_job(self, service_principal_id: str, job_id: str, token: str) -> None:
        """POST .../start: resumes a paused job, clears quarantine. Callers must rate-limit it
        themselves (shared/graph/job_guard.py): Microsoft warns against calling it repeatedly."""
        path = job_path(self._settings.graph_api_version, service_principal_id, job_id) + "/start"
        self._job_request("POST", path, token, ok=(200, 202, 204))

    def _job_request(self, method: str, path: str, token: str, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        try:
            response = self._http.request(method, path, headers={"Authorization": f"Bearer {token}"})
        except httpx.TimeoutException:
            raise GraphFailure.of("transient", "Timeout", "Graph did not answer in time") from None
        except httpx.TransportError as exc:
            raise GraphFailure.of("transient", "ConnectionError", f"{type(exc).__name__} talking to Graph") from None
        if response.status_code not in ok:
            raise classify(response)
        return response

    def close(self) -> None:
        self._http.close()
