"""Results to Log Analytics through the Logs Ingestion API and a data collection rule (DCR).

The HTTP Data Collector API was retired on 2026-09-14; this is its replacement. The worker never
calls Azure Monitor: its sink puts each result on LOGS_QUEUE (cheap, same storage account as the
other queues), so an ingestion outage cannot slow or block provisioning. A queue-triggered
function takes one message, receives up to LOGS_BATCH_SIZE - 1 more from the same queue, and
uploads the rows in calls of at most 1 MB. A row that could not be uploaded goes back on the queue
as a new message, hidden for Retry-After (429) or a backoff, with its upload attempts counted; after
LOGS_MAX_ATTEMPTS it goes to the dead-letter queue with the reason. Nothing here sleeps.

Delivery is at least once (a crash between upload and delete repeats a row): ResultId is the
key queries deduplicate on. Rows are mapped when uploaded, from the queued result, so a change of
the mapping applies to rows still waiting.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, Sequence

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.queue import QueueClient, QueueMessage
from pydantic import BaseModel, ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import UploadFailed, validation_details
from shared.graph.retry_policy import backoff_seconds, parse_retry_after
from shared.models import ErrorInfo, ResultMessage
from shared.queues import MAX_MESSAGE_BYTES
from shared.results.sinks import QueueSink, fit_for_queue
from shared.settings import Settings

log = logging.getLogger(__name__)

# The API takes at most 1 MB per call. Counted as the SDK serialises a chunk (json.dumps with its
# default ", " separators), in decimal megabytes, so the SDK never splits one of our batches further.
MAX_CALL_BYTES = 1_000_000
# Extra messages stay hidden while this invocation uploads them; if it dies they come back then.
EXTRA_VISIBILITY_SECONDS = 300
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 60
# Room left in a queue message for the envelope around the result (attempts, last error).
ENVELOPE_ROOM = 2048
# A dead letter quotes its original inside a JSON string, where escaping can double its size.
DEAD_LETTER_ORIGINAL_BYTES = 24 * 1024
MAX_ERROR_TEXT = 500
SOURCE = "loganalytics"


class LogsEnvelope(BaseModel):
    """A result waiting on LOGS_QUEUE, with its failed upload attempts so far."""

    kind: Literal["logAnalyticsRow"] = "logAnalyticsRow"
    attempts: int = 0
    lastError: str | None = None
    result: ResultMessage


def envelope_text(result: ResultMessage, attempts: int = 0, last_error: str | None = None,
                  limit: int = MAX_MESSAGE_BYTES - ENVELOPE_ROOM) -> str:
    head: dict[str, Any] = {"kind": "logAnalyticsRow", "attempts": attempts}
    if last_error:
        head["lastError"] = last_error[:MAX_ERROR_TEXT]
    body = fit_for_queue(result, limit)
    return json.dumps(head)[:-1] + ', "result": ' + body + "}"


class LogsQueueSink(QueueSink):
    """The worker's Log Analytics sink: a queue write, never a call to Azure Monitor."""

    render = staticmethod(envelope_text)


# --- rows ---------------------------------------------------------------------------------------

def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_row(result: ResultMessage) -> dict[str, Any]:
    """One row of ProvisioningResults_CL (columns: infra/loganalytics/table.json). Absent values are
    left out rather than sent as null: the table stores them as empty either way."""
    duration = (result.completedAt - result.receivedAt).total_seconds() * 1000
    row: dict[str, Any] = {
        "TimeGenerated": _iso(result.completedAt),
        "ResultId": result.resultId,
        "RequestId": result.requestId,
        "CorrelationId": result.correlationId,
        "ServicePrincipalId": result.servicePrincipalId,
        "JobId": result.jobId,
        "RuleId": result.ruleId,
        "ObjectId": result.subject.objectId,
        "ObjectTypeName": result.subject.objectTypeName,
        "CallIndex": result.callIndex,
        "CallCount": result.callCount,
        "Result": result.result,
        "Verdict": result.verdict,
        "ReasonCode": result.reasonCode,
        "ErrorCode": result.errorCode,
        "ErrorMessage": result.errorMessage,
        "Action": result.action,
        "ChangeId": result.changeId,
        "ReportableIdentifier": result.reportableIdentifier,
        "Attempts": result.attempts,
        "DurationMs": max(0, round(duration)),
        "ReceivedAt": _iso(result.receivedAt),
        "Steps": [s.model_dump(exclude_none=True) for s in result.steps],
        "ModifiedProperties": [p.model_dump(exclude_none=True) for p in result.modifiedProperties],
        "Truncated": result.truncated,
        "Priority": result.priority,
        "CallsSaved": result.callsSaved,
        "ServedBy": result.servedBy,
    }
    return {k: v for k, v in row.items() if v is not None}


