"""What an HTTP function answers, without the host's types: function_app.py turns it into a response."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.errors import RequestRejected


@dataclass
class HttpReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    work: list[str] = field(default_factory=list)  # work items due now, for the queue output binding

    def json(self) -> str:
        return json.dumps(self.body)


def error_reply(rejected: RequestRejected) -> HttpReply:
    return HttpReply(rejected.status, {"error": rejected.info.model_dump(exclude_none=True)}, rejected.headers)
