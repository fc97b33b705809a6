"""Fast intake (issue 13): the HTTP door validates, names its requests and queues them for the
queue door in one write, instead of admitting, booking and recording them itself.

A post gets a random post id and key; its requests' ids are RFC 9562 version-8 GUIDs made of the
post id, a secret derived from the key, and the request's index
(https://www.rfc-editor.org/rfc/rfc9562#name-uuid-version-8), so that a status read of a request not yet admitted finds its post's received marker
(shared/status/received.py) and answers `received` instead of 404, and a GUID nobody was given
finds nothing. The accepted requests go to the intake queue as IntakeEnvelope messages under the
queue's 64 KiB limit (https://learn.microsoft.com/en-us/azure/storage/queues/storage-queues-introduction),
sent in parallel; the queue door admits them under the ids they carry, so a redelivery is the
same requests.
"""
from __future__ import annotations

import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, TypeVar

from azure.core.exceptions import AzureError

from shared.intake.validation import AcceptedRequest
from shared.models import EnvelopeRequest, IntakeEnvelope
from shared.status.received import request_secret

log = logging.getLogger(__name__)
T = TypeVar("T")

# Below 64 KiB with room for the XML escaping the queue service applies to the text.
MAX_ENVELOPE_BYTES = 48 * 1024
_WRAPPER_BYTES = 128  # {"kind":…,"postId":…,"requests":[…]} around the requests
PARALLEL_SENDS = 8
_INDEX_HEX = 6


def new_post() -> tuple[str, str]:
    """A post's id (48 random bits; the POSTs that share a group commit share it) and its key (128
    random bits, kept only in the post's received row)."""
    return secrets.token_hex(6), secrets.token_hex(16)


def request_id(post_id: str, key: str, index: int) -> str:
    """The GUID of the index-th request of a post: version 8, variant 10, then the post id, the
    request's secret (derived from the post's key: a caller that knows the other requestIds of a
    shared post cannot derive this one) and the index."""
    secret = request_secret(key, index)
    digits = post_id + "8" + secret[:3] + "8" + secret[3:] + f"{index:0{_INDEX_HEX}x}"
    return str(uuid.UUID(digits))


def post_of(request_id_text: str) -> tuple[str, int, str] | None:
    """(post id, index, secret) of a requestId made by request_id(); None for any other GUID."""
    digits = request_id_text.replace("-", "").lower()
    if len(digits) != 32 or digits[12] != "8" or digits[16] != "8":
        return None
    return digits[:12], int(digits[26:], 16), digits[13:16] + digits[17:26]


def named(accepted: list[AcceptedRequest], post_id: str, key: str) -> list[AcceptedRequest]:
    """The requests under their post's ids (new copies; every call carries its request's id)."""
    renamed = []
    for index, request in enumerate(accepted):
        rid = request_id(post_id, key, index)
        renamed.append(replace(request, requestId=rid,
                               items=[item.model_copy(update={"requestId": rid}) for item in request.items]))
    return renamed


def _sized(accepted: list[AcceptedRequest]) -> list[tuple[EnvelopeRequest, int]]:
    sized = []
    for request in accepted:
        one = EnvelopeRequest(requestId=request.requestId, correlationId=request.correlationId,
                              priority=request.priority, items=request.items)
        sized.append((one, len(one.model_dump_json(exclude_none=True).encode("utf-8")) + 1))  # and its comma
    return sized


ROOM = MAX_ENVELOPE_BYTES - _WRAPPER_BYTES  # for the requests of one envelope


def size(accepted: list[AcceptedRequest]) -> int | None:
    """The requests' bytes in envelopes; None when one of them does not fit an envelope on its own.
    Naming does not change it: every requestId is a GUID."""
    lengths = [length for _, length in _sized(accepted)]
    return None if any(length > ROOM for length in lengths) else sum(lengths)


def envelopes(accepted: list[AcceptedRequest], post_id: str) -> list[str]:
    """The envelopes' JSON texts, each under MAX_ENVELOPE_BYTES, for requests whose size() is not None."""
    texts: list[str] = []
    chunk: list[EnvelopeRequest] = []
    used = 0
    for one, length in _sized(accepted):
        if used + length > ROOM:
            texts.append(_text(post_id, chunk))
            chunk, used = [], 0
        chunk.append(one)
        used += length
    return texts + ([_text(post_id, chunk)] if chunk else [])


def _text(post_id: str, requests: list[EnvelopeRequest]) -> str:
    return IntakeEnvelope(postId=post_id, requests=requests).model_dump_json(exclude_none=True)


def send_all(texts: list[str], send: Callable[[str], T]) -> list[T]:
    """Send every envelope, in parallel; returns what each send returned, raises the first failure
    (the caller answers 503: a retry may then admit some requests twice under new ids, which README
    "When a subject can be called twice" covers)."""
    if len(texts) == 1:  # the common case: no thread to start
        return [send(texts[0])]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_SENDS, len(texts))) as pool:
        return list(pool.map(send, texts))


# Writes a post's received row while its envelopes are sent: a few threads for the whole process.
_ROW_WRITES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="received-row")


def write_post(texts: list[str], mark: Callable[[], None], send: Callable[[str], T],
               withdraw: Callable[[T], None]) -> None:
    """The post's received row (`mark`) and its envelopes (`send`), written at the same time: one
    round trip of waiting instead of two, and both done before the caller answers 202, so a GET
    never finds a 202's id unknown. Raises AzureError when an envelope could not be sent, and what
    `mark` raised when the row could not be written; the envelopes already sent are then withdrawn,
    so that nothing refused is admitted (one the queue door took meanwhile cannot be: README "When a
    subject can be called twice")."""
    row = _ROW_WRITES.submit(mark)
    try:
        sent = send_all(texts, send)
    except AzureError:
        row.exception()  # settled either way; the 503 is for the queue
        raise
    try:
        row.result()
    except Exception:
        for message in sent:
            try:
                withdraw(message)
            except AzureError as exc:
                log.warning("a refused post's envelope could not be withdrawn: %s", type(exc).__name__)
        raise


def is_envelope(text: str) -> bool:
    # Events never carry "kind": an object that starts so is ours.
    return text.lstrip().startswith('{"kind":"acceptedRequests"')


def opened(text: str) -> list[AcceptedRequest]:
    """The requests of an envelope, under their ids; raises pydantic.ValidationError."""
    envelope = IntakeEnvelope.model_validate_json(text)
    return [AcceptedRequest(requestId=r.requestId, correlationId=r.correlationId, priority=r.priority,
                            items=r.items) for r in envelope.requests]
