"""Calls Microsoft Graph provisionOnDemand and says what a failure means: retry later or give up."""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Literal, Mapping
from urllib.parse import quote

import httpx
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError

from shared.errors import GraphFailure, SendDeadlinePassed
from shared.graph.retry_policy import parse_retry_after
from shared.models import GraphKeyValue, WorkItem
from shared.settings import Settings

log = logging.getLogger(__name__)
Kind = Literal["transient", "permanent"]

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


# Every exception httpx raises (https://www.python-httpx.org/exceptions), most specific first:
# (kind, code, what it means for the call). "may have acted" = the request was complete on the
# wire, so Graph may already have provisioned the subject: the retry is safe (provisionOnDemand
# of an unchanged subject answers Skipped/RedundantExport), but the result must not pretend
# nothing happened.
TRANSPORT_FAILURES: tuple[tuple[type[Exception], Kind, str, str], ...] = (
    (httpx.ConnectTimeout, "transient", "Timeout", "no connection to Graph in time; nothing was sent"),
    (httpx.PoolTimeout, "transient", "Timeout", "no free connection in time; nothing was sent"),
    (httpx.WriteTimeout, "transient", "Timeout", "the request could not be sent in time; Graph did not get all of it"),
    (httpx.ReadTimeout, "transient", "Timeout", "Graph did not answer in time; it may have acted"),
    (httpx.ConnectError, "transient", "ConnectionError", "could not connect to Graph; nothing was sent"),
    (httpx.WriteError, "transient", "ConnectionError", "the connection failed while sending; Graph did not get all of it"),
    (httpx.ReadError, "transient", "ConnectionError", "the connection failed before Graph answered; it may have acted"),
    (httpx.CloseError, "transient", "ConnectionError", "the connection failed while closing; Graph may have acted"),
    (httpx.RemoteProtocolError, "transient", "ConnectionError",
     "Graph (or a proxy) broke the HTTP protocol before answering; it may have acted"),
    (httpx.ProxyError, "transient", "ConnectionError", "the proxy refused the connection; nothing was sent"),
    (httpx.TimeoutException, "transient", "Timeout", "Graph did not answer in time; it may have acted"),
    (httpx.NetworkError, "transient", "ConnectionError", "the connection failed; Graph may have acted"),
    # Ours, not Graph's: the same request would fail the same way again.
    (httpx.LocalProtocolError, "permanent", "InvalidGraphRequest", "the request could not be written as valid HTTP"),
    (httpx.UnsupportedProtocol, "permanent", "InvalidGraphEndpoint", "GRAPH_ENDPOINT's scheme is not http or https"),
    (httpx.InvalidURL, "permanent", "InvalidGraphEndpoint", "the Graph URL is not valid"),
    (httpx.TooManyRedirects, "permanent", "InvalidGraphEndpoint", "Graph's answers redirected in a loop"),
    (httpx.DecodingError, "transient", "InvalidGraphResponse", "Graph's answer could not be decoded"),
    (httpx.TransportError, "transient", "ConnectionError", "the connection to Graph failed; Graph may have acted"),
    (httpx.HTTPError, "permanent", "GraphClientError", "the HTTP client failed"),
    (httpx.StreamError, "permanent", "GraphClientError", "the HTTP client misused a stream"),
    (httpx.CookieConflict, "permanent", "GraphClientError", "the HTTP client found conflicting cookies"),
)
HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, httpx.CookieConflict)
# A 200 whose body is larger than this is not the documented envelope: keep its start only.
MAX_RAW_ANSWER_CHARS = 64 * 1024


def transport_failure(exc: Exception, timing: SendTiming | None = None) -> GraphFailure:
    """The GraphFailure for an exception raised while a request was being sent or answered."""
    for cls, kind, code, meaning in TRANSPORT_FAILURES:
        if isinstance(exc, cls):
            return GraphFailure.of(kind, code, f"{type(exc).__name__}: {meaning}", timing=timing)
    raise exc


def _unreadable(text: str, why: str) -> GraphKeyValue:
    log.warning("Graph answered 200 with %s; the call is reported as Unknown, not retried", why)
    return GraphKeyValue(body=text[:MAX_RAW_ANSWER_CHARS], problem=why)


def _content(response: httpx.Response) -> bytes:
    """The decoded body; raises DecodingError with the raw bytes kept on it, or a transport error."""
    if response.is_stream_consumed:  # a transport may hand over a response it has read already
        return response.content
    raw = b"".join(response.iter_raw())
    try:
        return httpx.Response(response.status_code, headers=response.headers, content=raw).content
    except httpx.DecodingError as exc:
        exc.raw = raw  # type: ignore[attr-defined]
        raise


def _answer_of(response: httpx.Response, timing: SendTiming) -> GraphKeyValue:
    """Graph's answer to a call whose request went out. Any status but 200 raises the classified
    failure. A 200 is never an error: Graph has acted, so a retry would act twice. A 200 body that
    cannot be read (cut off, corrupt Content-Encoding, not the key/value envelope) is returned
    with the raw text, for a result of Unknown."""
    try:
        content = _content(response)
    except HTTPX_ERRORS as exc:
        raw = getattr(exc, "raw", b"")
        if response.status_code == 200:
            return _unreadable(raw.decode("utf-8", "replace"), f"a body that could not be read ({type(exc).__name__})")
        if not isinstance(exc, httpx.DecodingError):
            raise transport_failure(exc, timing) from None
        content = raw
    if response.status_code != 200:
        plain = {k: v for k, v in response.headers.items() if k.lower() != "content-encoding"}
        failure = classify(httpx.Response(response.status_code, headers=plain, content=content))
        failure.timing = timing
        raise failure
    text = content.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return _unreadable(text, "a body that is not JSON")
    if not (isinstance(document, dict) and all(isinstance(document.get(f), (str, type(None))) for f in ("key", "value"))):
        return _unreadable(text, "a body that is not the documented {key, value} pair of strings")
    return GraphKeyValue(key=document.get("key"), value=document.get("value"))


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
        request = self._http.build_request("POST", path, json=item.graph_body(), headers=headers,
                                           extensions={"trace": timing.trace})
        try:
            response = self._http.send(request, stream=True)
        except HTTPX_ERRORS as exc:
            raise transport_failure(exc, timing) from None
        try:
            return _answer_of(response, timing)
        finally:
            response.close()

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

    def read(self, path: str, token: str, params: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None) -> dict:
        """GET a directory resource (e.g. /v1.0/users?$filter=...): a read, never a provisionOnDemand call."""
        return _json_object(self._job_request("GET", path, token, params=params, headers=headers))

    def _job_request(self, method: str, path: str, token: str, ok: tuple[int, ...] = (200,),
                     params: Mapping[str, str] | None = None,
                     headers: Mapping[str, str] | None = None) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params,
                                          headers={**(headers or {}), "Authorization": f"Bearer {token}"})
        except HTTPX_ERRORS as exc:
            raise transport_failure(exc) from None
        if response.status_code not in ok:
            raise classify(response)
        return response

    def close(self) -> None:
        self._http.close()
