"""Intake: turn an HTTP body or a queue message into work items, one per Graph call.

Both doors share one validation path. A body is (a) a Graph provisionOnDemand body, (b) a compact
event, or (c) a JSON array of those; a bulk post is accepted or rejected as a whole.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pydantic import ValidationError

from shared.errors import RequestRejected, validation_details
from shared.models import (
    MAX_GROUP_MEMBERS_PER_CALL,
    CompactEvent,
    GraphBodyEvent,
    GraphSubject,
    Subject,
    SubjectName,
    WorkItem,
    utcnow,
)
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.intake.names import NameResolver

log = logging.getLogger(__name__)

MAX_ITEMS_PER_POST = 1000
JSON_MEDIA_TYPES = ("application/json", "text/json", "text/plain")


@dataclass
class AcceptedRequest:
    requestId: str
    correlationId: str | None
    priority: str = "normal"
    items: list[WorkItem] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"requestId": self.requestId, "correlationId": self.correlationId, "calls": len(self.items),
                "priority": self.priority}


def decode_queue_text(raw: bytes | str) -> str:
    """Queue messages arrive as plain JSON (Logic Apps) or base64 of it (Functions/SDK default)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        # Unhandled, this would be retried five times and land in -poison without a reason.
        raise RequestRejected(400, "InvalidEncoding", "message is not UTF-8 text") from None
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        return stripped
    try:
        decoded = base64.b64decode(stripped, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise RequestRejected(400, "InvalidMessage", "message is neither JSON nor base64-encoded JSON") from None
    if not decoded.startswith(("{", "[")):
        raise RequestRejected(400, "InvalidMessage", "base64 message does not contain a JSON object or array")
    return decoded


def parse_body(text: str) -> list[GraphBodyEvent | CompactEvent]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestRejected(400, "InvalidJson", f"body is not valid JSON: {exc}") from None
    is_bulk = isinstance(document, list)
    entries = document if is_bulk else [document]
    if not entries:
        raise RequestRejected(422, "EmptyRequest", "the array holds no events")
    if len(entries) > MAX_ITEMS_PER_POST:
        raise RequestRejected(413, "TooManyItems", f"at most {MAX_ITEMS_PER_POST} events per post, got {len(entries)}")
    events, problems = [], []
    for index, entry in enumerate(entries):
        prefix = f"[{index}]" if is_bulk else ""
        if not isinstance(entry, dict):
            problems.append({"field": prefix or "(body)", "message": "each event must be a JSON object"})
            continue
        model = GraphBodyEvent if "parameters" in entry else CompactEvent
        try:
            events.append(model.model_validate(entry))
        except ValidationError as exc:
            problems.extend(validation_details(exc, prefix))
    if problems:
        raise RequestRejected(422, "ValidationFailed", "the request does not describe subjects we can provision", problems)
    return events


def _resolve(value: str | None, default: str | None, field_name: str, setting: str, prefix: str) -> str:
    if value:
        return value
    if default:
        return default
    raise RequestRejected(422, "ValidationFailed", f"{field_name} is missing and {setting} is not set",
                          [{"field": f"{prefix}{field_name}", "message": f"give {field_name} or set {setting}"}])


def _subject_calls(subject: GraphSubject, field: str, names: NameResolver | None) -> list[Subject]:
    name = subject.subject_name()
    object_id = subject.objectId or _object_id_for(subject.objectTypeName, name, field, names)
    links = subject.links
    members = [m.objectId for m in links.members] if links else []
    # Manager and owners are sent as given, with every call for the subject, so each call stands alone.
    base = Subject(objectId=object_id, objectTypeName=subject.objectTypeName, name=name,
                   manager=links.manager.objectId if links and links.manager else None,
                   owners=[o.objectId for o in links.owners] if links and links.owners else None)
    if not members:
        return [base]
    # Graph takes one group with at most five members per call; larger groups become consecutive calls.
    return [base.model_copy(update={"members": members[i:i + MAX_GROUP_MEMBERS_PER_CALL]})
            for i in range(0, len(members), MAX_GROUP_MEMBERS_PER_CALL)]


def _object_id_for(type_name: str, name: SubjectName | None, field: str, names: NameResolver | None) -> str:
    assert name is not None, "the model lets no subject through without objectId or a name"
    if names is None:
        raise RequestRejected(422, "ValidationFailed", f"{name.property} cannot be resolved here; send objectId",
                              [{"field": field, "message": "send objectId"}])
    return names.object_id(type_name, name, field)


def _target(event: GraphBodyEvent | CompactEvent, settings: Settings, prefix: str,
            names: NameResolver | None) -> tuple[str, str]:
    """(servicePrincipalId, jobId): as given, from `application` through the directory, or the defaults."""
    if event.application is None or names is None:
        if event.application is not None:
            raise RequestRejected(422, "ValidationFailed", "application cannot be resolved here; send servicePrincipalId",
                                  [{"field": f"{prefix}application", "message": "send servicePrincipalId"}])
        return (_resolve(event.servicePrincipalId, settings.default_service_principal_id, "servicePrincipalId",
                         "DEFAULT_SERVICE_PRINCIPAL_ID", prefix),
                _resolve(event.jobId, settings.default_job_id, "jobId", "DEFAULT_JOB_ID", prefix))
    if event.servicePrincipalId is not None:
        raise RequestRejected(422, "ValidationFailed", "give application or servicePrincipalId, not both",
                              [{"field": f"{prefix}application", "message": "give one of the two"}])
    sp = names.service_principal(event.application, f"{prefix}application")
    return sp, event.jobId or names.job(sp, f"{prefix}application")


# (servicePrincipalId, jobId, subject, field path) -> ruleId; raises RequestRejected (shared/intake/rule_discovery.py).
RuleLookup = Callable[[str, str, Subject, str], str]


def plan(event: GraphBodyEvent | CompactEvent, settings: Settings, index: int | None = None,
         received_at: datetime | None = None, rules: RuleLookup | None = None,
         names: NameResolver | None = None, request_id: str | None = None) -> AcceptedRequest:
    prefix = f"[{index}]." if index is not None else ""
    sp, job = _target(event, settings, prefix, names)
    if isinstance(event, CompactEvent):
        triples = [(event.ruleId, event.as_subject(), "ruleId", prefix.rstrip("."))]
    else:
        triples = [(p.ruleId, s, f"parameters[{i}].ruleId", f"{prefix}parameters[{i}].subjects[{j}]")
                   for i, p in enumerate(event.parameters) for j, s in enumerate(p.subjects)]
    accepted = AcceptedRequest(requestId=request_id or str(uuid.uuid4()), correlationId=event.correlationId,
                               priority=event.priority)

    def rule_for(rule: str | None, call: Subject, name: str) -> str:
        if rule or settings.default_rule_id or rules is None:
            return _resolve(rule, settings.default_rule_id, name, "DEFAULT_RULE_ID", prefix)
        return rules(sp, job, call, f"{prefix}{name}")

    calls = [(rule_for(rule, call, name), call) for rule, subject, name, where in triples
             for call in _subject_calls(subject, where or "(body)", names)]
    received_at = received_at or utcnow()
    accepted.items = [WorkItem(requestId=accepted.requestId, correlationId=event.correlationId,
                               servicePrincipalId=sp, jobId=job, ruleId=rule, subject=subject,
                               callIndex=i, callCount=len(calls), receivedAt=received_at,
                               priority=event.priority, callbackUrl=event.callbackUrl)
                      for i, (rule, subject) in enumerate(calls)]
    return accepted


def calls_of(event: GraphBodyEvent | CompactEvent) -> int:
    """How many Graph calls an event becomes (a group's members go five to a call), before any
    rule is looked up: the bound is checked before the post costs anything."""
    subjects = [event.as_subject()] if isinstance(event, CompactEvent) else [
        s for p in event.parameters for s in p.subjects]
    return sum(max(1, -(-len(s.links.members if s.links else []) // MAX_GROUP_MEMBERS_PER_CALL)) for s in subjects)


def check_call_count(events: list[GraphBodyEvent | CompactEvent], settings: Settings) -> None:
    # 100 parameters of 100 subjects fit in one body; each call takes a slot of the shared timeline
    # (about 2 s at 5 calls per 10 s), so one post could otherwise fill hours for every caller.
    total = sum(calls_of(e) for e in events)
    if total > settings.max_calls_per_post:
        raise RequestRejected(413, "TooManyCalls",
                              f"this post would make {total} Graph calls; the limit is {settings.max_calls_per_post} "
                              "per post (MAX_CALLS_PER_POST): split it into smaller posts",
                              [{"calls": total, "limit": settings.max_calls_per_post}])


# requestIds of queue messages: uuid5 names under this namespace (a fixed, random GUID).
MESSAGE_NAMESPACE = uuid.UUID("5f0c4b9e-3d5a-4f51-9a49-1f0e6d2c7a11")


def message_request_id(message_id: str, index: int) -> str:
    """The requestId of the index-th event of a queue message: the same on every delivery, so a
    redelivered message is recognised as the same requests (shared/status/admission.py)."""
    return str(uuid.uuid5(MESSAGE_NAMESPACE, f"{message_id}/{index}"))


def accept(text: str, settings: Settings, rules: RuleLookup | None = None,
           names: NameResolver | None = None, message_id: str | None = None) -> list[AcceptedRequest]:
    """The requests of a body; their ids are derived from `message_id` when given (the queue door),
    random otherwise."""
    events = parse_body(text)
    check_call_count(events, settings)
    bulk = len(events) > 1 or text.lstrip().startswith("[")
    return [plan(e, settings, i if bulk else None, rules=rules, names=names,
                 request_id=message_request_id(message_id, i) if message_id else None)
            for i, e in enumerate(events)]


def check_http_request(body: bytes, headers: Mapping[str, str], settings: Settings) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    media_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
        raise RequestRejected(415, "UnsupportedMediaType",
                              f"send JSON with Content-Type: application/json (got {media_type!r})")
    if len(body) > settings.max_body_bytes:
        raise RequestRejected(413, "PayloadTooLarge",
                              f"body is {len(body)} bytes; the limit is {settings.max_body_bytes} (MAX_BODY_BYTES)")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected(400, "InvalidEncoding", "body must be UTF-8 encoded JSON") from None