def row_bytes(row: dict[str, Any]) -> int:
    return len(json.dumps(row).encode("utf-8"))


def split_batches(sizes: Sequence[int], limit: int = MAX_CALL_BYTES) -> tuple[list[list[int]], list[int]]:
    """Indices grouped into calls whose JSON array stays within `limit` bytes, in order; and the
    indices of rows too big to send in any call."""
    batches: list[list[int]] = []
    oversize: list[int] = []
    current: list[int] = []
    used = 2  # "[]"
    for i, size in enumerate(sizes):
        if size + 2 > limit:
            oversize.append(i)
            continue
        extra = size + (2 if current else 0)  # ", " between items
        if current and used + extra > limit:
            batches.append(current)
            current, used, extra = [], 2, size
        current.append(i)
        used += extra
    if current:
        batches.append(current)
    return batches, oversize


# --- upload -------------------------------------------------------------------------------------

class Uploader(Protocol):
    def upload(self, rows: list[dict[str, Any]]) -> None:
        """Send the rows in one call; raise UploadFailed when it did not succeed."""


_STATUS_CODES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                 413: "PayloadTooLarge", 429: "TooManyRequests", 500: "InternalServerError",
                 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


def _service_error(exc: HttpResponseError) -> UploadFailed:
    status = exc.status_code
    response = exc.response
    code = _STATUS_CODES.get(status or 0, f"Http{status}" if status else "AuthenticationFailed")
    message = exc.message or str(exc)
    if response is not None:
        try:  # the service answers {"error": {"code", "message"}}; keep its words when it does
            error = json.loads(response.text() or "{}").get("error") or {}
            code, message = error.get("code") or code, error.get("message") or message
        except (ValueError, AttributeError):
            pass
    retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
    return UploadFailed(code, message.splitlines()[0][:MAX_ERROR_TEXT] if message else code, status, retry_after)


class IngestionUploader:
    """LogsIngestionClient with the app's managed identity. The SDK's own retries are off: a retry
    would sleep inside the function; ours go back on the queue instead."""

    def __init__(self, settings: Settings, credential, **client_kwargs: Any):
        from azure.monitor.ingestion import LogsIngestionClient

        self._rule_id = settings.logs_dcr_immutable_id
        self._stream = settings.logs_stream_name
        timeout = settings.logs_timeout_seconds
        self._client = LogsIngestionClient(
            settings.logs_ingestion_endpoint, credential, credential_scopes=[settings.logs_scope],
            retry_total=0, connection_timeout=timeout, read_timeout=timeout, **client_kwargs)

    def upload(self, rows: list[dict[str, Any]]) -> None:
        refused: list = []
        try:
            # on_error keeps the SDK from logging its own error line for a failure we log anyway.
            self._client.upload(self._rule_id, self._stream, rows, on_error=refused.append)
            if refused:
                raise refused[0].error
        except ClientAuthenticationError as exc:
            if exc.status_code == 401:
                raise _service_error(exc) from None
            # No token at all: the managed identity endpoint failed, not Azure Monitor.
            raise UploadFailed("AuthenticationFailed", str(exc).splitlines()[0][:MAX_ERROR_TEXT]) from None
        except HttpResponseError as exc:
            raise _service_error(exc) from None
        except ServiceResponseError as exc:
            code = "Timeout" if "timed out" in str(exc).lower() else "NoResponse"
            raise UploadFailed(code, f"no answer from the ingestion endpoint: {exc}"[:MAX_ERROR_TEXT]) from None
        except ServiceRequestError as exc:
            raise UploadFailed("ConnectionFailed", f"cannot reach the ingestion endpoint: {exc}"[:MAX_ERROR_TEXT]) from None
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the rows go back on the queue
            raise UploadFailed(type(exc).__name__, str(exc)[:MAX_ERROR_TEXT]) from None


