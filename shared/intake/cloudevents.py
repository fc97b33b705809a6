"""CloudEvents 1.0 over HTTP: the three content modes of the HTTP protocol binding
(https://github.com/cloudevents/spec/blob/v1.0/http-protocol-binding.md):

  structured  Content-Type: application/cloudevents+json, the event as one JSON object;
  batched     Content-Type: application/cloudevents-batch+json, a JSON array of such objects;
  binary      the attributes as `ce-*` headers, the body is `data` (Content-Type: application/json).

`data` is one of our two body shapes (a Graph provisionOnDemand body or a compact event). Each event
becomes one request; `source` + `id` identify the event (CloudEvents 1.0 core spec, "id"), so they
give its idempotency key, and `type`, `subject`, `source` and `id` travel into every result.

Azure Event Grid, with the CloudEvents schema, first proves that the endpoint wants its events with
the CloudEvents v1.0 abuse-protection handshake: an OPTIONS request carrying WebHook-Request-Origin,
answered with WebHook-Allowed-Origin (https://learn.microsoft.com/azure/event-grid/end-point-validation-cloud-events-schema).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import RequestRejected
from shared.intake.validation import AcceptedRequest
from shared.models import CloudEventRef
from shared.replies import HttpReply

STRUCTURED = "application/cloudevents+json"
BATCHED = "application/cloudevents-batch+json"
BINARY_PREFIX = "ce-"
REQUIRED = ("id", "source", "type")
MAX_EVENTS_PER_BATCH = 1000  # as MAX_ITEMS_PER_POST: one event is one request
ORIGIN_RE = re.compile(r"[A-Za-z0-9*][A-Za-z0-9.*-]{0,252}(:[0-9]{1,5})?")
RATE_RE = re.compile(r"[0-9]{1,9}|\*")
# An attribute is a short string (spec: "non-empty string"); the bound keeps results small.
Attribute = Field(min_length=1, max_length=512)


class CloudEvent(BaseModel):
    """One event as it arrives; extension attributes are allowed (the spec permits them) and ignored."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    specversion: str
    id: str = Attribute
    source: str = Attribute
    type: str = Attribute
    subject: str | None = Field(None, max_length=512)
    datacontenttype: str | None = None
    data: Any = None

    def ref(self) -> CloudEventRef:
        return CloudEventRef(type=self.type, subject=self.subject, source=self.source, id=self.id)


def cloudevent_idempotency_key(event: CloudEventRef) -> str:
    """The Idempotency-Key an event stands for: source + id, hashed so that any characters and
    lengths the spec allows fit a header-sized key."""
    digest = hashlib.sha256(json.dumps([event.source, event.id]).encode("utf-8")).hexdigest()
    return f"cloudevent-{digest}"


def batch_idempotency_key(keys: list[str]) -> str:
    """A batch's key: its events' keys in order, hashed (the same batch retried is the same key)."""
    return "cloudevents-" + hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def media_type(headers: Mapping[str, str]) -> str:
    return _lowered(headers).get("content-type", "").split(";")[0].strip().lower()


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def is_cloudevent(headers: Mapping[str, str]) -> bool:
    return media_type(headers) in (STRUCTURED, BATCHED) or f"{BINARY_PREFIX}specversion" in _lowered(headers)


def _invalid(field: str, message: str) -> RequestRejected:
    return RequestRejected(422, "InvalidCloudEvent", f"not a CloudEvents 1.0 event: {field}: {message}",
                           [{"field": field, "message": message}])


def _check_attributes(raw: dict[str, Any], where: str) -> None:
    for name in ("specversion", *REQUIRED):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise _invalid(f"{where}{name}", f"the required attribute {name!r} is missing or not a non-empty string")
    if raw["specversion"].strip() != "1.0":
        raise _invalid(f"{where}specversion", f"only specversion '1.0' is accepted, got {raw['specversion']!r}")
    if "data_base64" in raw:
        raise _invalid(f"{where}data_base64", "data must be JSON (one of the request shapes), not base64")


