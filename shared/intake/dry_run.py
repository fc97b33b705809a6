"""Dry run (`POST /api/provision?dryRun=true`), the cmdlets' -WhatIf: the request is validated and
resolved exactly as a real one (defaults, rule discovery, group chunks), then described instead of
booked, so an operator can see the Graph calls before anything is provisioned."""
from __future__ import annotations

from typing import Any, Mapping

from shared.graph.client import provision_path
from shared.intake.validation import AcceptedRequest
from shared.models import WorkItem
from shared.settings import Settings

TRUE = {"1", "true", "yes", "on"}


def wanted(params: Mapping[str, str] | None) -> bool:
    if not params:
        return False
    lowered = {k.lower(): v for k, v in params.items()}
    return str(lowered.get("dryrun", "")).strip().lower() in TRUE


def _origin(item: WorkItem) -> dict[str, Any]:
    """The name the subject was given by and the CloudEvent the call came in, when so."""
    origin = {"subjectName": item.subject.name, "event": item.event}
    return {k: v.model_dump(exclude_none=True) for k, v in origin.items() if v is not None}


def describe(accepted: list[AcceptedRequest], settings: Settings) -> dict[str, Any]:
    version = settings.graph_api_version
    return {
        "dryRun": True,
        "accepted": len(accepted),
        # requestId stays null: none is minted, because nothing will carry it to Graph or to results.
        "requests": [{
            "requestId": None,
            "correlationId": request.correlationId,
            "calls": [{"method": "POST", "path": provision_path(version, item.servicePrincipalId, item.jobId),
                       "body": item.graph_body(), "callIndex": item.callIndex, "callCount": item.callCount,
                       **_origin(item)}
                      for item in request.items],
        } for request in accepted],
    }