_uploaders: dict[tuple, Uploader] = {}
_uploaders_lock = threading.Lock()


def uploader_for(settings: Settings) -> Uploader:
    """One client per process and configuration: it caches the token between invocations."""
    if not (settings.logs_ingestion_endpoint and settings.logs_dcr_immutable_id):
        raise UploadFailed("LogAnalyticsNotConfigured",
                           "rows are waiting on LOGS_QUEUE but LOGS_INGESTION_ENDPOINT / LOGS_DCR_IMMUTABLE_ID "
                           "are not set (was RESULTS_SINK changed back to queue?)")
    key = (settings.logs_ingestion_endpoint, settings.logs_dcr_immutable_id, settings.logs_stream_name,
           settings.logs_scope, settings.logs_timeout_seconds, settings.azure_client_id)
    with _uploaders_lock:
        uploader = _uploaders.get(key)
        if uploader is None:
            from shared.graph.credentials import app_credential

            uploader = _uploaders[key] = IngestionUploader(settings, app_credential(settings.azure_client_id))
        return uploader


def upload_rows(rows: list[dict[str, Any]], uploader: Uploader,
                limit: int = MAX_CALL_BYTES) -> dict[int, UploadFailed]:
    """Upload rows in calls of at most `limit` bytes; the failures by row index (empty: all sent).

    A call of several rows refused as a bad request (400/413) is split in halves and retried at
    once, so that one row the DCR refuses cannot keep the others out. Any other failure (throttled,
    down, no token) ends the invocation's calls: the remaining rows wait with the failed ones."""
    failed: dict[int, UploadFailed] = {}
    stopped: list[UploadFailed] = []
    batches, oversize = split_batches([row_bytes(r) for r in rows], limit)
    for i in oversize:
        failed[i] = UploadFailed("RowTooLarge", f"the row is {row_bytes(rows[i])} bytes, over the API's "
                                 f"{limit} bytes per call", permanent=True)

    def send(indices: list[int]) -> None:
        if stopped:
            failed.update({i: stopped[0] for i in indices})
            return
        try:
            uploader.upload([rows[i] for i in indices])
            return
        except UploadFailed as exc:
            failure = exc
        except Exception as exc:  # noqa: BLE001 - an unexpected error must not drop rows either
            failure = UploadFailed(type(exc).__name__, str(exc)[:MAX_ERROR_TEXT])
        if failure.status in (400, 413) and len(indices) > 1:
            half = len(indices) // 2
            send(indices[:half])
            send(indices[half:])
            return
        if failure.status == 413:  # one row, still too large: it never will fit
            failure.permanent = True
        if failure.status not in (400, 413):
            stopped.append(failure)
        failed.update({i: failure for i in indices})

    for batch in batches:
        send(batch)
    return failed


# --- the queue-triggered function ---------------------------------------------------------------

@dataclass
class _Pending:
    envelope: LogsEnvelope
    message: QueueMessage | None  # None: the trigger's own message, which the host deletes


def _parse(text: str, rt) -> LogsEnvelope | None:
    try:
        return LogsEnvelope.model_validate_json(text)
    except ValidationError as exc:
        info = ErrorInfo(code="InvalidLogsMessage", message="LOGS_QUEUE message is not a result envelope",
                         details=validation_details(exc))
        rt.queues.send_json(rt.settings.deadletter_queue,
                            dead_letter_for(info, SOURCE, text, limit=DEAD_LETTER_ORIGINAL_BYTES))
        log.error("LOGS_QUEUE message dead-lettered: not a result envelope")
        return None


def _receive_more(queue: QueueClient, count: int) -> list[QueueMessage]:
    if count <= 0:
        return []
    try:
        return list(queue.receive_messages(messages_per_page=min(32, count), max_messages=count,
                                           visibility_timeout=EXTRA_VISIBILITY_SECONDS))
    except AzureError as exc:  # batching is an optimisation: the trigger's message still goes
        log.warning("could not receive more LOGS_QUEUE messages: %s", exc)
        return []


