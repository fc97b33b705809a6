"""In-memory models of the Azure services the tests stand in for.

`SimulatedQueue`: a storage queue on a simulated clock, for property tests of the rate gate. It keeps
the semantics the gate relies on: visibility timeouts in whole seconds (1 s to 7 days; anything else
is refused like the service's 400), pop receipts that change on every receive and update, stale
receipts refused, metadata replaced whole, no ordering guarantee. A put can lose its answer after
the message was stored (`lost_put_rate`), which is what makes an SDK retry store a second copy.

`MemoryTable`: an Azure Table for the status and idempotency stores (its rules are in its docstring;
tests/integration/test_status.py checks it answers as Azurite does).
"""
from __future__ import annotations

import itertools
import json
import operator
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode
from pydantic import BaseModel

from shared import handlers
from shared.intake import envelope
from shared.intake.group_commit import GroupCommit
from shared.intake.idempotency import AnswerBook
from shared.models import WorkItem
from shared.queues import MAX_MESSAGE_BYTES
from shared.ratelimit.placement import Placement
from shared.ratelimit.slot_timeline import Schedule
from shared.ratelimit.token_gate import RawToken
from shared.settings import Settings
from shared.status.admission import LEAD, Admission

MAX_VISIBILITY = 7 * 24 * 3600


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass
class _Message:
    id: str
    content: str
    visible_at: float
    pop: str


def _whole_seconds(value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= MAX_VISIBILITY:
        raise HttpResponseError(message=f"visibilitytimeout must be whole seconds in [{least}, {MAX_VISIBILITY}], "
                                        f"got {value!r}")
    return value


class SimulatedQueue:
    def __init__(self, clock: Clock, rng: random.Random, lost_put_rate: float = 0.0):
        self.clock = clock
        self.rng = rng
        self.lost_put_rate = lost_put_rate
        self.messages: dict[str, _Message] = {}
        self.metadata: dict[str, str] = {}
        self._ids = itertools.count()

    def _pop(self) -> str:
        return f"p{next(self._ids)}"

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]:
        hold = _whole_seconds(hold_seconds, 1)
        visible = [m for m in self.messages.values() if m.visible_at <= self.clock.now]
        self.rng.shuffle(visible)
        taken = []
        for m in visible[:max_count]:
            m.visible_at = self.clock.now + hold
            m.pop = self._pop()
            taken.append(RawToken(m.id, m.pop, m.content))
        return taken

    def update(self, token: RawToken, visible_in: int) -> str | None:
        return self.update_content(token, token.content, visible_in)

    def update_content(self, token: RawToken, content: str, visible_in: int) -> str | None:
        seconds = _whole_seconds(visible_in, 0)
        m = self.messages.get(token.id)
        if m is None or m.pop != token.pop_receipt:
            return None  # 404 / PopReceiptMismatch
        m.content, m.visible_at, m.pop = content, self.clock.now + seconds, self._pop()
        return m.pop

    def delete(self, token: RawToken) -> None:
        m = self.messages.get(token.id)
        if m is not None and m.pop == token.pop_receipt:
            del self.messages[token.id]

    def properties(self) -> tuple[dict[str, str], int]:
        return dict(self.metadata), len(self.messages)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self.metadata = dict(metadata)

    def send(self, content: str, visible_in: int) -> None:
        seconds = _whole_seconds(visible_in, 0)
        mid = f"m{next(self._ids)}"
        self.messages[mid] = _Message(mid, content, self.clock.now + seconds, self._pop())
        if self.rng.random() < self.lost_put_rate:
            raise ServiceResponseError("the connection closed before the answer to Put Message arrived")

    def is_empty(self) -> bool:
        return not self.messages

    def lose_one(self) -> None:
        if self.messages:
            del self.messages[self.rng.choice(sorted(self.messages))]

    def valid_tokens(self) -> int:
        """Tokens of the epoch the metadata names: the pool's real capacity."""
        epoch = self.metadata.get("epoch")
        return sum(f'"epoch": "{epoch}"' in m.content for m in self.messages.values())


