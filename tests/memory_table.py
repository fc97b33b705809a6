"""An in-memory Azure Table for unit tests, behaving as the service does where our code depends on
it: insert-if-absent answers 409 (ResourceExistsError), every write gives a new etag, conditional
update/delete with a stale etag answer 412 (ResourceModifiedError), a missing entity 404, a string
property over 32 K UTF-16 code units 400 (PropertyValueTooLarge), and `outage` fails every call as
a lost connection would."""
from __future__ import annotations

import itertools
import threading
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.data.tables import TableEntity, UpdateMode

MAX_STRING_UNITS = 32 * 1024


class MemoryTable:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        self.outage = False
        self.writes = 0
        self._etags = itertools.count(1)
        self._lock = threading.Lock()

    def _check(self, entity: dict[str, Any] | None = None) -> None:
        if self.outage:
            raise ServiceRequestError("connection refused")
        for name, value in (entity or {}).items():
            if isinstance(value, str) and len(value.encode("utf-16-le")) // 2 > MAX_STRING_UNITS:
                raise HttpResponseError(message=f"PropertyValueTooLarge: {name}")

    def _store(self, key: tuple[str, str], entity: dict[str, Any]) -> dict[str, str]:
        etag = f'W/"{next(self._etags)}"'
        self.rows[key] = (dict(entity), etag)
        self.writes += 1
        return {"etag": etag}

    def _current(self, key: tuple[str, str], etag: str | None, match_condition: Any) -> dict[str, Any]:
        if key not in self.rows:
            raise ResourceNotFoundError("ResourceNotFound")
        row, current = self.rows[key]
        if match_condition == MatchConditions.IfNotModified and etag != current:
            raise ResourceModifiedError("UpdateConditionNotSatisfied")
        return row

    def create_table(self) -> None:
        self._check()

    def create_entity(self, entity: dict[str, Any]) -> dict[str, str]:
        self._check(entity)
        key = (entity["PartitionKey"], entity["RowKey"])
        with self._lock:
            if key in self.rows:
                raise ResourceExistsError("EntityAlreadyExists")
            return self._store(key, entity)

    def get_entity(self, partition_key: str, row_key: str) -> TableEntity:
        self._check()
        with self._lock:
            row, etag = self._current((partition_key, row_key), None, None), self.rows[(partition_key, row_key)][1]
        entity = TableEntity(**row)
        entity._metadata = {"etag": etag, "timestamp": None}
        return entity

    def update_entity(self, entity: dict[str, Any], mode: UpdateMode = UpdateMode.MERGE, etag: str | None = None,
                      match_condition: Any = None) -> dict[str, str]:
        self._check(entity)
        key = (entity["PartitionKey"], entity["RowKey"])
        with self._lock:
            row = self._current(key, etag, match_condition)
            return self._store(key, {**row, **entity} if mode == UpdateMode.MERGE else entity)

    def query_entities(self, query_filter: str, parameters: dict[str, Any] | None = None,
                       select: list[str] | None = None) -> list[TableEntity]:
        """Only the form `<property> lt @<name>` (what the sweep asks); anything else is a test error."""
        self._check()
        prop, op, name = query_filter.split()
        assert op == "lt" and name.startswith("@"), f"MemoryTable cannot run {query_filter!r}"
        bound = (parameters or {})[name[1:]]
        with self._lock:
            found = [(row, etag) for row, etag in self.rows.values() if prop in row and row[prop] < bound]
        entities = []
        for row, etag in found:
            entity = TableEntity(**{k: v for k, v in row.items() if select is None or k in select})
            entity._metadata = {"etag": etag, "timestamp": None}
            entities.append(entity)
        return entities

    def delete_entity(self, partition_key: str, row_key: str, etag: str | None = None,
                      match_condition: Any = None) -> None:
        self._check()
        with self._lock:
            try:
                self._current((partition_key, row_key), etag, match_condition)
            except ResourceNotFoundError:
                return  # as the SDK: deleting what is not there is not an error
            del self.rows[(partition_key, row_key)]
