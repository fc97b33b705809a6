"""A storage queue modelled in memory on a simulated clock, for property tests of the rate gate.

It keeps the semantics the gate relies on: visibility timeouts, pop receipts that change on every
receive and update, stale receipts refused, metadata replaced whole, no ordering guarantee.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode

from shared.ratelimit.token_gate import RawToken


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Message:
    id: str
    content: str
    visible_at: float
    pop: str


class SimulatedQueue:
    def __init__(self, clock: Clock, rng: random.Random):
        self.clock = clock
        self.rng = rng
        self.messages: dict[str, _Message] = {}
        self.metadata: dict[str, str] = {}
        self._ids = itertools.count()

    def _pop(self) -> str:
        return f"p{next(self._ids)}"

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]:
        visible = [m for m in self.messages.values() if m.visible_at <= self.clock.now]
        self.rng.shuffle(visible)
        taken = []
        for m in visible[:max_count]:
            m.visible_at = self.clock.now + hold_seconds
            m.pop = self._pop()
            taken.append(RawToken(m.id, m.pop, m.content))
        return taken

    def update(self, token: RawToken, visible_in: int) -> None:
        m = self.messages.get(token.id)
        if m is None or m.pop != token.pop_receipt:
            return  # 404 / PopReceiptMismatch: the gate tolerates both
        m.visible_at = self.clock.now + visible_in
        m.pop = self._pop()

    def delete(self, token: RawToken) -> None:
        m = self.messages.get(token.id)
        if m is not None and m.pop == token.pop_receipt:
            del self.messages[token.id]

    def properties(self) -> tuple[dict[str, str], int]:
        return dict(self.metadata), len(self.messages)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self.metadata = dict(metadata)

    def send(self, content: str, visible_in: int) -> None:
        mid = f"m{next(self._ids)}"
        self.messages[mid] = _Message(mid, content, self.clock.now + visible_in, self._pop())

    def lose_one(self) -> None:
        if self.messages:
            del self.messages[self.rng.choice(sorted(self.messages))]


def max_in_window(arrivals: list[float], window: float) -> int:
    """Most arrivals inside any half-open window [t, t + window)."""
    times = sorted(arrivals)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class MemoryTable:
    """An Azure Table in memory, keeping the rules the status store depends on
    (https://learn.microsoft.com/en-us/rest/api/storageservices/Performing-Entity-Group-Transactions,
    https://learn.microsoft.com/en-us/rest/api/storageservices/understanding-the-table-service-data-model):
    every write renews the etag; If-Match conditions fail with 412, creates of an existing row with 409,
    updates and deletes of a missing row with 404, raised as the exceptions azure-data-tables raises;
    a transaction is all-or-nothing, within one partition (the SDK raises ValueError otherwise), at most 100
    operations, each row once;
    string properties up to 64 KiB (UTF-16), entities up to 1 MiB; None values are not sent.

    `fault(operation)` is called before every request: tests set it to raise ServiceRequestError to
    model an outage starting at any point."""

    MAX_OPERATIONS = 100
    MAX_STRING_BYTES = 64 * 1024
    MAX_ENTITY_BYTES = 1024 * 1024

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict] = {}
        self.etags: dict[tuple[str, str], str] = {}
        self.requests = 0
        self.fault = lambda operation: None
        self._etags = itertools.count(1)

    # -- the Protocol (shared/status/table.py) ------------------------------------------------------
    def create_table(self) -> None:
        self._request("create_table")

    def get_entity(self, partition_key: str, row_key: str):
        self._request("get")
        key = (partition_key, row_key)
        if key not in self.rows:
            raise _error(ResourceNotFoundError, 404, "ResourceNotFound")
        return self._entity(key)

    def upsert_entity(self, entity, mode=UpdateMode.MERGE) -> dict:
        self._request("upsert")
        key, row = self._checked(entity, HttpResponseError)
        self._write(key, {**self.rows.get(key, {}), **row} if mode == UpdateMode.MERGE else row)
        return {"etag": self.etags[key]}

    def delete_entity(self, partition_key: str, row_key: str) -> None:
        self._request("delete")
        self.rows.pop((partition_key, row_key), None)  # the SDK ignores a 404 here

    def query_entities(self, query_filter: str, *, parameters: dict):
        self._request("query")
        if query_filter != "PartitionKey eq @id":
            raise NotImplementedError(query_filter)
        return [self._entity(key) for key in sorted(self.rows) if key[0] == parameters["id"]]

    def submit_transaction(self, operations) -> list[dict]:
        self._request("transaction")
        operations = list(operations)
        if not operations:
            return []
        keys = [(op[1]["PartitionKey"], op[1]["RowKey"]) for op in operations]
        if len({k[0] for k in keys}) > 1:
            raise ValueError("Partition Keys in the batch must all be the same.")  # azure-data-tables checks this
        if len(operations) > self.MAX_OPERATIONS or len(set(keys)) < len(keys):
            raise _error(TableTransactionError, 400, "InvalidInput")
        changes = [self._apply(op, key) for op, key in zip(operations, keys)]  # raises before any change
        metadata: list[dict] = []
        for key, row in changes:
            if row is None:
                del self.rows[key], self.etags[key]
                metadata.append({})
            else:
                self._write(key, row)
                metadata.append({"etag": self.etags[key]})
        return metadata

    # -- the service's rules -----------------------------------------------------------------------
    def _apply(self, op: tuple, key: tuple[str, str]) -> tuple[tuple[str, str], dict | None]:
        """The row as it would be after `op` (None: deleted), or TableTransactionError."""
        verb, entity, options = op[0], op[1], (op[2] if len(op) > 2 else {})
        exists = key in self.rows
        etag = options.get("etag")
        if verb == "create" and exists:
            raise _error(TableTransactionError, 409, "EntityAlreadyExists")
        if verb in ("update", "delete") and not exists:
            raise _error(TableTransactionError, 404, "ResourceNotFound")
        if verb in ("update", "delete") and etag is not None and etag != "*" and etag != self.etags[key]:
            raise _error(TableTransactionError, 412, "UpdateConditionNotSatisfied")
        if verb == "delete":
            return key, None
        _, row = self._checked(entity, TableTransactionError)
        if options.get("mode", UpdateMode.MERGE) == UpdateMode.MERGE and verb != "create":
            row = {**self.rows.get(key, {}), **row}
        return key, row

    def _checked(self, entity, error: type) -> tuple[tuple[str, str], dict]:
        row = {name: value for name, value in dict(entity).items() if value is not None}
        for value in row.values():
            if isinstance(value, str) and len(value.encode("utf-16-le")) > self.MAX_STRING_BYTES:
                raise _error(error, 400, "PropertyValueTooLarge")
        if _entity_size(row) > self.MAX_ENTITY_BYTES:
            raise _error(error, 400, "EntityTooLarge")
        return (row["PartitionKey"], row["RowKey"]), row

    def _write(self, key: tuple[str, str], row: dict) -> None:
        self.rows[key] = row
        self.etags[key] = self._new_etag()

    def _entity(self, key: tuple[str, str]) -> TableEntity:
        entity = TableEntity(**self.rows[key])
        entity._metadata = {"etag": self.etags[key], "timestamp": None}
        return entity

    def _new_etag(self) -> str:
        return f'W/"datetime\'{next(self._etags)}\'"'

    def _request(self, operation: str) -> None:
        self.fault(operation)
        self.requests += 1


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
