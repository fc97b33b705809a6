"""What each function does, free of azure.functions types: function_app.py only adapts to these."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import RequestRejected
from .intake import accept, check_http_request, dead_letter_for, decode_queue_text
from .runtime import Runtime
from .worker import handle_work_message

log = logging.getLogger(__name__)


@dataclass
class HttpReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> str:
        return json.dumps(self.body)


def _error_reply(rejected: RequestRejected) -> HttpReply:
    return HttpReply(rejected.status, {"error": rejected.info.model_dump(exclude_none=True)}, rejected.headers)


def _enqueue(accepted, rt: Runtime) -> None:
    for request in accepted:
        for item in request.items:
            rt.queues.send_json(rt.settings.work_queue, item)


def provision_http(body: bytes, headers: Mapping[str, str], rt: Runtime) -> HttpReply:
    try:
        text = check_http_request(body, headers, rt.settings)
        accepted = accept(text, rt.settings)
    except RequestRejected as rejected:
        return _error_reply(rejected)
    _enqueue(accepted, rt)
    log.info("accepted %d request(s), %d call(s) over HTTP", len(accepted), sum(len(a.items) for a in accepted))
    return HttpReply(202, {"accepted": len(accepted), "requests": [a.summary() for a in accepted]})


def intake_message(raw: bytes | str, rt: Runtime) -> None:
    """A message on the intake queue. Bad input is dead-lettered at once: retrying cannot fix it."""
    original = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        accepted = accept(decode_queue_text(raw), rt.settings)
    except RequestRejected as rejected:
        log.warning("intake message dead-lettered: %s", rejected.info.code)
        rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(rejected, "intake", original))
        return
    _enqueue(accepted, rt)
    log.info("accepted %d request(s) from the intake queue: %s", len(accepted),
             ", ".join(a.requestId for a in accepted))


def work_message(raw: bytes | str, rt: Runtime) -> None:
    handle_work_message(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw, rt)


def lease_upkeep(rt: Runtime) -> None:
    rt.gate_for().ensure_pool()
