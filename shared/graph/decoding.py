"""Turn Graph's stringKeyStringValuePair (JSON documents hidden in two strings) into an Outcome.

Graph has been seen answering with a `key` that is not JSON at all, so nothing here trusts the
shape: whatever cannot be read is kept as raw text beside the fields that could be.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from shared.models import (
    GraphKeyValue,
    Identity,
    ModifiedProperty,
    Outcome,
    Step,
    System,
)

UNKNOWN_RESULT = "Unknown"


def _loads_object(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _list_of(model: type, items: Any) -> list:
    """Keep every well-formed entry of a list; a malformed entry costs only itself."""
    if not isinstance(items, list):
        return []
    adapter = TypeAdapter(model)
    kept = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if model is ModifiedProperty:  # values are documented as strings but arrive as null too
            item = {k: _text(v) for k, v in item.items()}
        try:
            kept.append(adapter.validate_python(item))
        except ValidationError:
            continue
    return kept


def _one_of(model: type, item: Any) -> Any:
    if not isinstance(item, dict):
        return None
    try:
        return model.model_validate({k: _text(v) for k, v in item.items() if k in model.model_fields})
    except ValidationError:
        return None


def _result_fields(key: dict[str, Any] | None, status_info: dict[str, Any]) -> dict[str, str | None]:
    details = key.get("details") if key and isinstance(key.get("details"), dict) else {}
    return {"result": (_text(key.get("result")) if key else None) or UNKNOWN_RESULT,
            "errorCode": _text(details.get("errorCode")) or _text(status_info.get("errorCode")),
            "errorMessage": _text(details.get("errorMessage")) or _text(status_info.get("reason"))}


def decode(answer: GraphKeyValue) -> Outcome:
    if answer.problem is not None:
        # Graph acted (it answered 200) but its answer cannot be read: say so, keep what came.
        return Outcome(result=UNKNOWN_RESULT, errorCode="UnreadableGraphAnswer",
                       errorMessage=f"Graph answered 200 with {answer.problem}", rawBody=answer.body)
    key = _loads_object(answer.key)
    value = _loads_object(answer.value) or {}
    status_info = value.get("statusInfo") if isinstance(value.get("statusInfo"), dict) else None
    return Outcome(
        **_result_fields(key, status_info or {}),
        action=_text(value.get("action")),
        changeId=_text(value.get("changeId")),
        reportableIdentifier=_text(value.get("reportableIdentifier")),
        startTime=_text(value.get("startTime")),
        endTime=_text(value.get("endTime")),
        statusInfo=status_info,
        sourceIdentity=_one_of(Identity, value.get("sourceIdentity")),
        targetIdentity=_one_of(Identity, value.get("targetIdentity")),
        sourceSystem=_one_of(System, value.get("sourceSystem")),
        targetSystem=_one_of(System, value.get("targetSystem")),
        steps=_list_of(Step, value.get("provisioningSteps")),
        modifiedProperties=_list_of(ModifiedProperty, value.get("modifiedProperties")),
        # Raw text is kept only when it could not be fully understood, so results stay small.
        rawKey=None if key is not None else answer.key,
        rawValue=None if answer.value in (None, "") or _loads_object(answer.value) is not None else answer.value,
    )
