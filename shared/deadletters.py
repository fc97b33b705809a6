"""Dead-letter envelopes: the original input (cut to fit a queue message) and why it was refused.

Intake, the worker, the poison sweep and the Log Analytics uploader all write them."""
from __future__ import annotations

import json
from typing import Any

from shared.errors import RequestRejected
from shared.models import DeadLetter, ErrorInfo

MAX_DEAD_LETTER_DETAILS = 50


def dead_letter_for(reason: RequestRejected | ErrorInfo, source: str, original: str, limit: int = 48 * 1024,
                    **extra: Any) -> DeadLetter:
    info = reason.info if isinstance(reason, RequestRejected) else reason
    if isinstance(info.details, list) and len(info.details) > MAX_DEAD_LETTER_DETAILS:
        # A 1000-item bulk message can have thousands of problems: the first ones say enough.
        more = len(info.details) - MAX_DEAD_LETTER_DETAILS
        info = info.model_copy(update={"details": [*info.details[:MAX_DEAD_LETTER_DETAILS],
                                                   {"field": "(more)", "message": f"{more} more problem(s) not shown"}]})
    # The limit holds for the original as it will be written, JSON-escaped: quotes and control
    # characters grow it up to six-fold, and a dead letter over 64 KiB cannot be stored at all.
    encoded = original.encode("utf-8", "replace")
    kept = encoded[:limit].decode("utf-8", "ignore")
    while len(json.dumps(kept, ensure_ascii=False).encode("utf-8", "replace")) > limit:
        kept = kept[:len(kept) * 3 // 4]
    truncated = len(kept) < len(original)
    return DeadLetter(reason=info, source=source, original=kept, originalTruncated=truncated, **extra)