def max_in_window(arrivals: list[float], window: float) -> int:
    """Most arrivals inside any half-open window [t, t + window)."""
    times = sorted(arrivals)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def no_fault(operation: str) -> None:
    """The table's `fault` hook when all is well."""


def outage(operation: str) -> None:
    """The table's `fault` hook for an unreachable service: every call fails as a lost connection does."""
    raise ServiceRequestError("connection refused")


class MemoryTable:
    """An Azure Table in memory, keeping the rules the status store and the idempotency store depend on
    (https://learn.microsoft.com/en-us/rest/api/storageservices/Performing-Entity-Group-Transactions,
    https://learn.microsoft.com/en-us/rest/api/storageservices/understanding-the-table-service-data-model):
    every write renews the etag; If-Match conditions fail with 412, creates of an existing row with 409,
    reads, updates and transactional deletes of a missing row with 404, raised as the exceptions
    azure-data-tables raises (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError for
    single-entity calls, TableTransactionError inside a transaction); a single-entity delete of a missing
    row is not an error, as in the SDK; a transaction is all-or-nothing, within one partition (the SDK
    raises ValueError otherwise), at most 100 operations, each row once; string properties up to 64 KiB
    (UTF-16, 400 PropertyValueTooLarge), entities up to 1 MiB; None values are not sent.
    Queries understand `<property> eq|lt|ge @<parameter>` clauses joined by `and`, what our code asks.

    `fault(operation)` is called before every request: tests set it to `outage` (or their own function
    raising ServiceRequestError) to model an outage starting at any point. Calls are atomic, so
    threads may share one table."""

    MAX_OPERATIONS = 100
    MAX_STRING_BYTES = 64 * 1024
    MAX_ENTITY_BYTES = 1024 * 1024

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict] = {}
        self.etags: dict[tuple[str, str], str] = {}
        self.requests = 0
        self.fault: Callable[[str], None] = no_fault
        self._etags = itertools.count(1)
        self._lock = threading.RLock()

    # -- single-entity calls, as TableClient takes them ---------------------------------------------
    def create_table(self) -> None:
        self._request("create_table")

    def get_entity(self, partition_key: str, row_key: str) -> TableEntity:
        self._request("get")
        with self._lock:
            if (partition_key, row_key) not in self.rows:
                raise _error(ResourceNotFoundError, 404, "ResourceNotFound")
            return self._entity((partition_key, row_key))

    def create_entity(self, entity: Mapping[str, Any]) -> dict:
        return self._single("create", entity, {})

    def upsert_entity(self, entity: Mapping[str, Any], mode: UpdateMode = UpdateMode.MERGE) -> dict:
        return self._single("upsert", entity, {"mode": mode})

    def update_entity(self, entity: Mapping[str, Any], mode: UpdateMode = UpdateMode.MERGE,
                      etag: str | None = None, match_condition: MatchConditions | None = None) -> dict:
        return self._single("update", entity, {"mode": mode, "etag": etag, "match_condition": match_condition})

    def delete_entity(self, partition_key: str, row_key: str, etag: str | None = None,
                      match_condition: MatchConditions | None = None) -> None:
        try:
            self._single("delete", {"PartitionKey": partition_key, "RowKey": row_key},
                         {"etag": etag, "match_condition": match_condition})
        except ResourceNotFoundError:
            return  # the SDK ignores a 404 here

    def query_entities(self, query_filter: str, *, parameters: dict[str, Any],
                       select: list[str] | None = None) -> list[TableEntity]:
        self._request("query")
        clauses = [clause.split() for clause in query_filter.split(" and ")]
        if any(len(c) != 3 or c[1] not in _COMPARISONS or not c[2].startswith("@") for c in clauses):
            raise NotImplementedError(query_filter)
        tests = [(prop, _COMPARISONS[op], parameters[name[1:]]) for prop, op, name in clauses]
        with self._lock:
            return [self._entity(key, select) for key, row in sorted(self.rows.items())
                    if all(prop in row and _comparable(row[prop], bound) and compare(row[prop], bound)
                           for prop, compare, bound in tests)]

    def submit_transaction(self, operations: Iterable[tuple]) -> list[dict]:
        self._request("transaction")
        operations = list(operations)
        if not operations:
            return []
        keys = [(op[1]["PartitionKey"], op[1]["RowKey"]) for op in operations]
        if len({k[0] for k in keys}) > 1:
            raise ValueError("Partition Keys in the batch must all be the same.")  # azure-data-tables checks this
        if len(operations) > self.MAX_OPERATIONS or len(set(keys)) < len(keys):
            raise _error(TableTransactionError, 400, "InvalidInput")
        with self._lock:
            changes = [self._apply(op, _IN_TRANSACTION) for op in operations]  # raises before any change
            return [self._commit(key, row) for key, row in changes]

    # -- the service's rules -----------------------------------------------------------------------
    def _single(self, verb: str, entity: Mapping[str, Any], options: dict) -> dict:
        self._request(verb)
        with self._lock:
            return self._commit(*self._apply((verb, entity, options), _SINGLE))

    def _apply(self, op: tuple, errors: dict[int, type]) -> tuple[tuple[str, str], dict | None]:
        """The row as it would be after `op` (None: deleted), or the error `errors` names for its status."""
        verb, entity, options = op[0], op[1], (op[2] if len(op) > 2 else {})
        key = (entity["PartitionKey"], entity["RowKey"])
        exists = key in self.rows
        if verb == "create" and exists:
            raise _error(errors[409], 409, "EntityAlreadyExists")
        if verb in ("update", "delete") and not exists:
            raise _error(errors[404], 404, "ResourceNotFound")
        if verb in ("update", "delete") and self._stale(key, options):
            raise _error(errors[412], 412, "UpdateConditionNotSatisfied")
        if verb == "delete":
            return key, None
        row = self._checked(entity, errors[400])
        if options.get("mode", UpdateMode.MERGE) == UpdateMode.MERGE and verb != "create":
            row = {**self.rows.get(key, {}), **row}
        return key, row

    def _stale(self, key: tuple[str, str], options: dict) -> bool:
        # The SDK sends If-Match only under IfNotModified; "*" matches any existing row.
        if options.get("match_condition") != MatchConditions.IfNotModified:
            return False
        return options.get("etag") not in ("*", self.etags[key])

    def _checked(self, entity: Mapping[str, Any], error: type) -> dict:
        row = {name: value for name, value in dict(entity).items() if value is not None}
        for value in row.values():
            if isinstance(value, str) and len(value.encode("utf-16-le")) > self.MAX_STRING_BYTES:
                raise _error(error, 400, "PropertyValueTooLarge")
        if _entity_size(row) > self.MAX_ENTITY_BYTES:
            raise _error(error, 400, "EntityTooLarge")
        return row

    def _commit(self, key: tuple[str, str], row: dict | None) -> dict:
        if row is None:
            del self.rows[key], self.etags[key]
            return {}
        self.rows[key] = row
        self.etags[key] = f'W/"datetime\'{next(self._etags)}\'"'
        return {"etag": self.etags[key]}

    def _entity(self, key: tuple[str, str], select: list[str] | None = None) -> TableEntity:
        entity = TableEntity(**{k: v for k, v in self.rows[key].items() if select is None or k in select})
        entity._metadata = {"etag": self.etags[key], "timestamp": None}
        return entity

    def _request(self, operation: str) -> None:
        self.fault(operation)
        with self._lock:
            self.requests += 1


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {"eq": operator.eq, "lt": operator.lt, "ge": operator.ge}
_SINGLE = {400: HttpResponseError, 404: ResourceNotFoundError, 409: ResourceExistsError, 412: ResourceModifiedError}
_IN_TRANSACTION = dict.fromkeys(_SINGLE, TableTransactionError)