def _delete(queue: QueueClient, message: QueueMessage | None) -> None:
    if message is None:
        return
    try:
        queue.delete_message(message)
    except AzureError as exc:
        # Its hiding time ran out and another instance has it (or it is gone): at worst a duplicate row.
        log.warning("could not delete LOGS_QUEUE message %s: %s", message.id, exc)


def _retry_later(pending: _Pending, failure: UploadFailed, rt) -> None:
    s = rt.settings
    env = pending.envelope
    attempts = env.attempts + 1
    if failure.permanent or attempts >= s.logs_max_attempts:
        why = failure.message if failure.permanent else f"gave up after {attempts} upload attempts: {failure.message}"
        info = ErrorInfo(code=failure.code, message=why,
                         details={"status": failure.status, "resultId": env.result.resultId,
                                  "queue": s.logs_queue, "stream": s.logs_stream_name})
        # Smaller than on the queue (step details go first), so that the letter itself fits in one message.
        original = envelope_text(env.result, attempts, str(failure), limit=DEAD_LETTER_ORIGINAL_BYTES - ENVELOPE_ROOM)
        rt.queues.send_json(s.deadletter_queue, dead_letter_for(
            info, SOURCE, original, limit=DEAD_LETTER_ORIGINAL_BYTES, requestId=env.result.requestId,
            attempts=attempts))
        log.error("row %s dead-lettered after %d upload attempt(s): %s", env.result.resultId, attempts, failure)
        return
    seconds = failure.retry_after if failure.retry_after is not None else backoff_seconds(
        attempts, s.retry_base_seconds, s.retry_max_seconds)
    delay = min(MAX_VISIBILITY_SECONDS, max(1, math.ceil(seconds)))
    rt.queues.send_text(s.logs_queue, envelope_text(env.result, attempts, str(failure)), delay=delay)
    log.warning("row %s not uploaded (%s), attempt %d, retrying in %d s", env.result.resultId, failure, attempts, delay)


def _collect(text: str, queue, batch_size: int, rt) -> list[_Pending]:
    """The trigger message and up to batch_size - 1 more; unreadable extras are deleted."""
    pending: list[_Pending] = []
    first = _parse(text, rt)
    if first is not None:
        pending.append(_Pending(first, None))
    for message in _receive_more(queue, batch_size - 1):
        envelope = _parse(message.content, rt)
        if envelope is None:
            _delete(queue, message)
        else:
            pending.append(_Pending(envelope, message))
    return pending


def _upload_pending(pending: list[_Pending], uploader: Uploader) -> dict[int, UploadFailed]:
    """Map and upload the rows in one call; returns the failure of each row that did not go."""
    rows, failed = [], {}
    for i, p in enumerate(pending):
        try:
            rows.append(to_row(p.envelope.result))
        except Exception as exc:  # noqa: BLE001 - a mapping bug must not hold up the other rows
            failed[i] = UploadFailed("RowMappingFailed", f"{type(exc).__name__}: {exc}", permanent=True)
            rows.append({})
    mapped = [i for i in range(len(pending)) if i not in failed]
    try:
        failures = upload_rows([rows[i] for i in mapped], uploader)
        failed.update({mapped[j]: f for j, f in failures.items()})
    except UploadFailed as failure:
        failed.update({i: failure for i in mapped})
    return failed


def upload_message(raw: bytes | str, rt, uploader: Uploader | None = None) -> None:
    """A message on LOGS_QUEUE (and up to LOGS_BATCH_SIZE - 1 more): upload, then settle each row.

    Returns normally whenever every row is either uploaded, re-queued or dead-lettered, so the host
    deletes the trigger message; only a storage failure while settling raises (the host then
    retries the trigger message and the extra messages reappear after EXTRA_VISIBILITY_SECONDS)."""
    s = rt.settings
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    queue = rt.queues.get(s.logs_queue)
    pending = _collect(text, queue, s.logs_batch_size, rt)
    if not pending:
        return
    failed = _upload_pending(pending, uploader or uploader_for(s))
    for i, p in enumerate(pending):
        if i in failed:
            _retry_later(p, failed[i], rt)
        _delete(queue, p.message)
    sent = len(pending) - len(failed)
    if sent:
        log.info("uploaded %d row(s) to %s", sent, s.logs_stream_name)
