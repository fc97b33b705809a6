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
    model_validator,
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
MAX_OWNERS_PER_SUBJECT = 100  # our own bound (Graph documents none): keeps a work item far below 64 KiB

# Printable ASCII only: the value travels into logs and result messages, never into headers.
CorrelationId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]

OBJECT_ID_FORMS = {
    "User": (GUID_RE, "a GUID (the Entra ID user's object id)"),
    "Group": (GUID_RE, "a GUID (the Entra ID group's object id)"),
    "user": (DN_RE, "an AD distinguished name such as CN=Ada,OU=Staff,DC=corp,DC=example"),
    "Worker": (WORKER_ID_RE, "a Workday Worker ID (letters, digits, '.', '_' or '-', at most 64)"),
}


# Subjects by name (shared/intake/names.py): what may stand for objectId, per objectTypeName.
NAME_PROPERTIES: dict[str, tuple[str, ...]] = {
    "User": ("userPrincipalName", "mail", "employeeId"),
    "Group": ("mailNickname", "displayName"),
}
# Checked further (https, allowed host, public addresses) by shared/results/callbacks.py at intake.
CallbackUrl = Annotated[str, StringConstraints(strip_whitespace=True, min_length=9, max_length=2048,
                                               pattern=r"^[\x21-\x7e]+$")]
DirectoryName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


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


def _check_object_id(object_id: str | None, type_name: str | None) -> str | None:
    if type_name is None or object_id is None:  # objectTypeName failed (its own error says why), or a name is given
        return object_id
    pattern, form = OBJECT_ID_FORMS[type_name]
    if not pattern.match(object_id):
        raise ValueError(f"objectId for objectTypeName {type_name!r} must be {form}")
    return object_id


# Which subject types may carry which links (synchronizationLinkedObjects: manager, members, owners;
# https://learn.microsoft.com/graph/api/resources/synchronization-synchronizationjobsubject). A manager
# is a user's attribute and owners a group's; the linked objects themselves are Entra ID users.
LINKS_ALLOWED_ON = {"members": ("Group",), "owners": ("Group",), "manager": ("User",)}


def _check_links_allowed(present: dict[str, bool], type_name: str | None) -> None:
    for link, allowed in LINKS_ALLOWED_ON.items():
        if present.get(link) and type_name not in (None, *allowed):
            raise ValueError(f"{link} {'is' if link == 'manager' else 'are'} only allowed when objectTypeName is "
                             f"{' or '.join(repr(t) for t in allowed)}, not {type_name!r}")


class Member(_Strict):
    """A linked user: a group member or owner, or a user's manager."""

    objectId: str
    objectTypeName: Literal["User"] = "User"

    @field_validator("objectId")
    @classmethod
    def _guid(cls, v: str) -> str:
        if not GUID_RE.match(v):
            raise ValueError("a linked user's objectId (member, manager or owner) must be a GUID (an Entra ID user)")
        return v


class Links(_Strict):
    members: list[Member] = Field(default_factory=list, max_length=MAX_MEMBERS_PER_REQUEST)
    manager: Member | None = None
    owners: list[Member] = Field(default_factory=list, max_length=MAX_OWNERS_PER_SUBJECT)

    def present(self) -> dict[str, bool]:
        return {"members": bool(self.members), "owners": bool(self.owners), "manager": self.manager is not None}


class SubjectName(BaseModel):
    """The name a caller gave in place of objectId, kept beside the object id it resolved to."""

    property: str
    value: str


class _ByName(_Strict):
    """objectId, or one name that stands for it (NAME_PROPERTIES), resolved at intake."""

    # objectTypeName comes first so that objectId can be checked against it.
    objectTypeName: ObjectTypeName
    objectId: str | None = Field(None, min_length=1, max_length=512)
    userPrincipalName: DirectoryName | None = None
    mail: DirectoryName | None = None
    employeeId: DirectoryName | None = None
    mailNickname: DirectoryName | None = None
    displayName: DirectoryName | None = None

    def subject_name(self) -> SubjectName | None:
        given = [(p, getattr(self, p)) for props in NAME_PROPERTIES.values() for p in props if getattr(self, p)]
        return SubjectName(property=given[0][0], value=given[0][1]) if given else None

    @model_validator(mode="after")
    def _one_identifier(self) -> "_ByName":
        type_name = self.objectTypeName
        allowed = NAME_PROPERTIES.get(type_name, ())
        given = [p for props in NAME_PROPERTIES.values() for p in props if getattr(self, p)]
        if wrong := [p for p in given if p not in allowed]:
            hint = f"for {type_name!r} use one of {', '.join(allowed)}" if allowed else f"{type_name!r} needs objectId"
            raise ValueError(f"{wrong[0]} cannot name a subject of objectTypeName {type_name!r}: {hint}")
        if len(given) + (self.objectId is not None) != 1:
            names = " or ".join(("objectId",) + allowed)
            raise ValueError(f"give exactly one of {names}")
        return self


