"""Answers remembered by key, so that the same request sent twice is acted on once.

Used for the `Idempotency-Key` header of POST /api/provision (IETF httpapi draft "The
Idempotency-Key HTTP Header Field", https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/:
the same key with the same payload gets the first answer; the same key with another payload gets
422; a retry while the first is still being processed gets 409), for webhook signatures seen once
(shared/intake/signatures.py), and, with `source` + `id` as the key, for CloudEvents.

One row per (scope, key) in IDEMPOTENCY_TABLE, on the status table's storage account. The first
use inserts the row ("pending"); a concurrent first use meets the table's 409 and loses, so exactly
one wins. The winner remembers its answer in the row; a loser, or a later retry, recalls it. A key
is forgotten when the winner could not act (the caller may try again), and expires after its
retention. Azure Tables have no TTL: expired rows are taken over by the next use of their key,
and the upkeep timer deletes the others (`sweep`), at most once an hour per instance.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, UpdateMode
from pydantic import BaseModel

from shared.errors import KeyStoreUnavailable, RequestRejected
from shared.settings import Settings
from shared.tables import create_table, table_service

log = logging.getLogger(__name__)

# Regardless of the function timeout, an HTTP-triggered function has 230 s to answer
# (https://learn.microsoft.com/azure/azure-functions/functions-scale#timeout): a claim older than
# that belongs to an attempt whose caller has given up on it, and may be taken over.
PENDING_SECONDS = 240.0
# A table string property holds 32 K UTF-16 code units; an answer is stored in parts below that.
PART_CHARS = 30_000
MAX_PARTS = 20   # 600 000 characters: a 202 for 1000 requests is about 150 000
KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
SWEEP_EVERY_SECONDS = 3600.0
SWEEP_BATCH = 1000  # rows deleted per sweep at most: a timer run stays short, the next one goes on
SHARED_SCOPE = "(shared)"

State = Literal["new", "replay", "mismatch", "in-progress"]


class Answer(BaseModel):
    """What the first request was answered."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Recalled:
    """What a key's row says. `new`: this caller holds the key now and must remember or forget
    it; `replay`: the answer to give again; `mismatch`: the key was used for another payload;
    `in-progress`: another attempt holds the key and has not answered yet."""

    state: State
    partition: str
    row: str
    etag: str | None = None
    answer: Answer | None = None


