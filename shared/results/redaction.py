"""REDACT_PII=true: personal values in results become stable salted hashes.

`pii:` + the first 16 hex digits of HMAC-SHA256(REDACT_PII_SALT, value). The same value always
gives the same hash under one salt, so a consumer can still join results (the userPrincipalName in
modifiedProperties matches the one in a step's details) without ever seeing it; without the salt
a hash cannot be reversed by hashing a list of candidate names.

Redacted: modifiedProperties oldValue/newValue, every value in a step's `details`, step
`description`, reportableIdentifier, sourceIdentity/targetIdentity displayName, and rawValue
(the undecodable original of all of these). Kept: identifiers the caller sent (subject, ruleId,
servicePrincipalId, jobId), attribute names, result codes and Graph's error messages.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, TypeVar

from shared.models import Identity, Outcome

PREFIX = "pii:"
O = TypeVar("O", bound=Outcome)


def pseudonym(value: str, salt: str) -> str:
    return PREFIX + hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _text(value: str | None, salt: str) -> str | None:
    # Empty stays empty: "no value" is not personal, and consumers test for it.
    if value is None or value == "":
        return value
    return pseudonym(value, salt)


def _any(value: Any, salt: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value, salt)
    # Nested objects and numbers are hashed as their JSON, so a detail cannot smuggle data past us.
    return pseudonym(json.dumps(value, sort_keys=True, default=str), salt)


def _identity(identity: Identity | None, salt: str) -> Identity | None:
    if identity is None:
        return None
    return identity.model_copy(update={"displayName": _text(identity.displayName, salt)})


def redact(outcome: O, salt: str) -> O:
    """A copy of the result (or outcome) with personal values replaced; the input is not changed."""
    return outcome.model_copy(update={
        "reportableIdentifier": _text(outcome.reportableIdentifier, salt),
        "sourceIdentity": _identity(outcome.sourceIdentity, salt),
        "targetIdentity": _identity(outcome.targetIdentity, salt),
        "rawValue": _text(outcome.rawValue, salt),
        "modifiedProperties": [p.model_copy(update={"oldValue": _text(p.oldValue, salt),
                                                    "newValue": _text(p.newValue, salt)})
                               for p in outcome.modifiedProperties],
        "steps": [s.model_copy(update={
            "description": _text(s.description, salt),
            "details": None if s.details is None else {k: _any(v, salt) for k, v in s.details.items()},
        }) for s in outcome.steps],
    })
