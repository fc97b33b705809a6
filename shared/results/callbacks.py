"""Callbacks: each result POSTed to the request's `callbackUrl`, signed, retried through a queue.

A callback URL makes this app send requests where a caller tells it to, so intake checks it
(`check_url`): https only, no user info, a host on CALLBACK_ALLOWED_HOSTS, and every address the
host resolves to public (loopback only with CALLBACK_ALLOW_LOOPBACK, for local development;
private, link-local, reserved and multicast never). Delivery checks again, since DNS answers change.

The worker, once a result is out, records the callback as pending and puts a CallbackMessage on
CALLBACK_QUEUE: the Graph call has ended and its lease token is back before any of this, so a
callback never delays or costs a Graph call. The `callback_delivery` function POSTs the result
with the inbound-webhook signature headers (shared/intake/signatures.py, WEBHOOK_HMAC_SECRET),
follows no redirects, and on failure puts the message back hidden for a backoff (queue
visibility: no function waits), dead-lettering it after CALLBACK_MAX_ATTEMPTS. Where each callback
stands is kept in CALLBACK_TABLE and shown by GET /api/provision/{requestId} (`callbacks`).
"""
from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from datetime import timedelta
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode
from pydantic import ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import RequestRejected
from shared.graph.retry_policy import backoff_seconds
from shared.intake.signatures import sign
from shared.models import (
    CallbackMessage,
    CallbackPhase,
    CallbackState,
    ErrorInfo,
    ResultMessage,
    utcnow,
)
from shared.queues import MAX_MESSAGE_BYTES
from shared.results.sinks import fit_for_queue
from shared.settings import Settings
from shared.tables import create_table, table_service

log = logging.getLogger(__name__)

# getaddrinfo(host, port, ...) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[..., list[tuple[Any, ...]]]
# Room for the URL and the envelope around the result text.
RESULT_LIMIT = MAX_MESSAGE_BYTES - 8 * 1024


def _refused(field: str, message: str) -> RequestRejected:
    return RequestRejected(422, "CallbackUrlRefused", f"callbackUrl refused: {message}",
                           [{"field": field, "message": message}])


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    return any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


def _address_problem(address: str, allow_loopback: bool) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_loopback:
        return None if allow_loopback else "is a loopback address"
    if ip.is_link_local:
        return "is a link-local address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return "is not a public address"
    return None