class GraphSubject(_ByName):
    links: Links | None = None

    @field_validator("objectId")
    @classmethod
    def _object_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _check_object_id(v, info.data.get("objectTypeName"))

    @field_validator("links")
    @classmethod
    def _links(cls, v: Links | None, info: ValidationInfo) -> Links | None:
        _check_links_allowed(v.present() if v else {}, info.data.get("objectTypeName"))
        return v


class GraphParameter(_Strict):
    ruleId: str | None = None
    subjects: list[GraphSubject] = Field(min_length=1, max_length=100)

    _rule = field_validator("ruleId")(classmethod(lambda cls, v: _check_rule(v)))


class GraphBodyEvent(_Strict):
    """Shape (a): the Graph provisionOnDemand body, plus where to send it."""

    parameters: list[GraphParameter] = Field(min_length=1, max_length=100)
    servicePrincipalId: str | None = None
    application: DirectoryName | None = None  # display name or appId, in place of servicePrincipalId
    jobId: str | None = None
    correlationId: CorrelationId | None = None
    priority: Priority = "normal"
    callbackUrl: CallbackUrl | None = None  # where each result is POSTed (shared/results/callbacks.py)
    # Logic Apps and SDKs sometimes copy this annotation along; it carries no meaning here.
    odata_type: str | None = Field(None, alias="@odata.type")

    _sp = field_validator("servicePrincipalId")(classmethod(lambda cls, v: _check_guid(v, "servicePrincipalId")))
    _job = field_validator("jobId")(classmethod(lambda cls, v: _check_job(v)))


class CompactEvent(_ByName):
    """Shape (b): one subject in a flat event, as an HR system or webhook would send it."""

    ruleId: str | None = None
    servicePrincipalId: str | None = None
    application: DirectoryName | None = None  # display name or appId, in place of servicePrincipalId
    jobId: str | None = None
    members: list[Member] | None = Field(None, max_length=MAX_MEMBERS_PER_REQUEST)
    manager: Member | None = None
    owners: list[Member] | None = Field(None, max_length=MAX_OWNERS_PER_SUBJECT)
    correlationId: CorrelationId | None = None
    priority: Priority = "normal"
    callbackUrl: CallbackUrl | None = None  # where each result is POSTed (shared/results/callbacks.py)

    _sp = field_validator("servicePrincipalId")(classmethod(lambda cls, v: _check_guid(v, "servicePrincipalId")))
    _job = field_validator("jobId")(classmethod(lambda cls, v: _check_job(v)))
    _rule = field_validator("ruleId")(classmethod(lambda cls, v: _check_rule(v)))

    @field_validator("objectId")
    @classmethod
    def _object_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _check_object_id(v, info.data.get("objectTypeName"))

    @field_validator("members", "owners", "manager", mode="before")
    @classmethod
    def _user_shorthand(cls, v: Any) -> Any:
        # A bare string is shorthand for a linked user.
        if isinstance(v, list):
            return [{"objectId": m} if isinstance(m, str) else m for m in v]
        return {"objectId": v} if isinstance(v, str) else v

    @field_validator("members", "owners", "manager")
    @classmethod
    def _links(cls, v: Any, info: ValidationInfo) -> Any:
        _check_links_allowed({info.field_name: bool(v)}, info.data.get("objectTypeName"))
        return v

    def as_subject(self) -> GraphSubject:
        links = Links(members=self.members or [], manager=self.manager, owners=self.owners or [])
        names = {p: getattr(self, p) for p in NAME_PROPERTIES.get(self.objectTypeName, ()) if getattr(self, p)}
        return GraphSubject(objectId=self.objectId, objectTypeName=self.objectTypeName,
                            links=links if any(links.present().values()) else None, **names)


class Subject(BaseModel):
    """The subject of one Graph call, as it appears in work and result messages."""

    objectId: str
    objectTypeName: ObjectTypeName
    members: list[str] | None = None
    manager: str | None = None  # links.manager's objectId (User subjects)
    owners: list[str] | None = None  # links.owners' objectIds (Group subjects)
    name: SubjectName | None = None  # the name the caller gave in place of objectId

    def graph_links(self) -> dict[str, Any] | None:
        """synchronizationLinkedObjects as Graph takes it, or None when the subject has no links."""
        links: dict[str, Any] = {}
        for name in ("members", "owners"):
            if getattr(self, name):
                links[name] = [{"objectId": m, "objectTypeName": "User"} for m in getattr(self, name)]
        if self.manager:
            links["manager"] = {"objectId": self.manager, "objectTypeName": "User"}
        return links or None


class CloudEventRef(BaseModel):
    """The CloudEvent a request came in (shared/intake/cloudevents.py), carried into its results."""

    type: str
    subject: str | None = None
    source: str
    id: str


