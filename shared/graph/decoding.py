"""Turn Graph's stringKeyStringValuePair (JSON documents hidden in two strings) into an Outcome
with a plain verdict.

provisionOnDemand answers in three shapes, all decoded into the same Outcome:
- "documented": `key` is a JSON string `{"result", "details": {"errorCode", "errorMessage"}}` and
  `value` a JSON object with action, provisioningSteps, statusInfo, identities and systems
  (https://learn.microsoft.com/graph/api/synchronization-synchronizationjob-provisionondemand);
- "group": the same key, `value` = "{}" (one group with its members, example 3 of that page);
- "statusInfo": `key` is the literal STATUS_INFO_KEY and `value` a JSON array
  `[{"provisioningSteps": [...]}]`, as in Microsoft's cross-tenant synchronization tutorial
  (https://learn.microsoft.com/entra/identity/multi-tenant-organizations/cross-tenant-synchronization-configure-graph);
  there is no result field, so the result is derived from the steps' statuses.
Anything else is "unreadable": nothing here trusts the shape, and whatever cannot be read is kept
as raw text beside the fields that could be.

The verdict (see `verdict_of` and the README's "Verdicts" table) comes from the step names,
statuses and error codes: an export step that succeeded says what was done (EntryExportAdd ->
created), a skip says why nothing was (RedundantExport -> noChange, NotEffectivelyEntitled or a
failed scoping step -> outOfScope).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from shared.models import (
    AnswerShape,
    GraphKeyValue,
    Identity,
    ModifiedProperty,
    Outcome,
    Step,
    System,
    Verdict,
)

UNKNOWN_RESULT = "Unknown"
STATUS_INFO_KEY = "Microsoft.Identity.Health.CPP.Common.DataContracts.SyncFabric.StatusInfo"

# Export step names (provisioning logs) and the change each reports when its status is Success.
EXPORT_VERDICTS: dict[str, Verdict] = {
    "EntryExportAdd": "created", "EntryExportUpdate": "updated", "EntryExportDelete": "deleted",
    "EntryExportUpdateSoftDelete": "disabled", "EntryExportSoftDelete": "disabled",
}
# The value's `action` (provisioningAction: create, update, delete, disable, stagedDelete, other),
# used when no export step says more.
ACTION_VERDICTS: dict[str, Verdict] = {
    "create": "created", "update": "updated", "delete": "deleted", "disable": "disabled", "stageddelete": "disabled",
}
NO_CHANGE_CODES = frozenset({"RedundantExport"})
# Skip reasons meaning "not assigned to the app, or filtered out by its scoping rules".
OUT_OF_SCOPE_CODES = frozenset({"NotEffectivelyEntitled", "NotInScope", "ScopingFilterNotMet", "OutOfScope"})
FAILED_RESULTS = frozenset({"failure", "error"})

OUT_OF_SCOPE_DIAGNOSIS = ("The subject was skipped as not in scope: it is not assigned to the app or not in scope yet; "
                          "assignments take a few minutes to apply. Check the assignment and scoping filters, then "
                          "send it again (or set OUT_OF_SCOPE_RETRY_MINUTES).")
NO_DETAILS_DIAGNOSIS = ("Graph accepted the call but answered without steps (its answer for a group): see the job's "
                        "provisioning logs for what changed.")
UNREADABLE_DIAGNOSIS = "Graph's answer could not be read; rawKey/rawValue (or rawBody) hold it as received."
# 401 with code UnknownError and an empty message is what Graph answers when the identity holds
# Application.ReadWrite.OwnedBy but does not own the enterprise app's service principal.
UNKNOWN_401_DIAGNOSIS = ("Graph refused the identity (401 UnknownError): the identity lacks the role, or with "
                         "Application.ReadWrite.OwnedBy it does not own the enterprise app's service principal "
                         "(owning the app registration is not enough). Grant Synchronization.ReadWrite.All or add the "
                         "identity as an owner of the service principal.")


@dataclass(frozen=True)
class _Answer:
    """What an answer says, whatever its shape."""

    shape: AnswerShape
    key: dict[str, Any] | None  # the key document (documented and group shapes)
    value: dict[str, Any]  # the value document; for statusInfo, its entries merged
    raw_value: str | None  # the value as received, when it could not be read


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _loads_object(text: str | None) -> dict[str, Any] | None:
    parsed = _loads(text)
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


def _status_info_value(text: str | None) -> dict[str, Any] | None:
    """The array's entries as one value document (steps concatenated), or None when unreadable."""
    entries = _loads(text)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    merged: dict[str, Any] = {}
    for entry in entries:
        merged = {**entry, **merged}
    steps = [s for e in entries if isinstance(e.get("provisioningSteps"), list) for s in e["provisioningSteps"]]
    return {**merged, "provisioningSteps": steps}


def _status_info_answer(text: str | None) -> _Answer:
    value = _status_info_value(text) or {}
    # Without steps there is nothing to derive a result from: keep what came, as for any unreadable value.
    return _Answer("statusInfo", None, value, None if value.get("provisioningSteps") else text)


def read_answer(answer: GraphKeyValue) -> _Answer:
    if (answer.key or "").strip() == STATUS_INFO_KEY:
        return _status_info_answer(answer.value)
    key = _loads_object(answer.key)
    value = _loads_object(answer.value)
    raw_value = None if answer.value in (None, "") or value is not None else answer.value
    if key is None:
        return _Answer("unreadable", None, value or {}, raw_value)
    return _Answer("group" if value == {} else "documented", key, value or {}, raw_value)


