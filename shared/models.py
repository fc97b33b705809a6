"""Pydantic models for every edge: intake bodies, the internal work message, Graph's answer,
the result message and the dead-letter envelope."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# One RDN is attr=value; values may contain escaped commas ("\,") as AD allows.
DN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*=(?:[^,\\\x00-\x1f]|\\.)+(?:,\s*[A-Za-z][A-Za-z0-9-]*=(?:[^,\\\x00-\x1f]|\\.)+)*$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._#:-]{0,199}$")

ObjectTypeName = Literal["User", "user", "Group", "Worker"]
# "high" goes ahead of normal work within HIGH_PRIORITY_SHARE of the rate (shared/ratelimit/slot_timeline.py).
Priority = Literal["normal", "high"]
MAX_GROUP_MEMBERS_PER_CALL = 5  # Microsoft's documented limit for one on-demand request
MAX_MEMBERS_PER_REQUEST = 500

# Printable ASCII only: the value travels into logs and result messages, never into headers.
CorrelationId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]

OBJECT_ID_FORMS = {
    "User": (GUID_RE, "a GUID (the Entra ID user's object id)"),
    "Group": (GUID_RE, "a GUID (the Entra ID group's object id)"),
    "user": (DN_RE, "an AD distinguished name such as CN=Ada,OU=Staff,DC=corp,DC=example"),
    "Worker": (WORKER_ID_RE, "a Workday Worker ID (letters, digits, '.', '_' or '-', at most 64)"),
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _check_guid(value: str | None, field: str) -> str | None:
    if value is not None and not GUID_RE.match(value):
        raise ValueError(f"{field} must be a GUID (the service principal's object id)")
    return value


def _check_job(value: str | None) -> str | None:
    if value is not None and not JOB_ID_RE.match(value):
        raise ValueError("jobId must be a synchronization job id (letters, digits, '.', '_', '-')")
    return value


def _check_rule(value: str | None) -> str | None:
    if value is not None and not RULE_ID_RE.match(value):
        raise ValueError("ruleId must be a synchronization rule id such as 6c409270-...-7cf3ab6482fe or ...#V2")
    return value


def _check_object_id(object_id: str, type_name: str | None) -> str:
    if type_name is None:  # objectTypeName itself failed; its own error says why
        return object_id
    pattern, form = OBJECT_ID_FORMS[type_name]
    if not pattern.match(object_id):
        raise ValueError(f"objectId for objectTypeName {type_name!r} must be {form}")
    return object_id


def _check_members_allowed(has_members: bool, type_name: str | None) -> None:
    if has_members and type_name not in (None, "Group"):
        raise ValueError("members are only allowed when objectTypeName is 'Group'")


class Member(_Strict):
    objectId: str
    objectTypeName: Literal["User"] = "User"

    @field_validator("objectId")
    @classmethod
    def _guid(cls, v: str) -> str:
        if not GUID_RE.match(v):
            raise ValueError("a group member's objectId must be a GUID (an Entra ID user)")
        return v


class Links(_Strict):
    members: list[Member] = Field(default_factory=list, max_length=MAX_MEMBERS_PER_REQUEST)


class GraphSubject(_Strict):
    # objectTypeName comes first so that objectId can be checked against it.
    objectTypeName: ObjectTypeName
    objectId: str = Field(min_length=1, max_length=512)
    links: Links | None = None

    @field_validator("objectId")
    @classmethod
    def _object_id(cls, v: str, info: ValidationInfo) -> str:
        return _check_object_id(v, info.data.get("objectTypeName"))

    @field_validator("links")
    @classmethod
    def _links(cls, v: Links | None, info: ValidationInfo) -> Links | None:
        _check_members_allowed(bool(v and v.members), info.data.get("objectTypeName"))
        return v


class GraphParameter(_Strict):
    ruleId: str | None = None
    subjects: list[GraphSubject] = Field(min_length=1, max_length=100)

    _rule = field_validator("ruleId")(classmethod(lambda cls, v: _check_rule(v)))


class GraphBodyEvent(_Strict):
    """Shape (a): the Graph provisionOnDemand body, plus where to send it."""

    parameters: list[GraphParameter] = Field(min_length=1, max_length=100)
    servicePrincipalId: str | None = None
    jobId: str | None = None
    correlationId: CorrelationId | None = None
    priority: Priority = "normal"
    # Logic Apps and SDKs sometimes copy this annotation along; it carries no meaning here.
    odata_type: str | None = Field(None, alias="@odata.type")

    _sp = field_validator("servicePrincipalId")(classmethod(lambda cls, v: _check_guid(v, "servicePrincipalId")))
    _job = field_validator("jobId")(classmethod(lambda cls, v: _check_job(v)))


class CompactEvent(_Strict):
    """Shape (b): one subject in a flat event, as an HR system or webhook would send it."""

    objectTypeName: ObjectTypeName
    objectId: str = Field(min_length=1, max_length=512)
    ruleId: str | None = None
    servicePrincipalId: str | None = None
    jobId: str | None = None
    members: list[Member] | None = Field(None, max_length=MAX_MEMBERS_PER_REQUEST)
    correlationId: CorrelationId | None = None
    priority: Priority = "normal"

    _sp = field_validator("servicePrincipalId")(classmethod(lambda cls, v: _check_guid(v, "servicePrincipalId")))
    _job = field_validator("jobId")(classmethod(lambda cls, v: _check_job(v)))
    _rule = field_validator("ruleId")(classmethod(lambda cls, v: _check_rule(v)))

    @field_validator("objectId")
    @classmethod
    def _object_id(cls, v: str, info: ValidationInfo) -> str:
        return _check_object_id(v, info.data.get("objectTypeName"))

    @field_validator("members", mode="before")
    @classmethod
    def _member_shorthand(cls, v: Any) -> Any:
        # A bare string is shorthand for a user member.
        if isinstance(v, list):
            return [{"objectId": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[Member] | None, info: ValidationInfo) -> list[Member] | None:
        _check_members_allowed(bool(v), info.data.get("objectTypeName"))
        return v

    def as_subject(self) -> GraphSubject:
        links = Links(members=self.members) if self.members else None
        return GraphSubject(objectId=self.objectId, objectTypeName=self.objectTypeName, links=links)


class Subject(BaseModel):
    """The subject of one Graph call, as it appears in work and result messages."""

    objectId: str
    objectTypeName: ObjectTypeName
    members: list[str] | None = None


class Follower(BaseModel):
    """A call that joined an equal waiting call instead of making its own (shared/status/admission.py)."""

    requestId: str
    callIndex: int
    callCount: int
    correlationId: str | None = None
    receivedAt: datetime

    @property
    def call_id(self) -> str:
        return f"{self.requestId}:{self.callIndex}"


class WorkItem(BaseModel):
    """One Graph call to make: the message on the work queue."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["provisionOnDemand"] = "provisionOnDemand"
    requestId: str
    correlationId: str | None = None
    servicePrincipalId: str
    jobId: str
    ruleId: str
    subject: Subject
    callIndex: int = 0
    callCount: int = 1
    attempts: int = 0  # Graph calls made for this item so far
    deferrals: int = 0  # times it was put back to wait (capacity, throttling, outages)
    notBefore: float | None = None  # booked slot, epoch seconds (see shared/ratelimit/slot_timeline.py)
    receivedAt: datetime
    priority: Priority = "normal"
    displaced: int = 0  # times it found no token at its slot; the second time it moves to the high lane
    # Coalescing (shared/status/): the equal-call group; while this call leads it, the etag of its open
    # row as intake opened it (None: a call outside any group); the calls that joined, once the group
    # was closed. Set on copies by the status store, never in place.
    coalesceKey: str | None = None
    openEtag: str | None = None
    followers: list[Follower] = Field(default_factory=list)

    @property
    def call_id(self) -> str:
        return f"{self.requestId}:{self.callIndex}"

    @property
    def lane(self) -> Priority:
        return "high" if self.priority == "high" or self.displaced >= 2 else "normal"

    def graph_body(self) -> dict[str, Any]:
        subject: dict[str, Any] = {"objectId": self.subject.objectId, "objectTypeName": self.subject.objectTypeName}
        if self.subject.members:
            subject["links"] = {"members": [{"objectId": m, "objectTypeName": "User"} for m in self.subject.members]}
        return {"parameters": [{"ruleId": self.ruleId, "subjects": [subject]}]}