def _comparable(value: Any, bound: Any) -> bool:
    # The service compares a property only with a value of its own type: a string never matches a number.
    return isinstance(value, str) == isinstance(bound, str)


def _error(kind: type, status: int, code: str) -> Exception:
    error = kind(message=f"{status} {code}")
    error.status_code, error.error_code = status, code
    return error


def _entity_size(row: dict) -> int:
    # The service's formula: 4 bytes + keys in UTF-16 + per property 8 bytes, its name in UTF-16 and its value.
    size = 4 + 2 * (len(row["PartitionKey"]) + len(row["RowKey"]))
    for name, value in row.items():
        if name in ("PartitionKey", "RowKey"):
            continue
        data = len(value.encode("utf-16-le")) + 4 if isinstance(value, str) else 8
        size += 8 + 2 * len(name) + data
    return size


# -- the app's runtime without storage, for intake tests in process ----------------------------------
SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
SETTINGS = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=SP,
                    DEFAULT_JOB_ID="scim.job", DEFAULT_RULE_ID="rule-1#V2")


class _EmptyQueue:
    def peek_messages(self, max_messages: int = 1) -> list:
        return []


class FakeQueues:
    """Captures what would go to storage, with storage's own 64 KiB limit. Every queue reads as
    empty: nothing is booked anywhere (the fast-intake door peeks at an empty timeline)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def get(self, name: str) -> _EmptyQueue:
        return _EmptyQueue()

    def send_text(self, name: str, text: str, *, delay: int = 0) -> None:
        assert len(text.encode("utf-8")) <= MAX_MESSAGE_BYTES, "a message must fit in a queue message"
        self.sent.append((name, json.loads(text)))

    def send_json(self, name: str, body: BaseModel | dict, *, delay: int = 0) -> None:
        self.send_text(name, body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel)
                       else json.dumps(body))


class NoStatus:
    """Stands in for the status table in the fuzzing runs: every call gets a slot of its own."""

    def admit(self, items: list[WorkItem]) -> list[Admission]:
        return [Admission(item, LEAD) for item in items]

    def mark_queued(self, items: list[WorkItem]) -> None:
        pass

    def record_requests(self, requests: Any) -> None:
        list(requests)

    def forget(self, items: list[WorkItem]) -> list[WorkItem]:
        return []

    def mark_received(self, post_id: str, key: str, requests: list[tuple[int, str]]) -> None:
        pass


class FakeRuntime:
    def __init__(self) -> None:
        self.settings = SETTINGS
        self.queues = FakeQueues()
        self.graph = None
        self.status = NoStatus()
        self.answers = AnswerBook(MemoryTable(), retention_seconds=3600)
        self.intake_commits = GroupCommit(envelope.ROOM)
        self.admission_commits = GroupCommit(1000)
        self.timeline_peeks: dict[str, tuple[float, list[str]]] = {}

    def schedule_queue(self, item: WorkItem | None = None) -> str:
        return f"{self.settings.lease_queue}-schedule"

    def schedule_for(self, item: WorkItem | None = None) -> Schedule:
        return Schedule(SimulatedQueue(Clock(), random.Random(0)), self.settings.slot_spacing)


def queued_calls(rt: FakeRuntime, *replies: Any) -> int:
    """The calls these posts queued: the work a synchronous door hands its output binding, and the
    calls in the envelopes a fast-intake door sent to the intake queue."""
    envelopes = [body for name, body in rt.queues.sent if name == rt.settings.intake_queue]
    return sum(len(reply.work) for reply in replies) + sum(len(r["items"]) for e in envelopes for r in e["requests"])


@contextmanager
def no_storage():
    """Accepted work is serialised as the work queue would get it, and not booked anywhere."""
    def place(items: list[WorkItem], rt: Any, **_: Any) -> Placement:
        return Placement(items, items)
    with mock.patch.object(handlers, "place", place), \
            mock.patch.object(handlers, "_rule_lookup", lambda rt: None, create=True):
        yield
