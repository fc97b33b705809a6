"""Dead-letter envelopes: the original input and why it was refused, always within a queue message.

Intake, the worker, the poison sweep and the Log Analytics uploader all write them."""
from __future__ import annotations

from typing import Any

from shared.errors import RequestRejected
from shared.models import DeadLetter, ErrorInfo
from shared.queues import MAX_MESSAGE_BYTES
from shared.results.sizing import fit

MAX_DEAD_LETTER_DETAILS = 50
# Room for the queue's own envelope around the text; a message over 64 KiB cannot be stored at all.
DEAD_LETTER_LIMIT = MAX_MESSAGE_BYTES - 2048
# Where a dead letter came from and what it belongs to: short, and needed to act on it.
DEAD_LETTER_KEEP = frozenset({"source", "requestId", "attempts", "deadLetteredAt", "originalTruncated"})


def dead_letter_for(reason: RequestRejected | ErrorInfo, source: str, original: str, limit: int = DEAD_LETTER_LIMIT,
                    **extra: Any) -> DeadLetter:
    """The dead letter, cut to `limit` bytes of JSON: the original and the reason's details (which
    echo field names of the input, however long) are cut, largest first, and marked as such."""
    info = reason.info if isinstance(reason, RequestRejected) else reason
    if isinstance(info.details, list) and len(info.details) > MAX_DEAD_LETTER_DETAILS:
        # A 1000-item bulk message can have thousands of problems: the first ones say enough.
        more = len(info.details) - MAX_DEAD_LETTER_DETAILS
        info = info.model_copy(update={"details": [*info.details[:MAX_DEAD_LETTER_DETAILS],
                                                   {"field": "(more)", "message": f"{more} more problem(s) not shown"}]})
    letter = DeadLetter(reason=info, source=source, original=original, **extra)
    text, cut = fit(letter, limit, keep=DEAD_LETTER_KEEP, marker="truncatedFields")
    # Rebuilt from the text even when nothing was cut: the text is what a queue accepts.
    return DeadLetter.model_validate_json(text).model_copy(update={"originalTruncated": "original" in cut})