def _event(raw: Any, where: str) -> CloudEvent:
    if not isinstance(raw, dict):
        raise _invalid(where or "(body)", "an event must be a JSON object")
    _check_attributes(raw, where)
    try:
        event = CloudEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        raise _invalid(f"{where}{'.'.join(str(p) for p in first['loc'])}", first["msg"]) from None
    kind = (event.datacontenttype or "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise _invalid(f"{where}datacontenttype", f"data must be application/json, got {kind!r}")
    if not isinstance(event.data, dict):
        raise _invalid(f"{where}data", "data must be a JSON object: a Graph provisionOnDemand body or a compact event")
    return event


def _from_headers(text: str, headers: Mapping[str, str]) -> CloudEvent:
    lowered = _lowered(headers)
    attributes: dict[str, Any] = {k[len(BINARY_PREFIX):]: v for k, v in lowered.items() if k.startswith(BINARY_PREFIX)}
    attributes["datacontenttype"] = lowered.get("content-type") or None
    try:
        attributes["data"] = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestRejected(400, "InvalidJson", f"body (the event's data) is not valid JSON: {exc}") from None
    return _event(attributes, BINARY_PREFIX)


def _documents(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestRejected(400, "InvalidJson", f"body is not valid JSON: {exc}") from None


def unwrap(text: str, headers: Mapping[str, str]) -> list[CloudEvent]:
    """The events of a CloudEvents request, in order; RequestRejected (422 naming the attribute)
    for anything the spec or our request shapes do not allow."""
    kind = media_type(headers)
    if kind == BATCHED:
        batch = _documents(text)
        if not isinstance(batch, list) or not batch:
            raise _invalid("(body)", "a batch must be a non-empty JSON array of events")
        if len(batch) > MAX_EVENTS_PER_BATCH:
            raise RequestRejected(413, "TooManyItems", f"at most {MAX_EVENTS_PER_BATCH} events per batch, got {len(batch)}")
        return [_event(raw, f"[{i}].") for i, raw in enumerate(batch)]
    if kind == STRUCTURED:
        return [_event(_documents(text), "")]
    return [_from_headers(text, headers)]


def data_text(events: list[CloudEvent], headers: Mapping[str, str]) -> str:
    """What the shared intake path validates: the data of one event, or an array for a batch (so
    that errors carry the event's index)."""
    datas = [e.data for e in events]
    return json.dumps(datas if media_type(headers) == BATCHED else datas[0])


def abuse_protection(headers: Mapping[str, str]) -> HttpReply:
    """The OPTIONS handshake: consent to deliveries from the origin that asks. The function key
    still guards the POSTs; this only tells the sender the endpoint expects them."""
    lowered = _lowered(headers)
    origin = (lowered.get("webhook-request-origin") or "").strip()
    # A DNS expression (eventemitter.example.com); it is echoed in a header, so nothing else passes.
    if not ORIGIN_RE.fullmatch(origin):
        return HttpReply(400, {"error": {"code": "InvalidWebHookRequestOrigin",
                                         "message": "OPTIONS on this endpoint is the CloudEvents abuse-protection "
                                                    "handshake: send WebHook-Request-Origin with the sender's DNS name",
                                         "details": [{"field": "WebHook-Request-Origin"}]}})
    allowed = {"WebHook-Allowed-Origin": origin, "Allow": "POST, OPTIONS"}
    # Events are queued, never processed inline: any rate the sender asks for is fine.
    rate = (lowered.get("webhook-request-rate") or "").strip()
    if RATE_RE.fullmatch(rate):
        allowed["WebHook-Allowed-Rate"] = rate
    return HttpReply(200, {}, allowed)


def stamp(accepted: list[AcceptedRequest], events: list[CloudEvent]) -> list[AcceptedRequest]:
    """Each request with its event on every call, so that results carry it; intake keeps the
    order of its input, one request per event."""
    return [replace(request, items=[item.model_copy(update={"event": event.ref()}) for item in request.items])
            for request, event in zip(accepted, events, strict=True)]
