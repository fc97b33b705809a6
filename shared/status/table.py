"""Table access behind a small Protocol: the few operations the status store uses.

`azure.data.tables.TableClient` satisfies it as it is; tests use the in-memory model in
tests/fakes.py (`MemoryTable`), which keeps the service's rules: etags renewed on every write,
If-Match conditions, entity-group transactions all-or-nothing within one partition and at most 100
operations, and the property and entity size limits
(https://learn.microsoft.com/en-us/rest/api/storageservices/Performing-Entity-Group-Transactions,
https://learn.microsoft.com/en-us/rest/api/storageservices/understanding-the-table-service-data-model).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from shared.settings import Settings

# One operation of an entity-group transaction, as azure-data-tables takes it:
# ("create" | "upsert" | "update" | "delete", entity, options).
Operation = tuple


class StatusTable(Protocol):
    def create_table(self) -> Any: ...

    def get_entity(self, partition_key: str, row_key: str) -> TableEntity: ...

    def upsert_entity(self, entity: Mapping[str, Any], mode: UpdateMode = UpdateMode.MERGE) -> Any: ...

    def delete_entity(self, partition_key: str, row_key: str, *, etag: str | None = None,
                      match_condition: MatchConditions | None = None) -> None: ...

    def query_entities(self, query_filter: str, *, parameters: dict[str, Any],
                       select: list[str] | None = None) -> Iterable[TableEntity]: ...

    def submit_transaction(self, operations: Iterable[Operation]) -> list[Mapping[str, Any]]: ...


def connect(settings: Settings) -> StatusTable:
    from shared.tables import table_service

    return table_service(settings).get_table_client(settings.status_table)


def merge(row: dict[str, Any], etag: str | None = None) -> Operation:
    """Merge into a row: an upsert, or an update only while the row is as read (If-Match)."""
    options: dict[str, Any] = {"mode": UpdateMode.MERGE}
    if etag is not None:
        options.update(etag=etag, match_condition=MatchConditions.IfNotModified)
    return ("update" if etag is not None else "upsert", row, options)


def delete_if_unchanged(key: str, row_key: str, etag: str) -> Operation:
    return ("delete", {"PartitionKey": key, "RowKey": row_key},
            {"etag": etag, "match_condition": MatchConditions.IfNotModified})


def read_row(table: StatusTable, key: str, row_key: str) -> TableEntity | None:
    try:
        return table.get_entity(key, row_key)
    except ResourceNotFoundError:
        return None