class GraphKeyValue(BaseModel):
    """Graph's stringKeyStringValuePair: both fields are JSON documents encoded as strings."""

    model_config = ConfigDict(extra="ignore")

    key: str | None = None
    value: str | None = None


class Step(BaseModel):
    name: str | None = None
    type: str | None = None
    status: str | None = None
    description: str | None = None
    timestamp: str | None = None
    details: dict[str, Any] | None = None


class ModifiedProperty(BaseModel):
    displayName: str | None = None
    oldValue: str | None = None
    newValue: str | None = None


class Identity(BaseModel):
    id: str | None = None
    type: str | None = None
    displayName: str | None = None


class System(BaseModel):
    id: str | None = None
    name: str | None = None


class Outcome(BaseModel):
    """What one provisionOnDemand answer means, decoded from its nested JSON strings."""

    result: str
    errorCode: str | None = None
    errorMessage: str | None = None
    action: str | None = None
    changeId: str | None = None
    reportableIdentifier: str | None = None
    startTime: str | None = None
    endTime: str | None = None
    statusInfo: dict[str, Any] | None = None
    sourceIdentity: Identity | None = None
    targetIdentity: Identity | None = None
    sourceSystem: System | None = None
    targetSystem: System | None = None
    steps: list[Step] = Field(default_factory=list)
    modifiedProperties: list[ModifiedProperty] = Field(default_factory=list)
    rawKey: str | None = None
    rawValue: str | None = None