def _host_and_port(url: str, allowed: tuple[str, ...], field: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise _refused(field, "not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise _refused(field, "only https:// URLs are called back")
    if parts.username is not None or parts.password is not None:
        raise _refused(field, "user information in the URL is not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host or not _host_allowed(host, allowed):
        raise _refused(field, f"host {host!r} is not on CALLBACK_ALLOWED_HOSTS")
    return host, port


def check_url(url: str, settings: Settings, field: str = "callbackUrl",
              resolve: Resolver = socket.getaddrinfo) -> tuple[str, str]:
    """(host, a checked address) when a callback may go there; RequestRejected(422) naming why not.
    Delivery connects to that address: a DNS answer that changes after the check is never used."""
    allowed = settings.callback_hosts
    if not allowed:
        raise _refused(field, "callbacks are not enabled here (CALLBACK_ALLOWED_HOSTS is empty)")
    host, port = _host_and_port(url, allowed, field)
    try:
        addresses = {info[4][0] for info in resolve(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        raise _refused(field, f"host {host!r} does not resolve") from None
    for address in sorted(addresses):
        problem = _address_problem(address, settings.callback_allow_loopback)
        if problem:
            raise _refused(field, f"host {host!r} resolves to {address}, which {problem}")
    return host, sorted(addresses)[0]


def check_requests(urls: Iterable[tuple[str, str]], settings: Settings,
                   resolve: Resolver = socket.getaddrinfo) -> None:
    """Check each distinct (field, url) once, resolving each host once: a bulk post often names
    one receiver 1000 times."""
    seen: set[str] = set()
    answers: dict[tuple[str, int], list[tuple[Any, ...]]] = {}

    def resolve_once(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        if (host, port) not in answers:
            answers[(host, port)] = resolve(host, port, type=type)
        return answers[(host, port)]

    for field, url in urls:
        if url not in seen:
            check_url(url, settings, field, resolve_once)
            seen.add(url)


class CallbackLedger:
    """Where each callback stands: one row per result in CALLBACK_TABLE (PartitionKey requestId).
    Bookkeeping only: a write that fails is logged, and never stops or repeats a delivery."""

    def __init__(self, table: TableClient):
        self.table = table
        self._created = False

    @classmethod
    def connect(cls, settings: Settings) -> "CallbackLedger":
        return cls(table_service(settings).get_table_client(settings.callback_table))

    def record(self, request_id: str, state: CallbackState) -> None:
        try:
            if not self._created:
                create_table(self.table)
                self._created = True
            row = {"PartitionKey": request_id, "RowKey": state.resultId, "state": state.model_dump_json()}
            self.table.upsert_entity(row, mode=UpdateMode.REPLACE)
        except AzureError as exc:
            log.warning("callback state of %s not recorded: %s", state.resultId, type(exc).__name__)

    def states(self, request_id: str) -> list[CallbackState]:
        """What GET /api/provision/{requestId} shows; [] when none was asked for or the table is unreadable."""
        try:
            rows = self.table.query_entities("PartitionKey eq @id", parameters={"id": request_id})
            return sorted((CallbackState.model_validate_json(r["state"]) for r in rows), key=lambda s: s.resultId)
        except ResourceNotFoundError:  # no callback was ever asked for here
            return []
        except AzureError as exc:
            log.warning("callback states of %s not readable: %s", request_id, type(exc).__name__)
            return []


def _state(message: CallbackMessage, phase: CallbackPhase, **fields: Any) -> CallbackState:
    return CallbackState(resultId=message.resultId, state=phase, host=urlsplit(message.url).hostname or "",
                         attempts=message.attempts, updatedAt=utcnow(), **fields)


def schedule(results: list[tuple[ResultMessage, str | None]], queues: Any, ledger: CallbackLedger,
             settings: Settings) -> None:
    """After the results are out: one CallbackMessage per result whose request asked for a callback.
    Pending is recorded first, so that a quick delivery is never overwritten by it."""
    for result, url in results:
        if not url:
            continue
        message = CallbackMessage(url=url, resultId=result.resultId, requestId=result.requestId,
                                  result=fit_for_queue(result, RESULT_LIMIT))
        ledger.record(result.requestId, _state(message, "pending"))
        queues.send_json(settings.callback_queue, message)


def _pinned(url: str, address: str) -> tuple[str, str]:
    """(the URL with its host replaced by the checked address, the Host header it stood for)."""
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    return urlunsplit(parts._replace(netloc=f"{literal}:{parts.port or 443}")), parts.netloc


def _post(message: CallbackMessage, host: str, address: str, settings: Settings,
          client: httpx.Client) -> tuple[int | None, str | None]:
    """(HTTP status, None) when the receiver answered, (None, why) when it could not be reached.
    TLS still verifies the certificate for `host` (sent as SNI), though the connection goes to `address`."""
    body = message.result.encode("utf-8")
    url, netloc = _pinned(message.url, address)
    headers = {"Content-Type": "application/json", "User-Agent": "provision-on-demand-callback", "Host": netloc}
    if settings.webhook_hmac_secret:
        timestamp = str(int(time.time()))
        headers[settings.webhook_timestamp_header] = timestamp
        # The receiver checks it as we check inbound webhooks: method, its own path and query, body.
        target = urlsplit(message.url)
        headers[settings.webhook_signature_header] = sign(settings.webhook_hmac_secret, timestamp, body, "POST",
                                                          target.path or "/", dict(parse_qsl(target.query)))
    try:
        return client.post(url, content=body, headers=headers, extensions={"sni_hostname": host}).status_code, None
    except httpx.HTTPError as exc:
        return None, type(exc).__name__


def deliver(text: str, queues: Any, ledger: CallbackLedger, settings: Settings, client: httpx.Client,
            resolve: Resolver = socket.getaddrinfo) -> None:
    """One delivery attempt of a message from CALLBACK_QUEUE; never raises for the receiver's faults."""
    try:
        message = CallbackMessage.model_validate_json(text)
    except ValidationError:
        info = ErrorInfo(code="InvalidCallbackMessage", message="callback queue message is not a CallbackMessage")
        queues.send_json(settings.deadletter_queue, dead_letter_for(info, "callback", text))
        return
    message = message.model_copy(update={"attempts": message.attempts + 1})
    try:
        host, address = check_url(message.url, settings, resolve=resolve)
    except RequestRejected as refused:
        _give_up(message, refused.info, None, queues, ledger, settings)
        return
    status, error = _post(message, host, address, settings, client)
    if status is not None and 200 <= status < 300:
        ledger.record(message.requestId, _state(message, "delivered", lastStatus=status))
        return
    if status is not None and 300 <= status < 400:
        # Following would send the result to a host nobody checked.
        info = ErrorInfo(code="CallbackRedirected", message=f"the receiver answered {status}; redirects are not followed")
        _give_up(message, info, status, queues, ledger, settings)
        return
    why = error or f"the receiver answered {status}"
    if message.attempts >= settings.callback_max_attempts:
        info = ErrorInfo(code="CallbackFailed", message=f"gave up after {message.attempts} attempts: {why}")
        _give_up(message, info, status, queues, ledger, settings)
        return
    # Whole seconds: queue visibility has no finer step.
    delay = max(1, math.ceil(backoff_seconds(message.attempts, settings.retry_base_seconds, settings.retry_max_seconds)))
    ledger.record(message.requestId, _state(message, "retrying", lastStatus=status, lastError=why,
                                            nextAttemptAt=utcnow() + timedelta(seconds=delay)))
    queues.send_json(settings.callback_queue, message, delay=delay)
    log.info("callback of %s failed (%s), attempt %d, again in %d s", message.resultId, why, message.attempts, delay)


def _give_up(message: CallbackMessage, info: ErrorInfo, status: int | None, queues: Any, ledger: CallbackLedger,
             settings: Settings) -> None:
    log.warning("callback of %s dead-lettered: %s", message.resultId, info.code)
    ledger.record(message.requestId, _state(message, "failed", lastStatus=status, lastError=info.message))
    queues.send_json(settings.deadletter_queue, dead_letter_for(
        info, "callback", message.model_dump_json(), requestId=message.requestId, attempts=message.attempts))


def http_client(settings: Settings) -> httpx.Client:
    return httpx.Client(follow_redirects=False, timeout=httpx.Timeout(settings.callback_timeout_seconds))
