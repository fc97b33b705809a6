"""The OpenAPI 3.0 description served at GET /api/openapi.json, built from the pydantic models so
that it cannot drift from what intake validates.

3.0 rather than 3.1 because Logic Apps / Power Platform custom connectors import 3.0: pydantic
writes JSON Schema 2020-12, so `anyOf [X, null]` becomes `nullable`, `const` becomes `enum`, and
`$defs` move to components. Checks done in validators (GUIDs, job and rule ids) are added as
patterns, so generated clients and fuzzers know them too.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from shared.intake.validation import MAX_ITEMS_PER_POST
from shared.models import (
    GUID_RE,
    JOB_ID_RE,
    LINKS_ALLOWED_ON,
    NAME_PROPERTIES,
    OBJECT_ID_FORMS,
    RULE_ID_RE,
    CompactEvent,
    ErrorInfo,
    GraphBodyEvent,
    RequestStatus,
)
from shared.settings import Settings

REF = "#/components/schemas/{model}"
JSON = "application/json"
# Added to what pydantic knows: these are enforced by field validators, invisible to JSON Schema.
PATTERNS = {
    "servicePrincipalId": GUID_RE.pattern,
    "jobId": JOB_ID_RE.pattern,
    "ruleId": RULE_ID_RE.pattern,
}
MEMBER_PATTERN = GUID_RE.pattern


def _nullable_options(node: dict[str, Any], options: str) -> None:
    """anyOf/oneOf with {"type": "null"} -> the other options with nullable: true (3.0 has no null type)."""
    kept = [o for o in node[options] if o != {"type": "null"}]
    if len(kept) == len(node[options]):
        return
    node.pop(options)
    if len(kept) == 1:
        # 3.0 ignores siblings of $ref: wrap it so nullable applies.
        node.update({"allOf": [kept[0]]} if "$ref" in kept[0] else kept[0])
    else:
        node[options] = kept
    node["nullable"] = True


def _to_openapi30(node: Any) -> Any:
    """JSON Schema 2020-12 (pydantic) -> the OpenAPI 3.0 schema dialect."""
    if isinstance(node, list):
        return [_to_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _to_openapi30(v) for k, v in node.items()}
    for options in ("anyOf", "oneOf"):
        if options in node:
            _nullable_options(node, options)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node.pop("examples", None)
    if node.get("default", 0) is None and not node.get("nullable"):
        node.pop("default")
    return node


def _add_patterns(schemas: dict[str, Any]) -> None:
    for name, schema in schemas.items():
        for field, prop in schema.get("properties", {}).items():
            prop.pop("title", None)  # pydantic's "Serviceprincipalid" would be the connector's label
            if field in PATTERNS and prop.get("type") == "string":
                prop.setdefault("pattern", PATTERNS[field])
            if name == "Member" and field == "objectId":
                prop.setdefault("pattern", MEMBER_PATTERN)


def _keep_allowed_links(links_schema: dict[str, Any], props: dict[str, Any], type_name: str) -> None:
    """Only the links this type may have (LINKS_ALLOWED_ON): members and owners for groups, a manager for users."""
    allowed = [link for link, types in LINKS_ALLOWED_ON.items() if type_name in types]
    for link in set(LINKS_ALLOWED_ON) - set(allowed):
        props.pop(link, None)  # the compact shape's flat links
    if "links" in props and allowed:
        links = copy.deepcopy(links_schema)
        links["properties"] = {k: v for k, v in links["properties"].items() if k in allowed}
        props["links"] = dict(links, nullable=True, default=None)
    else:
        props.pop("links", None)


def _names_for(variant: dict[str, Any], type_name: str) -> None:
    """Exactly one of objectId and the names that may stand for it (shared/intake/names.py)."""
    allowed = NAME_PROPERTIES.get(type_name, ())
    for props in NAME_PROPERTIES.values():
        for prop in props:
            if prop not in allowed:
                variant["properties"].pop(prop, None)
    variant["oneOf"] = [{"required": [p]} for p in ("objectId", *allowed)]


def _split_by_type(schemas: dict[str, Any], name: str) -> None:
    """objectId's form depends on objectTypeName (a validator, invisible to JSON Schema): one
    variant per type makes the rule part of the contract, so a generated valid body is valid."""
    base = schemas.pop(name)
    variants = []
    for type_name, (pattern, form) in OBJECT_ID_FORMS.items():
        variant = copy.deepcopy(base)
        props = variant["properties"]
        props["objectTypeName"] = {"type": "string", "enum": [type_name]}
        props["objectId"] = dict(props["objectId"], pattern=pattern.pattern, description=form)
        _keep_allowed_links(schemas["Links"], props, type_name)
        _names_for(variant, type_name)
        variant["title"] = f"{name} ({type_name})"
        key = f"{name}_{type_name}" if type_name != "user" else f"{name}_adUser"
        schemas[key] = variant
        variants.append({"$ref": REF.format(model=key)})
    schemas[name] = {"description": base.get("description", ""), "anyOf": variants}


def _model_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (GraphBodyEvent, CompactEvent, ErrorInfo, RequestStatus):
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas = _to_openapi30(schemas)
    _add_patterns(schemas)
    # A compact event's members may also be bare GUID strings (shorthand for {objectId}).
    compact = schemas["CompactEvent"]["properties"]
    shorthand = {"anyOf": [{"$ref": REF.format(model="Member")}, {"type": "string", "pattern": MEMBER_PATTERN}]}
    for name in ("members", "owners"):
        compact[name]["items"] = copy.deepcopy(shorthand)
    compact["manager"] = dict(copy.deepcopy(shorthand), nullable=True, default=None)
    for name in ("GraphSubject", "CompactEvent"):
        _split_by_type(schemas, name)
    schemas["ErrorBody"] = {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "description": 'Every error: {"error": {"code", "message", "details"}}.',
        "properties": {"error": {"$ref": REF.format(model="ErrorInfo")}},
    }
    schemas["Event"] = {"anyOf": [{"$ref": REF.format(model="GraphBodyEvent")},
                                  {"$ref": REF.format(model="CompactEvent")}]}
    schemas["CloudEvent"] = {
        "type": "object", "required": ["specversion", "id", "source", "type", "data"],
        "description": "CloudEvents 1.0 (structured mode); data is one request shape. source + id identify "
                       "the event; type, subject, source and id travel into every result as `event`.",
        "properties": {"specversion": {"type": "string", "enum": ["1.0"]},
                       **{a: {"type": "string", "minLength": 1, "maxLength": 512} for a in ("id", "source", "type")},
                       "subject": {"type": "string", "maxLength": 512},
                       "datacontenttype": {"type": "string", "enum": ["application/json"]},
                       "data": {"$ref": REF.format(model="Event")}},
    }
    schemas["ProvisionRequest"] = {
        "description": "A Graph provisionOnDemand body, a compact event, or an array of them (all or nothing).",
        "anyOf": [{"$ref": REF.format(model="Event")},
                  {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS_PER_POST,
                   "items": {"$ref": REF.format(model="Event")}}],
    }
    schemas["Accepted"] = {
        "type": "object", "required": ["accepted", "requests"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 1},
            "requests": {"type": "array", "items": {
                "type": "object", "required": ["requestId", "calls"],
                "properties": {"requestId": {"type": "string"},
                               "correlationId": {"type": "string", "nullable": True},
                               "calls": {"type": "integer", "minimum": 1},
                               "priority": {"type": "string", "enum": ["normal", "high"]}}}},
        },
    }
    schemas["Health"] = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    return schemas


RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {JSON: {"schema": {"$ref": REF.format(model="ErrorBody")}}}}
    if headers:
        response["headers"] = headers
    return response


@lru_cache(maxsize=1)
def _static_spec(signature_header: str, timestamp_header: str) -> dict[str, Any]:
    signature_params = [
        {"name": signature_header, "in": "header", "required": False,
         "description": "Only when WEBHOOK_HMAC_SECRET is set: sha256=<hex HMAC-SHA256(secret, timestamp LF METHOD "
                        "LF path LF canonical query LF body)>, see docs/security.md",
         "schema": {"type": "string"}},
        {"name": timestamp_header, "in": "header", "required": False,
         "description": "Only when WEBHOOK_HMAC_SECRET is set: the signing time, whole epoch seconds",
         "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}},
        {"name": "Idempotency-Key", "in": "header", "required": False,
         "description": "Your key for this request (IETF httpapi draft): a retry with the same key and body gets "
                        "the first 202 again (Idempotent-Replayed: true) and queues nothing",
         "schema": {"type": "string", "minLength": 1, "maxLength": 257}},
    ]
    return {
        "openapi": "3.0.3",
        "info": {"title": "Provision on demand", "version": "1.0.0",
                 "description": "Turns HR and ticketing events into Microsoft Graph provisionOnDemand calls, "
                                "within Graph's rate limit; results go to a queue."},
        "paths": {
            "/api/provision": {"post": {
                "operationId": "Provision",
                "summary": "Queue provisionOnDemand calls",
                "description": "Validates, splits into Graph calls and books their slots; never waits for Graph.",
                "parameters": signature_params,
                "requestBody": {"required": True, "content": {
                    JSON: {"schema": {"$ref": REF.format(model="ProvisionRequest")}},
                    # Binary mode (ce-* headers with a JSON body) is the JSON body above plus headers.
                    "application/cloudevents+json": {"schema": {"$ref": REF.format(model="CloudEvent")}},
                    "application/cloudevents-batch+json": {"schema": {
                        "type": "array", "minItems": 1, "maxItems": MAX_ITEMS_PER_POST,
                        "items": {"$ref": REF.format(model="CloudEvent")}}}}},
                "responses": {
                    "202": {"description": "Accepted; results follow on the results queue",
                            "headers": {"Idempotent-Replayed": {
                                "description": "true when this is the remembered answer to an earlier request "
                                               "with the same Idempotency-Key", "schema": {"type": "string"}}},
                            "content": {JSON: {"schema": {"$ref": REF.format(model="Accepted")}}}},
                    "400": _error("Not JSON (InvalidJson), not UTF-8 (InvalidEncoding), or a malformed "
                                  "Idempotency-Key (InvalidIdempotencyKey)"),
                    "401": _error("No valid function key, or a missing/invalid/replayed webhook signature "
                                  "(SignatureMissing, SignatureInvalid, SignatureVersionUnsupported, "
                                  "SignatureReplayed, TimestampOutOfRange)"),
                    "409": _error("A request with this Idempotency-Key is still being accepted "
                                  "(IdempotencyKeyInProgress)", RETRY_AFTER),
                    "413": _error("Body over MAX_BODY_BYTES (PayloadTooLarge), over 1000 events (TooManyItems), "
                                  "over MAX_CALLS_PER_POST Graph calls (TooManyCalls), or more than 100 names to "
                                  "look up (TooManyLookups)"),
                    "415": _error("Not JSON content (UnsupportedMediaType)"),
                    "422": _error("A field is wrong or missing (ValidationFailed, EmptyRequest, InvalidCloudEvent), "
                                  "a name matches no or several objects (NameNotFound, NameAmbiguous, "
                                  "JobNotDetermined, NameLookupNotPermitted), callbackUrl is refused "
                                  "(CallbackUrlRefused), or the Idempotency-Key was used with another body "
                                  "(IdempotencyKeyReused)"),
                    "503": _error("The backlog would delay these calls more than MAX_EXPECTED_WAIT_HOURS "
                                  "(BacklogTooLong), the status table or the key table cannot be reached "
                                  "(StatusStoreUnavailable, KeyStoreUnavailable), or Graph cannot resolve a name "
                                  "just now (DirectoryUnavailable)", RETRY_AFTER),
                },
            }, "options": {
                "operationId": "CloudEventsHandshake",
                "summary": "CloudEvents abuse-protection handshake (Azure Event Grid webhook validation)",
                "parameters": [{"name": "WebHook-Request-Origin", "in": "header", "required": True,
                                "schema": {"type": "string"}},
                               {"name": "WebHook-Request-Rate", "in": "header", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "Deliveries from that origin are welcome",
                            "headers": {"WebHook-Allowed-Origin": {"schema": {"type": "string"}},
                                        "WebHook-Allowed-Rate": {"schema": {"type": "string"}}}},
                    "400": _error("WebHook-Request-Origin missing or not a DNS name (InvalidWebHookRequestOrigin)"),
                    "401": _error("No valid function key"),
                },
            }},
            "/api/provision/{requestId}": {"get": {
                "operationId": "RequestStatus",
                "summary": "Where a request stands",
                "description": "State (received, queued, waiting, calling, succeeded, skipped, failed, "
                               "dead-lettered; received: accepted with FAST_INTAKE, not yet admitted), "
                               "attempts, the ETA while it waits, and each call's result once it has one. "
                               "Calls come 100 to a page (`page`, `pageCount`, `nextPage`); above 100 calls, "
                               "`state` and `eta` describe the calls on the page read.",
                "parameters": [{"name": "requestId", "in": "path", "required": True,
                                "description": "The requestId from the 202 answer",
                                "schema": {"type": "string", "pattern": GUID_RE.pattern}},
                               {"name": "page", "in": "query", "required": False,
                                "description": "Which 100 calls to show, from 1 (the default)",
                                "schema": {"type": "integer", "minimum": 1, "default": 1}}],
                "responses": {
                    "200": {"description": "The request's status",
                            "content": {JSON: {"schema": {"$ref": REF.format(model="RequestStatus")}}}},
                    "400": _error("Not a requestId (InvalidRequestId), or no such page (InvalidPage)"),
                    "401": _error("No valid function key"),
                    "404": _error("No such request (RequestNotFound)"),
                    "503": _error("The status table cannot be reached (StatusStoreUnavailable)", RETRY_AFTER),
                },
            }},
            "/api/health": {"get": {
                "operationId": "Health",
                "summary": "Liveness probe (anonymous)",
                "security": [],
                "responses": {"200": {"description": "The host answers",
                                      "content": {JSON: {"schema": {"$ref": REF.format(model="Health")}}}},
                              "401": _error("deep=true needs the function key: use /api/health/deep")},
                "parameters": [{"name": "deep", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "true is refused here: the deep check needs a key"}],
            }},
        },
        "components": {
            "schemas": _model_schemas(),
            "securitySchemes": {
                "functionKeyHeader": {"type": "apiKey", "in": "header", "name": "x-functions-key"},
                "functionKeyQuery": {"type": "apiKey", "in": "query", "name": "code"},
            },
        },
        "security": [{"functionKeyHeader": []}, {"functionKeyQuery": []}],
    }


def build_spec(settings: Settings, server_url: str | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(_static_spec(settings.webhook_signature_header, settings.webhook_timestamp_header))
    if server_url:
        spec["servers"] = [{"url": server_url.rstrip("/")}]
    return spec
