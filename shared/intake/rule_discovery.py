"""Rule discovery: which synchronization rule a subject goes through when the request names none
and DEFAULT_RULE_ID is not set.

provisionOnDemand needs `ruleId`, one of `schema.synchronizationRules[].id` of the job. A caller
who sends only an object id should not have to look that up, so intake reads the job's schema
(`GET .../jobs/{jobId}/schema`) and picks the one rule whose object mappings take the subject's
kind of object. It happens at intake, not in the worker, so that an ambiguous or missing rule is
a 422 the caller sees at once instead of a dead letter minutes later.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from shared.errors import GraphFailure, RequestRejected
from shared.graph.client import GraphClient
from shared.models import Subject

log = logging.getLogger(__name__)

USERISH = frozenset({"user", "worker", "person", "inetorgperson"})
# Where each objectTypeName comes from (see the README's table): the rule's sourceDirectoryName
# tells an Entra ID -> app rule from an AD -> Entra ID (Cloud Sync) or Workday one.
ENTRA_HINTS = ("azure active directory", "azure ad", "entra", "aad")
SOURCE_HINTS: dict[str, Callable[[str], bool]] = {
    "User": lambda d: any(h in d for h in ENTRA_HINTS),
    "Group": lambda d: any(h in d for h in ENTRA_HINTS),
    "user": lambda d: "active directory" in d and not any(h in d for h in ENTRA_HINTS),
    "Worker": lambda d: "workday" in d or "successfactors" in d,
}
RETRY_AFTER_SECONDS = 30


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    source_directory: str
    target_directory: str
    source_objects: frozenset[str]  # enabled mappings' sourceObjectName, as Graph spells them

    def summary(self) -> dict[str, Any]:
        return {"ruleId": self.id, "name": self.name, "sourceDirectoryName": self.source_directory,
                "targetDirectoryName": self.target_directory, "sourceObjects": sorted(self.source_objects)}


def _enabled_sources(raw: dict[str, Any]) -> frozenset[str]:
    # A disabled mapping provisions nothing, so it cannot make a rule fit.
    mappings = [m for m in raw.get("objectMappings") or [] if isinstance(m, dict)]
    return frozenset(str(m.get("sourceObjectName")) for m in mappings
                     if m.get("enabled", True) is not False and m.get("sourceObjectName"))


def parse_rules(schema: dict[str, Any]) -> list[Rule]:
    return [Rule(str(raw["id"]), str(raw.get("name") or ""), str(raw.get("sourceDirectoryName") or ""),
                 str(raw.get("targetDirectoryName") or ""), _enabled_sources(raw))
            for raw in schema.get("synchronizationRules") or [] if isinstance(raw, dict) and raw.get("id")]


def _fits_type(rule: Rule, type_name: str) -> bool:
    lowered = {s.lower() for s in rule.source_objects}
    return "group" in lowered if type_name == "Group" else bool(lowered & USERISH)


def choose(rules: list[Rule], type_name: str) -> tuple[Rule | None, list[Rule]]:
    """(the rule, []) when exactly one fits; else (None, the candidates to show the caller)."""
    fitting = [r for r in rules if _fits_type(r, type_name)]
    # Each narrowing step applies only when it keeps someone: a schema without directory names
    # (or with unusual ones) must not lose its only fitting rule.
    for narrower in (lambda r: SOURCE_HINTS[type_name](r.source_directory.lower()),
                     lambda r: type_name in r.source_objects):
        if len(fitting) > 1:
            narrowed = [r for r in fitting if narrower(r)]
            fitting = narrowed or fitting
    if len(fitting) == 1:
        return fitting[0], []
    return None, fitting or rules


class RuleCache:
    """Rules per (servicePrincipal, job), kept in process for RULE_CACHE_SECONDS: a schema changes
    when an admin edits mappings, rarely, while a bulk post may ask for the same job 1000 times."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, list[Rule]]] = {}

    def get(self, key: tuple[str, str]) -> list[Rule] | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or self.clock() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def put(self, key: tuple[str, str], rules: list[Rule]) -> None:
        with self._lock:
            self._entries[key] = (self.clock(), rules)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_caches: dict[float, RuleCache] = {}
_caches_lock = threading.Lock()


def cache_for(ttl: float) -> RuleCache:
    with _caches_lock:
        return _caches.setdefault(ttl, RuleCache(ttl))


class RuleResolver:
    """What intake calls for a subject without a ruleId (and no DEFAULT_RULE_ID)."""

    def __init__(self, graph: GraphClient, cache: RuleCache):
        self.graph = graph
        self.cache = cache

    def rules(self, sp: str, job: str) -> list[Rule]:
        key = (sp, job)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        try:
            schema = self.graph.get_schema(sp, job, self.graph.token())
        except GraphFailure as failure:
            raise _schema_failure(failure, sp, job) from None
        rules = parse_rules(schema)
        self.cache.put(key, rules)
        return rules

    def __call__(self, sp: str, job: str, subject: Subject, field: str) -> str:
        rules = self.rules(sp, job)
        rule, candidates = choose(rules, subject.objectTypeName)
        if rule is not None:
            return rule.id
        why = ("no synchronization rule of the job maps" if not any(_fits_type(r, subject.objectTypeName)
                                                                   for r in rules)
               else "several synchronization rules of the job map")
        raise RequestRejected(
            422, "RuleNotDetermined",
            f"ruleId is missing and DEFAULT_RULE_ID is not set; {why} objectTypeName "
            f"{subject.objectTypeName!r}: give ruleId (one of the candidates) or set DEFAULT_RULE_ID",
            [{"field": field, "message": "choose one of these rules", "candidates": [r.summary() for r in candidates]}])


def _schema_failure(failure: GraphFailure, sp: str, job: str) -> RequestRejected:
    if failure.kind == "transient":
        retry = max(1, round(failure.retry_after)) if failure.retry_after is not None else RETRY_AFTER_SECONDS
        return RequestRejected(
            503, "SchemaUnavailable",
            f"ruleId is missing and the job's schema could not be read to find it ({failure.code}); try again "
            "later, or give ruleId", [{"graphCode": failure.code, "status": failure.status}],
            headers={"Retry-After": str(retry)})
    return RequestRejected(
        422, "SchemaUnreadable",
        f"ruleId is missing and the schema of job {job!r} of service principal {sp!r} could not be read: "
        f"{failure.code}: {failure.message}".rstrip(": "),
        [{"graphCode": failure.code, "status": failure.status}])
