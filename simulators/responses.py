"""Bodies the Graph simulator answers provisionOnDemand with.

- The three documented examples (`golden/example*.json`) are served verbatim when the first
  subject's objectId matches the example's.
- Anything else gets a generated, realistic Success (action "Create") in the shape of example 1,
  or, for a cross-tenant synchronization job (templateId Azure2Azure), in the StatusInfo shape of
  Microsoft's cross-tenant synchronization tutorial: `key` the literal STATUS_INFO_KEY, `value` a
  JSON array `[{"provisioningSteps": [...]}]` (golden/statusinfo_tutorial.json).
- A subject not in scope yet gets Skipped / NotEffectivelyEntitled, in either shape.
- Graph error bodies (`{"error": {"code", "message", "innerError": {...}}}`).
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
STRING_PAIR_TYPE = "microsoft.graph.stringKeyStringValuePair"
STATUS_INFO_KEY = "Microsoft.Identity.Health.CPP.Common.DataContracts.SyncFabric.StatusInfo"
CROSS_TENANT_TEMPLATE = "Azure2Azure"  # the templateId of cross-tenant synchronization jobs
NOT_ENTITLED_MESSAGE = ("The {kind} '{who}' will be skipped due to the following reasons: 1) This object is not assigned "
                        "to the application. 2) This object does not have required entitlement for provisioning.")

_SIM_NAMESPACE = uuid.UUID("9a1c4f3e-7b2d-4e8a-b6c1-0d2e3f4a5b6c")


def load_golden(directory: Path | str = GOLDEN_DIR) -> dict[str, dict[str, Any]]:
    """{first subject objectId: golden example (url, servicePrincipalId, jobId, request, response)}."""
    examples: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("example*.json")):
        example = json.loads(path.read_text(encoding="utf-8"))
        example["file"] = path.name
        subject = example["request"]["parameters"][0]["subjects"][0]
        examples[subject["objectId"]] = example
    return examples


def odata_context(root: str, version: str) -> str:
    return f"{root.rstrip('/')}/{version}/$metadata#{STRING_PAIR_TYPE}"


def graph_error(code: str, message: str, request_id: str, client_request_id: str,
                now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(timezone.utc)
    return {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": now.strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": client_request_id,
            },
        }
    }


def iso7(t: datetime) -> str:
    """Timestamps as the provisioning service writes them: 7 fractional digits and Z."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}0Z"


# Source/target systems per objectTypeName (the documented provisioning directions).
_FLOWS: dict[str, dict[str, str]] = {
    "User": {  # Entra ID -> third-party app (example 1)
        "source": "Azure Active Directory", "target": "customappsso",
        "source_type": "User", "target_type": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User",
        "kind": "User",
    },
    "user": {  # Cloud Sync, AD -> Entra ID (example 2)
        "source": "Active Directory", "target": "Azure Active Directory",
        "source_type": "user", "target_type": "User", "kind": "user",
    },
    "Worker": {  # Workday -> AD
        "source": "Workday", "target": "Active Directory",
        "source_type": "Worker", "target_type": "user", "kind": "Worker",
    },
    "Group": {  # Entra ID -> third-party app, group without members
        "source": "Azure Active Directory", "target": "customappsso",
        "source_type": "Group", "target_type": "urn:ietf:params:scim:schemas:core:2.0:Group",
        "kind": "Group",
    },
}


def _names(object_id: str, type_name: str) -> tuple[str, str, str]:
    """(display name, nickname, reportable identifier) derived from the objectId."""
    if object_id.upper().startswith("CN="):
        cn = object_id.split(",", 1)[0][3:]
        nick = "".join(ch for ch in cn.lower() if ch.isalnum()) or "user"
        return cn, nick, f"{nick}@contoso.com"
    short = "".join(ch for ch in object_id.lower() if ch.isalnum())[:8] or "object"
    if type_name.lower() == "group":
        return f"Group {short}", f"group-{short}", f"Group {short}"
    if type_name == "Worker":
        return f"Worker {object_id}", f"worker{short}", f"worker{short}@contoso.com"
    return f"User {short}", f"user{short}", f"user{short}@contoso.com"


def _import_steps(kind: str, reportable: str, flow: dict[str, str], source_attrs: dict[str, str],
                  stamps: list[datetime]) -> list[dict[str, Any]]:
    return [
        {
            "name": "EntryImport", "type": "Import", "status": "Success",
            "description": f"Retrieved {kind} '{reportable}' from {flow['source']}",
            "timestamp": iso7(stamps[0]), "details": dict(source_attrs),
        },
        {
            "name": "EntryImport", "type": "Matching", "status": "Success",
            "description": f"{kind} '{reportable}' was not found in {flow['target']}; a new {kind} will be created",
            "timestamp": iso7(stamps[1]), "details": {},
        },
    ]