def body_hash(text: str) -> str:
    """A hash of the canonical JSON (keys sorted, no insignificant whitespace), so that the same
    payload re-serialised by a retrying client is still the same payload. Text that is not JSON is
    hashed as it is."""
    try:
        canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        canonical = text
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The Idempotency-Key header's value, or None. The draft makes it a Structured Field string
    (quoted); a bare token is accepted too, as most clients send one. Raises 400 when malformed."""
    value = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not KEY_RE.match(key):
        raise RequestRejected(400, "InvalidIdempotencyKey",
                              "Idempotency-Key must be 1 to 255 printable ASCII characters, such as a UUID",
                              [{"field": "Idempotency-Key", "message": f"got {len(key)} character(s)"}])
    return key


def _row_keys(key: str, scope: str) -> tuple[str, str]:
    digest = hashlib.sha256(f"{scope}\n{key}".encode("utf-8")).hexdigest()
    return digest[:3], digest


def _answer_parts(answer: Answer) -> dict[str, Any]:
    text = answer.model_dump_json()
    parts = [text[i:i + PART_CHARS] for i in range(0, len(text), PART_CHARS)]
    if len(parts) > MAX_PARTS:
        raise ValueError(f"an answer of {len(text)} characters is too large to remember")
    return {"parts": len(parts), **{f"answer{i}": part for i, part in enumerate(parts)}}


def _answer_of(row: Mapping[str, Any]) -> Answer | None:
    parts = int(row.get("parts") or 0)
    return Answer.model_validate_json("".join(row[f"answer{i}"] for i in range(parts))) if parts else None


class AnswerBook:
    """remember/recall of answers by (scope, key), on one table."""

    def __init__(self, table: TableClient, retention_seconds: float, clock=time.time):
        self.table = table
        self.retention = retention_seconds
        self.clock = clock
        self._created = False
        self._swept_at: float | None = None

    @classmethod
    def connect(cls, settings: Settings) -> "AnswerBook":
        return cls(table_service(settings).get_table_client(settings.idempotency_table),
                   settings.idempotency_retention_hours * 3600)

    def recall(self, key: str, scope: str, payload_hash: str) -> Recalled:
        """Claim the key for this payload, or say what it already stands for. Raises
        KeyStoreUnavailable when the table cannot be reached."""
        return self._recall(key, scope, payload_hash, "pending", self.retention)

    def claim_once(self, key: str, scope: str, retention: float) -> Recalled | None:
        """The claim on (scope, key) the first time it is seen within `retention` seconds (forget
        it to let the key be used again), None after."""
        recalled = self._recall(key, scope, "", "done", retention)
        return recalled if recalled.state == "new" else None

    def _recall(self, key: str, scope: str, payload_hash: str, state: str, retention: float) -> Recalled:
        partition, row = _row_keys(key, scope)
        try:
            self._ensure_table()
            for _ in range(3):  # each pass loses only to another writer, which then holds the key
                recalled = self._claim_or_read(partition, row, payload_hash, state, retention)
                if recalled is not None:
                    return recalled
        except AzureError as exc:
            raise KeyStoreUnavailable(f"the key table cannot be reached: {type(exc).__name__}") from None
        return Recalled("in-progress", partition, row)

    def _claim_or_read(self, partition: str, row: str, payload_hash: str, state: str,
                       retention: float) -> Recalled | None:
        now = self.clock()
        claim = {"PartitionKey": partition, "RowKey": row, "bodyHash": payload_hash, "state": state,
                 "claimedAt": now, "expiresAt": now + retention}
        try:
            return Recalled("new", partition, row, self.table.create_entity(claim)["etag"])
        except ResourceExistsError:
            pass
        try:
            existing = self.table.get_entity(partition, row)
        except ResourceNotFoundError:
            return None  # forgotten in between: try to claim it again
        etag = existing.metadata["etag"]
        pending = existing.get("state") == "pending"
        if existing.get("expiresAt", 0) <= now or (pending and existing.get("claimedAt", 0) + PENDING_SECONDS <= now):
            try:
                meta = self.table.update_entity(claim, mode=UpdateMode.REPLACE, etag=etag,
                                                match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                return None
            return Recalled("new", partition, row, meta["etag"])
        if existing.get("bodyHash") != payload_hash:
            return Recalled("mismatch", partition, row, etag)
        if pending:
            return Recalled("in-progress", partition, row, etag)
        return Recalled("replay", partition, row, etag, _answer_of(existing))

    def remember(self, claim: Recalled, answer: Answer | None = None) -> None:
        """Keep the answer under the key this caller holds (or just mark the key used)."""
        row = {"PartitionKey": claim.partition, "RowKey": claim.row, "state": "done",
               **(_answer_parts(answer) if answer is not None else {"parts": 0})}
        try:
            self.table.update_entity(row, mode=UpdateMode.MERGE, etag=claim.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            # Taken over after PENDING_SECONDS: the other attempt's answer stands.
            pass
        except AzureError as exc:
            raise KeyStoreUnavailable(f"the key table cannot be written: {type(exc).__name__}") from None

    def forget(self, claim: Recalled) -> None:
        """Free a key this caller holds but could not act on, so that a retry is not refused.
        Best effort: a key left pending is freed after PENDING_SECONDS."""
        try:
            self.table.delete_entity(claim.partition, claim.row, etag=claim.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except AzureError:
            pass

    def sweep(self) -> int:
        """Delete rows past their expiry (at most SWEEP_BATCH), when the last sweep of this
        process is SWEEP_EVERY_SECONDS old; returns how many went. Expiry is not a key, so this
        reads the whole table: hourly, not on every timer run. Each delete is conditional on the
        row's etag, so a key claimed again meanwhile is kept."""
        now = self.clock()
        if self._swept_at is not None and now - self._swept_at < SWEEP_EVERY_SECONDS:
            return 0
        self._swept_at = now
        deleted = 0
        try:
            self._ensure_table()
            expired = self.table.query_entities("expiresAt lt @now", parameters={"now": now},
                                                select=["PartitionKey", "RowKey"])
            for row in expired:
                if deleted >= SWEEP_BATCH:
                    break
                deleted += self._delete_unchanged(row)
        except AzureError as exc:
            log.warning("expired keys not swept: %s", type(exc).__name__)
        return deleted

    def _delete_unchanged(self, row: Any) -> int:
        try:
            self.table.delete_entity(row["PartitionKey"], row["RowKey"], etag=row.metadata["etag"],
                                     match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            return 0  # claimed again since the query: no longer expired
        return 1

    def _ensure_table(self) -> None:
        if not self._created:
            create_table(self.table)
            self._created = True