def result_from_steps(steps: list[Step]) -> str:
    """The statusInfo shape has no result: the worst step status stands for it."""
    statuses = {(s.status or "").lower() for s in steps}
    for status, result in (("failure", "Failure"), ("skipped", "Skipped"), ("warning", "Warning")):
        if status in statuses:
            return result
    return "Success" if steps and statuses == {"success"} else UNKNOWN_RESULT


def _skip_reason(steps: list[Step]) -> str | None:
    for step in steps:
        if (step.status or "").lower() in ("skipped", "failure") and step.details:
            reason = step.details.get("SkipReason") or step.details.get("ErrorCode")
            if isinstance(reason, str) and reason:
                return reason
    return None


def _failed_scoping(steps: list[Step]) -> bool:
    return any((s.type or "").lower() == "scoping" and (s.status or "").lower() in ("skipped", "failure")
               for s in steps)


def _export_verdict(steps: list[Step], action: str | None) -> tuple[Verdict, str] | None:
    for step in steps:
        if step.name in EXPORT_VERDICTS and (step.status or "").lower() in ("success", "warning"):
            return EXPORT_VERDICTS[step.name], step.name
    by_action = ACTION_VERDICTS.get((action or "").lower())
    return (by_action, f"action:{action}") if by_action else None


def _skip_verdict(result: str, error_code: str | None, steps: list[Step]) -> tuple[Verdict, str] | None:
    if error_code in NO_CHANGE_CODES:
        return "noChange", error_code
    if error_code in OUT_OF_SCOPE_CODES:
        return "outOfScope", error_code
    if result == "Skipped" and _failed_scoping(steps):
        return "outOfScope", error_code or "ScopingSkipped"
    return None


def verdict_of(result: str, error_code: str | None, steps: list[Step], action: str | None) -> tuple[Verdict, str]:
    """(verdict, reasonCode): what happened, and the Graph identifier that says so."""
    if result.lower() in FAILED_RESULTS:
        return "failed", error_code or result
    known = _skip_verdict(result, error_code, steps) or (
        _export_verdict(steps, action) if result in ("Success", "Warning") else None)
    if known is not None:
        return known
    if result == "Success" and not steps:
        return "unknown", "SucceededWithoutSteps"
    return "unknown", error_code or ("Unreadable" if result == UNKNOWN_RESULT else result)


def diagnosis_of(verdict: Verdict, reason: str) -> str | None:
    if verdict == "outOfScope":
        return OUT_OF_SCOPE_DIAGNOSIS
    if reason == "SucceededWithoutSteps":
        return NO_DETAILS_DIAGNOSIS
    if reason == "Unreadable":
        return UNREADABLE_DIAGNOSIS
    return None


def failure_outcome(result: str, code: str, message: str, status: int | None) -> Outcome:
    """The result of a call that was given up on (no provisioning answer): always failed."""
    diagnosis = UNKNOWN_401_DIAGNOSIS if status == 401 and code == "UnknownError" else None
    return Outcome(result=result, errorCode=code, errorMessage=message, verdict="failed", reasonCode=code,
                   diagnosis=diagnosis)


def _error_code(details: dict[str, Any], status_info: dict[str, Any], steps: list[Step]) -> str | None:
    """The key's errorCode, else statusInfo's, else (statusInfo shape: no key) a skipped step's reason."""
    return _text(details.get("errorCode")) or _text(status_info.get("errorCode")) or _skip_reason(steps)


def unreadable_body(answer: GraphKeyValue) -> Outcome:
    """A 200 whose body was not the {key, value} pair of strings: Graph acted, what it said is kept."""
    return Outcome(result=UNKNOWN_RESULT, verdict="unknown", reasonCode="UnreadableGraphAnswer",
                   diagnosis=UNREADABLE_DIAGNOSIS, answerShape="unreadable", errorCode="UnreadableGraphAnswer",
                   errorMessage=f"Graph answered 200 with {answer.problem}", rawBody=answer.body)


def decode(answer: GraphKeyValue) -> Outcome:
    if answer.problem is not None:
        return unreadable_body(answer)
    read = read_answer(answer)
    key, value = read.key or {}, read.value
    details = key.get("details") if isinstance(key.get("details"), dict) else {}
    status_info = value.get("statusInfo") if isinstance(value.get("statusInfo"), dict) else {}
    steps = _list_of(Step, value.get("provisioningSteps"))
    result = _text(key.get("result")) or (result_from_steps(steps) if read.shape == "statusInfo" else UNKNOWN_RESULT)
    error_code = _error_code(details, status_info, steps if read.shape == "statusInfo" else [])
    verdict, reason = verdict_of(result, error_code, steps, _text(value.get("action")))
    return Outcome(
        result=result, verdict=verdict, reasonCode=reason, diagnosis=diagnosis_of(verdict, reason),
        answerShape=read.shape, errorCode=error_code,
        errorMessage=_text(details.get("errorMessage")) or _text(status_info.get("reason")),
        action=_text(value.get("action")),
        changeId=_text(value.get("changeId")),
        reportableIdentifier=_text(value.get("reportableIdentifier")),
        startTime=_text(value.get("startTime")),
        endTime=_text(value.get("endTime")),
        statusInfo=status_info or None,
        sourceIdentity=_one_of(Identity, value.get("sourceIdentity")),
        targetIdentity=_one_of(Identity, value.get("targetIdentity")),
        sourceSystem=_one_of(System, value.get("sourceSystem")),
        targetSystem=_one_of(System, value.get("targetSystem")),
        steps=steps,
        modifiedProperties=_list_of(ModifiedProperty, value.get("modifiedProperties")),
        # Raw text is kept only when it could not be fully understood, so results stay small.
        rawKey=answer.key if read.shape == "unreadable" else None,
        rawValue=read.raw_value,
    )