def _outcome_steps(kind: str, reportable: str, flow: dict[str, str], target_id: str, stamps: list[datetime],
                   in_scope: bool) -> list[dict[str, Any]]:
    if not in_scope:
        return [{
            "name": "EntrySynchronizationSkip", "type": "Export", "status": "Skipped",
            "description": NOT_ENTITLED_MESSAGE.format(kind=kind, who=reportable),
            "timestamp": iso7(stamps[2]), "details": {"SkipReason": "NotEffectivelyEntitled"},
        }]
    return [
        {
            "name": "EntrySynchronizationScoping", "type": "Scoping", "status": "Success",
            "description": f"Determine if {kind} in scope by evaluating against each scoping filter",
            "timestamp": iso7(stamps[2]),
            "details": {"Active in the source system": "True", "Assigned to the application": "True",
                        "Scoping filter evaluation passed": "True"},
        },
        {
            "name": "EntryExportAdd", "type": "Export", "status": "Success",
            "description": f"{kind} '{reportable}' was created in {flow['target']}",
            "timestamp": iso7(stamps[3]), "details": {"ReportableIdentifier": reportable, "id": target_id},
        },
    ]


def generate_success(subject: dict[str, Any], now: datetime | None = None, *, status_info: bool = False,
                     in_scope: bool = True) -> dict[str, str]:
    """A Create result for one subject: {"key": <JSON string>, "value": <JSON string>}; Skipped
    (NotEffectivelyEntitled) when not `in_scope`; in the StatusInfo shape when `status_info`."""
    type_name = str(subject.get("objectTypeName", "User"))
    object_id = str(subject.get("objectId", ""))
    links = subject.get("links") or {}
    result = "Success" if in_scope else "Skipped"
    details = {} if in_scope else {"errorCode": "NotEffectivelyEntitled"}
    key = json.dumps({"result": result, "details": details}, separators=(",", ":"))
    if type_name.lower() == "group" and links.get("members") and in_scope and not status_info:
        return {"key": key, "value": "{}"}  # like example 3

    flow = _FLOWS.get(type_name) or dict(_FLOWS["User"], source_type=type_name, kind=type_name)
    display, nick, reportable = _names(object_id, type_name)
    target_id = str(uuid.uuid5(_SIM_NAMESPACE, f"{flow['target']}:{object_id}"))
    source_id = object_id if flow["source"] == "Azure Active Directory" else str(
        uuid.uuid5(_SIM_NAMESPACE, f"{flow['source']}:{object_id}"))

    start = now or datetime.now(timezone.utc)
    stamps = [start + timedelta(milliseconds=ms) for ms in (0, 38, 171, 203, 412)]
    source_attrs: dict[str, str] = {"objectId": source_id, "accountEnabled": "True", "displayName": display,
                                    "mailNickname": nick}
    if flow["kind"] != "Group":
        source_attrs["userPrincipalName"] = reportable
    source_attrs["IsSoftDeleted"] = "False"
    kind = flow["kind"]
    steps = (_import_steps(kind, reportable, flow, source_attrs, stamps)
             + _outcome_steps(kind, reportable, flow, target_id, stamps, in_scope))
    if status_info:
        return {"key": STATUS_INFO_KEY, "value": json.dumps([{"provisioningSteps": steps}], separators=(",", ":"))}
    value = {
        "action": "Create" if in_scope else "Other",
        "changeId": str(uuid.uuid4()),
        "endTime": iso7(stamps[4]),
        "modifiedProperties": [
            {"displayName": name, "oldValue": None, "newValue": val} for name, val in source_attrs.items()
        ],
        "provisioningSteps": steps,
        "reportableIdentifier": reportable,
        "startTime": iso7(stamps[0]),
        "statusInfo": {"status": result, "errorCode": details.get("errorCode"), "reason": None,
                       "additionalDetails": None, "errorCategory": None, "recommendedAction": None},
        "sourceIdentity": {"id": source_id, "type": flow["source_type"], "displayName": display, "details": None},
        "sourceSystem": {"id": None, "name": flow["source"], "details": None},
        "targetIdentity": {"id": target_id, "type": flow["target_type"], "displayName": display, "details": None},
        "targetSystem": {"id": None, "name": flow["target"], "details": None},
    }
    return {"key": key, "value": json.dumps(value, separators=(",", ":"))}