class Follower(BaseModel):
    """A call that joined an equal waiting call instead of making its own (shared/status/admission.py)."""

    requestId: str
    callIndex: int
    callCount: int
    correlationId: str | None = None
    receivedAt: datetime
    event: CloudEventRef | None = None
    subject: Subject | None = None  # its own: an equal call may have named the subject differently
    callbackUrl: str | None = None

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
    outOfScopeRetries: int = 0  # calls repeated because the subject was not in scope yet (OUT_OF_SCOPE_RETRY_MINUTES)
    # Coalescing (shared/status/): the equal-call group; while this call leads it, the etag of its open
    # row as intake opened it (None: a call outside any group); the calls that joined, once the group
    # was closed. Set on copies by the status store, never in place.
    coalesceKey: str | None = None
    openEtag: str | None = None
    followers: list[Follower] = Field(default_factory=list)
    event: CloudEventRef | None = None  # when the request came as a CloudEvent
    callbackUrl: str | None = None  # checked at intake; never copied into results (it may hold a token)

    @property
    def call_id(self) -> str:
        return f"{self.requestId}:{self.callIndex}"

    @property
    def lane(self) -> Priority:
        return "high" if self.priority == "high" or self.displaced >= 2 else "normal"

    def graph_body(self) -> dict[str, Any]:
        subject: dict[str, Any] = {"objectId": self.subject.objectId, "objectTypeName": self.subject.objectTypeName}
        links = self.subject.graph_links()
        if links:
            subject["links"] = links
        return {"parameters": [{"ruleId": self.ruleId, "subjects": [subject]}]}


class EnvelopeRequest(BaseModel):
    """One request the HTTP door accepted: its id and its calls, validated and resolved."""

    requestId: str
    correlationId: str | None = None
    priority: Priority = "normal"
    items: list[WorkItem]


class IntakeEnvelope(BaseModel):
    """Requests accepted over HTTP, queued on the intake queue in one write (shared/intake/envelope.py):
    the queue door admits them under these requestIds on every delivery."""

    kind: Literal["acceptedRequests"] = "acceptedRequests"
    postId: str
    requests: list[EnvelopeRequest]


class GraphKeyValue(BaseModel):
    """Graph's stringKeyStringValuePair: both fields are JSON documents encoded as strings."""

    model_config = ConfigDict(extra="ignore")

    key: str | None = None
    value: str | None = None
    # Set by the client, never by Graph: a 200 whose body was not this envelope, and why.
    body: str | None = Field(None, exclude=True)
    problem: str | None = Field(None, exclude=True)


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


# What happened to the subject, in plain words; how each is derived: shared/graph/decoding.py and the README.
Verdict = Literal["created", "updated", "deleted", "disabled", "noChange", "outOfScope", "failed", "unknown"]
# The three shapes provisionOnDemand answers in, and "unreadable" for anything else.
AnswerShape = Literal["documented", "group", "statusInfo", "unreadable"]


class Outcome(BaseModel):
    """What one provisionOnDemand answer means, decoded from its nested JSON strings."""

    result: str
    verdict: Verdict = "unknown"
    reasonCode: str | None = None  # the step name or error code the verdict was derived from
    diagnosis: str | None = None  # what to do about it, when the answer alone is cryptic
    answerShape: AnswerShape | None = None  # None for results that are not a Graph answer (given up on)
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
    rawBody: str | None = None  # Graph's whole 200 answer, when it was not the {key, value} envelope


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
    truncated: bool = False  # cut to fit a queue message or table row; truncatedFields says what
    truncatedFields: list[str] = Field(default_factory=list)
    priority: Priority = "normal"
    callsSaved: int = 0  # other requests this call served (coalescing): Graph calls not made
    servedBy: str | None = None  # the resultId of the call that served this request, when coalesced
    jobStatus: JobStatus | None = None  # only when the failure pointed at the job (shared/graph/job_guard.py)
    outOfScopeRetries: int = 0  # extra Graph calls made because the subject was not in scope yet
    event: CloudEventRef | None = None  # the CloudEvent the request came in, if it came as one


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
    truncatedFields: list[str] = Field(default_factory=list)  # what was cut to fit a queue message
    requestId: str | None = None
    attempts: int | None = None
    deadLetteredAt: datetime = Field(default_factory=utcnow)


# "received": accepted over HTTP and queued for intake, not yet admitted (shared/intake/envelope.py).
CallState = Literal["received", "queued", "waiting", "calling", "succeeded", "skipped", "failed", "dead-lettered"]


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


CallbackPhase = Literal["pending", "retrying", "delivered", "failed"]


class CallbackState(BaseModel):
    """Where the callback of one result stands (shared/results/callbacks.py)."""

    resultId: str
    state: CallbackPhase
    host: str  # never the whole URL: its path or query may carry the receiver's secret
    attempts: int = 0
    lastStatus: int | None = None  # the receiver's last HTTP status
    lastError: str | None = None
    nextAttemptAt: datetime | None = None
    updatedAt: datetime


class CallbackMessage(BaseModel):
    """One result to POST, on CALLBACK_QUEUE; `result` is the exact body sent (and signed)."""

    url: str
    resultId: str
    requestId: str
    result: str
    attempts: int = 0


ORDER_OF_PROGRESS = ("received", "queued", "waiting", "calling")
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
    calls: list[CallStatus]  # the calls on this page, in callIndex order
    # Paged above 100 calls: `state` and `eta` then describe the calls on this page only.
    page: int = 1
    pageCount: int = 1
    nextPage: int | None = None
    note: str | None = None  # while `received` for longer than expected: what will happen
    callbacks: list[CallbackState] | None = None  # where each result's callback stands, when one was asked for

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