class JobStatus(BaseModel):
    """The synchronization job's state, read when a call failed in a way that points at the job."""

    code: str  # Graph's status.code (Active, Paused, Quarantine, ...), or NotFound / Unknown
    quarantineReason: str | None = None  # status.quarantine.reason, e.g. EncounteredQuarantineException
    quarantineError: dict[str, Any] | None = None  # status.quarantine.error {code, message, ...}
    detail: str | None = None  # why the status could not be read, when it could not
    # AUTO_START_QUARANTINED_JOB: "started", "cooldown" (another call started it recently),
    # "failed: <code>"; absent when no start was considered.
    autoStart: str | None = None


RESULT_SCHEMA_VERSION = 1


class ResultMessage(Outcome):
    """One message on the results queue per Graph call (or per call that could not be made)."""

    schemaVersion: int = RESULT_SCHEMA_VERSION
    resultId: str  # requestId:callIndex - the key a consumer deduplicates on
    requestId: str
    correlationId: str | None = None
    servicePrincipalId: str
    jobId: str
    ruleId: str
    subject: Subject
    callIndex: int
    callCount: int
    attempts: int
    receivedAt: datetime
    completedAt: datetime
    truncated: bool = False
    priority: Priority = "normal"
    callsSaved: int = 0  # other requests this call served (coalescing): Graph calls not made
    servedBy: str | None = None  # the resultId of the call that served this request, when coalesced
    jobStatus: JobStatus | None = None  # only when the failure pointed at the job (shared/graph/job_guard.py)


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | dict[str, Any] | None = None


class DeadLetter(BaseModel):
    """What lands on the dead-letter queue: the original message and why it was given up on."""

    reason: ErrorInfo
    source: str
    original: str
    originalTruncated: bool = False
    requestId: str | None = None
    attempts: int | None = None
    deadLetteredAt: datetime = Field(default_factory=utcnow)


CallState = Literal["queued", "waiting", "calling", "succeeded", "skipped", "failed", "dead-lettered"]


class CallStatus(BaseModel):
    """Where one Graph call of a request stands (GET /api/provision/{requestId})."""

    callIndex: int
    state: CallState
    attempts: int = 0
    since: datetime | None = None
    reason: str | None = None  # why it waits (NoCapacity, TooManyRequests, ...) or the error code
    eta: datetime | None = None  # the booked slot, while queued or waiting
    etaSeconds: float | None = None
    callsAhead: int | None = None  # calls booked before it on the shared timeline
    servedBy: str | None = None  # coalesced: the resultId of the equal call that serves this one
    callsSaved: int = 0
    stalled: bool = False
    note: str | None = None
    result: dict[str, Any] | None = None  # the result message, once there is one


ORDER_OF_PROGRESS = ("queued", "waiting", "calling")
ORDER_OF_SEVERITY = ("succeeded", "skipped", "failed", "dead-lettered")


class RequestStatus(BaseModel):
    requestId: str
    correlationId: str | None = None
    priority: Priority = "normal"
    state: CallState
    receivedAt: datetime | None = None
    callCount: int
    eta: datetime | None = None  # when its last waiting call is due
    etaSeconds: float | None = None
    calls: list[CallStatus]

    def summarised(self, now: float) -> "RequestStatus":
        """A request is as far along as its least advanced call and, once every call has finished,
        as bad as its worst one."""
        pending = [c.state for c in self.calls if c.state in ORDER_OF_PROGRESS]
        if pending:
            self.state = min(pending, key=ORDER_OF_PROGRESS.index)
        elif self.calls:
            self.state = max((c.state for c in self.calls), key=ORDER_OF_SEVERITY.index)
        etas = [c.eta for c in self.calls if c.eta is not None]
        if etas:
            self.eta = max(etas)
            self.etaSeconds = round(max(0.0, self.eta.timestamp() - now), 1)
        return self
