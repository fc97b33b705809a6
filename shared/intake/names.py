"""Subjects and applications by name, resolved at intake through Microsoft Graph directory reads.

An HR or ticketing system knows a user principal name, a mail or an employee id, and a group's
mail nickname or display name, rarely an Entra object id; an operator knows the enterprise app's
display name or appId rather than its service principal id. Intake looks them up with
`GET /users?$filter=...`, `/groups?$filter=...` and `/servicePrincipals?$filter=...` using the managed
identity token the app already has. These are directory reads, not provisionOnDemand calls: they
take no lease token and never spend the 5-per-10-s budget.

Exactly one match is needed. None or several is the caller's to fix (422, or a dead letter on the
queue door), with a few candidates to choose from, hashed when REDACT_PII is on. Unique answers
are cached for NAME_CACHE_SECONDS; misses are not, so a user created a moment ago is found on the
next try. A Graph outage is a 503 with Retry-After (the queue door redelivers).

Filtering on employeeId is an advanced query: Graph wants `ConsistencyLevel: eventual` and
`$count=true` (https://learn.microsoft.com/graph/aad-advanced-queries). String literals in
$filter are quoted with single quotes, a quote inside doubled
(https://learn.microsoft.com/graph/query-parameters#escaping-single-quotes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from shared.errors import GraphFailure, RequestRejected
from shared.graph.client import GraphClient
from shared.intake.rule_discovery import RETRY_AFTER_SECONDS, RuleCache
from shared.models import GUID_RE, SubjectName
from shared.results.redaction import pseudonym
from shared.settings import Settings

log = logging.getLogger(__name__)

CANDIDATES_SHOWN = 5
# Lookups run while the caller waits: a bulk post naming 1000 strangers would hold the HTTP
# function for minutes. Cached answers do not count.
MAX_READS_PER_POST = 100
ADVANCED_QUERY = frozenset({"employeeId"})
GRANT_HINT = ("grant it with infra/scripts/grant-graph-permission.sh --directory-read (or .ps1 -DirectoryRead), "
              "or send the object id instead")


@dataclass(frozen=True)
class Collection:
    path: str  # under /{version}
    noun: str  # for messages
    select: str
    permission: str  # the least Graph application permission that reads it


USERS = Collection("users", "user", "id,displayName,userPrincipalName,mail,employeeId", "User.Read.All")
GROUPS = Collection("groups", "group", "id,displayName,mailNickname", "Group.Read.All")
APPLICATIONS = Collection("servicePrincipals", "service principal", "id,appId,displayName", "Application.Read.All")
COLLECTIONS = {"User": USERS, "Group": GROUPS}


def odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def filter_request(collection: Collection, prop: str, value: str) -> tuple[dict[str, str], dict[str, str]]:
    """(query parameters, headers) of the lookup. $top 5 is enough to tell one match from several
    and to show a few candidates."""
    params = {"$filter": f"{prop} eq {odata_string(value)}", "$select": collection.select,
              "$top": str(CANDIDATES_SHOWN)}
    if prop in ADVANCED_QUERY:
        return {**params, "$count": "true"}, {"ConsistencyLevel": "eventual"}
    return params, {}


def _candidate(found: dict[str, Any], salt: str | None) -> dict[str, Any]:
    # The id is what the caller should send next; names are personal, hashed when REDACT_PII is on.
    shown = {k: v for k, v in found.items() if not k.startswith("@") and v is not None}
    if salt is None:
        return shown
    return {k: v if k in ("id", "appId") else pseudonym(str(v), salt) for k, v in shown.items()}


class NameResolver:
    """What intake calls for a subject or application given by name (see the module docstring)."""

    def __init__(self, graph: GraphClient, cache: RuleCache, settings: Settings):
        """One per post: it counts the post's directory reads."""
        self.graph = graph
        self.cache = cache
        self.settings = settings
        self.reads = 0

    def object_id(self, type_name: str, name: SubjectName, field: str) -> str:
        collection = COLLECTIONS[type_name]
        return self._one(collection, name.property, name.value, field)["id"]

    def service_principal(self, application: str, field: str) -> str:
        prop = "appId" if GUID_RE.match(application) else "displayName"
        return self._one(APPLICATIONS, prop, application, field)["id"]

    def job(self, service_principal_id: str, field: str) -> str:
        """The service principal's synchronization job, when it has exactly one."""
        path = f"/{self.settings.graph_api_version}/servicePrincipals/{quote(service_principal_id, safe='')}" \
               "/synchronization/jobs"
        jobs = [j for j in self._read(path, {"$select": "id,templateId"}, {}, "synchronization jobs",
                                      "Synchronization.Read.All").get("value") or [] if isinstance(j, dict)]
        if len(jobs) == 1 and jobs[0].get("id"):
            return str(jobs[0]["id"])
        what = "no synchronization job" if not jobs else f"{len(jobs)} synchronization jobs"
        raise RequestRejected(422, "JobNotDetermined",
                              f"the application's service principal {service_principal_id} has {what}; give jobId",
                              [{"field": field, "candidates": [{"jobId": j.get("id"), "templateId": j.get("templateId")}
                                                               for j in jobs]}])

    def _one(self, collection: Collection, prop: str, value: str, field: str) -> dict[str, Any]:
        key = (f"{collection.path}/{prop}", value.lower())
        cached = self.cache.get(key)
        if cached is not None:
            return cached[0]
        params, headers = filter_request(collection, prop, value)
        path = f"/{self.settings.graph_api_version}/{collection.path}"
        found = [f for f in self._read(path, params, headers, collection.path, collection.permission).get("value") or []
                 if isinstance(f, dict) and f.get("id")]
        if len(found) == 1:
            self.cache.put(key, found)
            return found[0]
        looked_for = {"field": field, "property": prop, "value": value}
        if not found:
            raise RequestRejected(422, "NameNotFound", f"no {collection.noun} has {prop} {value!r}", [looked_for])
        salt = self.settings.redact_pii_salt if self.settings.redact_pii else None
        raise RequestRejected(
            422, "NameAmbiguous",
            f"{'at least ' if len(found) >= CANDIDATES_SHOWN else ''}{len(found)} {collection.noun}s have {prop} "
            f"{value!r}; send the object id of the one you mean",
            [{**looked_for, "candidates": [_candidate(f, salt) for f in found]}])

    def _read(self, path: str, params: dict[str, str], headers: dict[str, str], what: str,
              permission: str) -> dict[str, Any]:
        self.reads += 1
        if self.reads > MAX_READS_PER_POST:
            raise RequestRejected(413, "TooManyLookups",
                                  f"this post names more than {MAX_READS_PER_POST} subjects or applications Graph "
                                  "must look up; send object ids, or split it into smaller posts")
        try:
            return self.graph.read(path, self.graph.token(), params=params, headers=headers)
        except GraphFailure as failure:
            raise _lookup_failure(failure, what, permission) from None


def _lookup_failure(failure: GraphFailure, what: str, permission: str) -> RequestRejected:
    details = [{"graphCode": failure.code, "status": failure.status}]
    if failure.transient:
        retry = max(1, round(failure.retry_after)) if failure.retry_after is not None else RETRY_AFTER_SECONDS
        return RequestRejected(503, "DirectoryUnavailable",
                               f"Microsoft Graph could not be asked for {what} just now ({failure.code}); try again "
                               "later, or send the object id", details, headers={"Retry-After": str(retry)})
    if failure.status == 403:
        return RequestRejected(422, "NameLookupNotPermitted",
                               f"the app's identity may not read {what}: it needs the Microsoft Graph application "
                               f"permission {permission}; {GRANT_HINT}", details)
    return RequestRejected(422, "NameLookupFailed", f"Graph refused the lookup of {what}: {failure.code}: "
                                                    f"{failure.message}".rstrip(": "), details)
