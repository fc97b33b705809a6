"""Issue 7, "Beyond the portal": dry run, rule discovery, the quarantine/pause guard and the
operator CLI. The end-to-end tests run one devhost of their own (own simulators, own queues, no
DEFAULT_RULE_ID, AUTO_START_QUARANTINED_JOB=true) so that configuring jobs and schemas in the Graph
simulator cannot disturb the other modules' rate-window checks."""
from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from azure.storage.queue import QueueClient

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_SP
from shared.errors import GraphFailure, RequestRejected
from shared.graph import job_guard as jobguard
from shared.graph.client import provision_path
from shared.handlers import provision_http
from shared.intake import dry_run as dryrun
from shared.intake import rule_discovery as rules
from shared.models import Outcome, Subject
from shared.settings import Settings
from tests.conftest import IsolatedHost, module_host

USERS_RULE = {"id": "6c409270-f78a-4bc6-af23-7cf3ab6482fe", "name": "USER_TO_SCIM",
              "sourceDirectoryName": "Azure Active Directory", "targetDirectoryName": "customappsso",
              "objectMappings": [{"enabled": True, "sourceObjectName": "User", "targetObjectName": "urn:scim:User"},
                                 {"enabled": False, "sourceObjectName": "Group", "targetObjectName": "urn:scim:Group"}]}
GROUPS_RULE = {"id": "33f7c90d-bf71-41b1-bda6-aaf0ddbee5d8#V2", "name": "GROUP_TO_SCIM",
               "sourceDirectoryName": "Azure Active Directory", "targetDirectoryName": "customappsso",
               "objectMappings": [{"enabled": True, "sourceObjectName": "Group", "targetObjectName": "urn:scim:Group"}]}
CLOUD_SYNC_RULE = {"id": "ad2aad-user-rule", "name": "AD2AADProvisioning",
                   "sourceDirectoryName": "Active Directory", "targetDirectoryName": "Azure Active Directory",
                   "objectMappings": [{"enabled": True, "sourceObjectName": "user", "targetObjectName": "User"}]}
WORKDAY_RULE = {"id": "workday-rule", "name": "Workday to AD", "sourceDirectoryName": "Workday",
                "targetDirectoryName": "Active Directory",
                "objectMappings": [{"enabled": True, "sourceObjectName": "Worker", "targetObjectName": "user"}]}
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
GROUP = "8213fd99-d6b6-417b-8e13-af6334856215"


def new_job() -> str:
    return f"scim.{uuid.uuid4().hex[:12]}"


def member(n: int) -> str:
    return f"{n:08d}-aaaa-4bbb-8ccc-{uuid.uuid4().hex[:12]}"


def subject(type_name: str) -> Subject:
    object_id = {"User": USER, "Group": GROUP, "user": "CN=Ada,DC=corp,DC=example", "Worker": "W-1001"}[type_name]
    return Subject(objectId=object_id, objectTypeName=type_name)


# -- rule choice (no I/O) ------------------------------------------------------------------------
@pytest.mark.parametrize("type_name,schema,expected", [
    ("User", [USERS_RULE, GROUPS_RULE], USERS_RULE["id"]),          # disabled Group mapping does not count
    ("Group", [USERS_RULE, GROUPS_RULE], GROUPS_RULE["id"]),
    ("user", [USERS_RULE, CLOUD_SYNC_RULE], CLOUD_SYNC_RULE["id"]),  # direction: AD source
    ("User", [USERS_RULE, CLOUD_SYNC_RULE], USERS_RULE["id"]),       # direction: Entra ID source
    ("Worker", [WORKDAY_RULE, USERS_RULE], WORKDAY_RULE["id"]),
])
def test_the_rule_that_maps_the_subjects_kind_is_chosen(type_name, schema, expected):
    rule, candidates = rules.choose(rules.parse_rules({"synchronizationRules": schema}), type_name)
    assert rule is not None and rule.id == expected and candidates == []


def test_ambiguous_and_missing_rules_name_the_candidates():
    two = dict(USERS_RULE, id="second-users-rule", name="USER_TO_SCIM_2")
    rule, candidates = rules.choose(rules.parse_rules({"synchronizationRules": [USERS_RULE, two]}), "User")
    assert rule is None and {c.id for c in candidates} == {USERS_RULE["id"], "second-users-rule"}
    rule, candidates = rules.choose(rules.parse_rules({"synchronizationRules": [USERS_RULE]}), "Group")
    assert rule is None and [c.id for c in candidates] == [USERS_RULE["id"]]


class FakeGraph:
    def __init__(self, answers):
        self.answers = list(answers)
        self.schema_reads = 0

    def token(self):
        return "t"

    def get_schema(self, sp, job, token):
        self.schema_reads += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_discovered_rules_are_cached_per_job_for_the_ttl():
    now = [0.0]
    graph = FakeGraph([{"synchronizationRules": [USERS_RULE]}] * 3)
    resolve = rules.RuleResolver(graph, rules.RuleCache(60, clock=lambda: now[0]))
    assert resolve("sp", "job", subject("User"), "ruleId") == USERS_RULE["id"]
    assert resolve("sp", "job", subject("User"), "ruleId") == USERS_RULE["id"]
    assert graph.schema_reads == 1
    resolve("sp", "other-job", subject("User"), "ruleId")
    assert graph.schema_reads == 2
    now[0] = 61
    resolve("sp", "job", subject("User"), "ruleId")
    assert graph.schema_reads == 3


def test_schema_read_failures_are_503_when_transient_and_422_when_permanent():
    graph = FakeGraph([GraphFailure.of("transient", "TooManyRequests", "slow down", 429, retry_after=7),
                       GraphFailure.of("permanent", "Authorization_RequestDenied", "no", 403)])
    resolve = rules.RuleResolver(graph, rules.RuleCache(60))
    with pytest.raises(RequestRejected) as transient:
        resolve("sp", "job", subject("User"), "ruleId")
    assert transient.value.status == 503 and transient.value.headers["Retry-After"] == "7"
    with pytest.raises(RequestRejected) as permanent:
        resolve("sp", "job", subject("User"), "ruleId")
    assert permanent.value.status == 422 and permanent.value.info.code == "SchemaUnreadable"
    assert "Authorization_RequestDenied" in permanent.value.info.message


# -- dry run in process: no storage, no Graph --------------------------------------------------------
def test_dry_run_describes_the_graph_calls_without_touching_queues_or_graph(monkeypatch):
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    settings = Settings(DEFAULT_SERVICE_PRINCIPAL_ID=EXAMPLE_SP, DEFAULT_JOB_ID=EXAMPLE_JOB)
    # Any use of queues or Graph would fail on these stand-ins.
    rt = SimpleNamespace(settings=settings, graph=FakeGraph([]), queues=None)
    members = [member(i) for i in range(7)]
    body = json.dumps({"objectId": GROUP, "objectTypeName": "Group", "members": members,
                       "ruleId": GROUPS_RULE["id"], "jobId": "job a/b?c"}).encode()
    reply = provision_http(body, {"Content-Type": "application/json"}, rt, params={"dryRun": "true"})
    assert reply.status == 422  # a job id with '/', '?' or a space is refused before anything else
    body = json.dumps({"objectId": GROUP, "objectTypeName": "Group", "members": members,
                       "ruleId": GROUPS_RULE["id"]}).encode()
    reply = provision_http(body, {"Content-Type": "application/json"}, rt, params={"dryRun": "true"})
    assert reply.status == 200 and reply.work == []
    [request] = reply.body["requests"]
    assert request["requestId"] is None
    assert [len(c["body"]["parameters"][0]["subjects"][0]["links"]["members"]) for c in request["calls"]] == [5, 2]
    assert not dryrun.wanted({"dryRun": "false"}) and dryrun.wanted({"dryrun": "1"})


# -- guard helpers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("failure,outcome,expected", [
    (GraphFailure.of("permanent", "Request_ResourceNotFound", "gone", 404), None, True),
    (GraphFailure.of("permanent", "Conflict", "The job is in quarantine", 409), None, True),
    (GraphFailure.of("permanent", "SyncJobQuarantined", "", 400), None, True),
    (GraphFailure.of("permanent", "BadRequest", "ruleId is invalid", 400), None, False),
    (GraphFailure.of("permanent", "Authorization_RequestDenied", "no", 403), None, False),
    (None, "EncounteredEscrowProportionThreshold", True),
    (None, "RedundantExport", False),
    (None, None, False),
])
def test_which_failures_point_at_the_job(failure, outcome, expected):
    result = Outcome(result="Error" if failure else "Failure", errorCode=outcome)
    assert jobguard.points_at_job(result, failure) is expected


def test_the_start_guard_lets_one_instance_start_per_cooldown(azurite):
    name = f"guard-{uuid.uuid4().hex[:10]}"
    queue = lambda: QueueClient.from_connection_string(azurite.connection_string, name)  # noqa: E731
    first, second = jobguard.StartGuard(queue(), cooldown=3), jobguard.StartGuard(queue(), cooldown=3)
    assert first.take() is True
    assert second.take() is False and first.take() is False
    time.sleep(3.5)  # the cooldown is the token's hidden time
    assert second.take() is True and first.take() is False


# -- end to end through a devhost --------------------------------------------------------------------
class OpsHost(IsolatedHost):
    def __init__(self, azurite, log_dir):
        super().__init__(azurite, log_dir, "ops", AUTO_START_QUARANTINED_JOB="true",
                         AUTO_START_COOLDOWN_SECONDS="3600")


ops = module_host("ops", OpsHost)


def test_dry_run_over_http_sends_nothing_to_graph_and_nothing_to_the_work_queue(ops):
    ops.sims.graph.reset_calls()
    members = [member(i) for i in range(12)]
    job = new_job()
    response = ops.post([{"objectId": GROUP, "objectTypeName": "Group", "members": members,
                          "ruleId": GROUPS_RULE["id"], "jobId": job, "correlationId": "whatif-1"},
                         {"objectId": USER, "objectTypeName": "User", "ruleId": USERS_RULE["id"]}], dryRun="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dryRun"] is True and body["accepted"] == 2
    group, user = body["requests"]
    assert group["requestId"] is None and group["correlationId"] == "whatif-1"
    assert [c["path"] for c in group["calls"]] == [provision_path("v1.0", EXAMPLE_SP, job)] * 3
    assert all(c["method"] == "POST" for c in group["calls"])
    sent = [m["objectId"] for c in group["calls"] for m in c["body"]["parameters"][0]["subjects"][0]["links"]["members"]]
    assert sent == members
    assert user["calls"][0]["body"] == {"parameters": [{"ruleId": USERS_RULE["id"], "subjects": [
        {"objectId": USER, "objectTypeName": "User"}]}]}
    assert user["calls"][0]["path"] == provision_path("v1.0", EXAMPLE_SP, EXAMPLE_JOB)
    time.sleep(0.5)
    assert ops.sims.graph.calls() == []
    work = ops.queue("WORK_QUEUE")
    try:
        count = work.get_queue_properties().approximate_message_count
    except Exception:  # never created: nothing was sent
        count = 0
    assert count == 0


def test_dry_run_shows_the_discovered_rule(ops):
    job = new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, job, [USERS_RULE, GROUPS_RULE])
    ops.sims.graph.reset_calls()
    response = ops.post({"objectId": GROUP, "objectTypeName": "Group", "jobId": job}, dryRun="1")
    assert response.status_code == 200, response.text
    [call] = response.json()["requests"][0]["calls"]
    assert call["body"]["parameters"][0]["ruleId"] == GROUPS_RULE["id"]
    assert [c["route"] for c in ops.sims.graph.calls()] == ["get_schema"]  # read only, no provisionOnDemand


def test_rule_discovery_at_intake_picks_the_rule_and_graph_gets_it(ops):
    job = new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, job, [USERS_RULE, GROUPS_RULE])
    result = ops.result_of({"objectId": member(1), "objectTypeName": "User", "jobId": job})
    assert result["ruleId"] == USERS_RULE["id"] and result["result"] == "Success"
    call = next(c for c in ops.sims.graph.calls()
                if c["route"] == "provision_on_demand" and c["client_request_id"] == result["requestId"])
    assert call["body"]["parameters"][0]["ruleId"] == USERS_RULE["id"]


def test_ambiguous_rules_are_a_422_listing_the_candidates(ops):
    job = new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, job, [USERS_RULE, dict(USERS_RULE, id="users-2", name="USERS_AGAIN")])
    response = ops.post({"objectId": USER, "objectTypeName": "User", "jobId": job})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "RuleNotDetermined"
    [detail] = error["details"]
    assert {(c["ruleId"], c["name"]) for c in detail["candidates"]} == {
        (USERS_RULE["id"], "USER_TO_SCIM"), ("users-2", "USERS_AGAIN")}


def test_schema_read_failures_over_http(ops):
    down, denied = new_job(), new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, down, http_status=503)
    ops.sims.graph.set_schema(EXAMPLE_SP, denied, http_status=403)
    busy = ops.post({"objectId": USER, "objectTypeName": "User", "jobId": down})
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["code"] == "SchemaUnavailable"
    refused = ops.post({"objectId": USER, "objectTypeName": "User", "jobId": denied})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "SchemaUnreadable"


def test_a_queue_event_without_rule_is_dead_lettered_with_the_candidates(ops):
    job = new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, job, [USERS_RULE])
    text = json.dumps({"objectId": GROUP, "objectTypeName": "Group", "jobId": job, "correlationId": "no-rule"})
    ops.queue("INTAKE_QUEUE").send_message(text)
    [letter] = ops.deadletters.wait_for(lambda m: m.get("original") == text, timeout=30)
    assert letter["reason"]["code"] == "RuleNotDetermined" and letter["source"] == "intake"
    assert letter["reason"]["details"][0]["candidates"][0]["ruleId"] == USERS_RULE["id"]


def test_a_queue_event_whose_schema_is_briefly_unreadable_is_retried_through_the_queue(ops):
    job = new_job()
    ops.sims.graph.set_schema(EXAMPLE_SP, job, http_status=503)
    ops.queue("INTAKE_QUEUE").send_message(json.dumps({"objectId": USER, "objectTypeName": "User", "jobId": job,
                                                       "correlationId": "schema-later"}))
    deadline = time.monotonic() + 30
    while not [c for c in ops.sims.graph.calls() if c["route"] == "get_schema" and c["jobId"] == job]:
        assert time.monotonic() < deadline, "the schema was never asked for"
        time.sleep(0.2)
    ops.sims.graph.set_schema(EXAMPLE_SP, job, [USERS_RULE])     # Graph serves it again
    [result] = ops.results.wait_for(lambda m: m.get("correlationId") == "schema-later", timeout=60)
    assert result["ruleId"] == USERS_RULE["id"]
    assert not ops.deadletters.matching(lambda m: "schema-later" in m.get("original", ""))


def test_the_last_delivery_of_an_intake_message_dead_letters_a_schema_that_stays_unreadable():
    from unittest import mock

    from shared import handlers
    from tests.fakes import FakeRuntime

    def unavailable(*_):
        raise RequestRejected(503, "SchemaUnavailable", "the job's schema could not be read")

    rt = FakeRuntime()
    text = json.dumps({"objectId": USER, "objectTypeName": "User", "ruleId": None})
    with mock.patch.object(handlers, "_rule_lookup", lambda rt: unavailable), \
            mock.patch.object(rt.settings, "default_rule_id", None):
        with pytest.raises(handlers.RedeliverLater):
            handlers.intake_message(text, rt, delivery=1)
        assert rt.queues.sent == []
        assert handlers.intake_message(text, rt, delivery=handlers.INTAKE_DELIVERIES) == []
    [(queue, letter)] = rt.queues.sent
    assert letter["reason"]["code"] == "SchemaUnavailable" and letter["original"] == text


def test_a_quarantined_job_is_reported_and_started_once_per_cooldown(ops):
    job = new_job()
    graph = ops.sims.graph
    graph.set_job(EXAMPLE_SP, job, code="Quarantine")
    quarantined = {"status": 409, "body": {"error": {"code": "Conflict",
                                                     "message": "The synchronization job is in quarantine."}}}
    first, second = member(700), member(701)
    graph.script(first, quarantined)
    graph.script(second, quarantined)
    result = ops.result_of({"objectId": first, "objectTypeName": "User", "jobId": job, "ruleId": USERS_RULE["id"]})
    assert result["result"] == "Error"
    assert result["jobStatus"]["code"] == "Quarantine"
    assert result["jobStatus"]["quarantineReason"] == "EncounteredQuarantineException"
    assert result["jobStatus"]["autoStart"] == "started"
    assert len(graph.start_calls(EXAMPLE_SP, job)) == 1 and graph.job(EXAMPLE_SP, job)["status"]["code"] == "Active"
    graph.set_job(EXAMPLE_SP, job, code="Quarantine")  # quarantined again within the cooldown
    again = ops.result_of({"objectId": second, "objectTypeName": "User", "jobId": job, "ruleId": USERS_RULE["id"]})
    assert again["jobStatus"]["code"] == "Quarantine" and again["jobStatus"]["autoStart"] == "cooldown"
    assert len(graph.start_calls(EXAMPLE_SP, job)) == 1


def test_a_missing_job_and_a_paused_one_are_named_in_the_result(ops):
    graph = ops.sims.graph
    missing, paused = new_job(), new_job()
    graph.set_job(EXAMPLE_SP, missing, http_status=404)
    graph.set_job(EXAMPLE_SP, paused, code="Paused")
    gone, held = member(800), member(801)
    graph.script(gone, {"status": 404, "body": {"error": {"code": "Request_ResourceNotFound", "message": "no job"}}})
    graph.script(held, {"status": 400, "body": {"error": {"code": "JobPaused", "message": "The job is paused."}}})
    result = ops.result_of({"objectId": gone, "objectTypeName": "User", "jobId": missing, "ruleId": USERS_RULE["id"]})
    assert result["jobStatus"]["code"] == "NotFound" and "autoStart" not in result["jobStatus"]
    result = ops.result_of({"objectId": held, "objectTypeName": "User", "jobId": paused, "ruleId": USERS_RULE["id"]})
    # A pause is somebody's decision: reported, never undone by the app.
    assert result["jobStatus"]["code"] == "Paused" and "autoStart" not in result["jobStatus"]
    assert graph.start_calls(EXAMPLE_SP, paused) == []
    ordinary = ops.result_of({"objectId": member(802), "objectTypeName": "User", "ruleId": USERS_RULE["id"]})
    assert "jobStatus" not in ordinary


# -- operator CLI (python -m tools.cli) against Azurite -----------------------------------------------
def run_cli(azurite, *argv: str) -> tuple[int, list[str]]:
    import io

    from tools import cli

    out = io.StringIO()
    code = cli.main(["--connection", azurite.connection_string, *argv], out=out)
    return code, out.getvalue().splitlines()


def fresh_queue(azurite, prefix: str) -> QueueClient:
    queue = QueueClient.from_connection_string(azurite.connection_string, f"{prefix}-{uuid.uuid4().hex[:10]}")
    queue.create_queue()
    return queue


def test_cli_send_queues_an_event_and_posts_a_dry_run(ops, azurite):
    event = {"objectId": member(900), "objectTypeName": "User", "ruleId": USERS_RULE["id"], "correlationId": "cli-1"}
    code, lines = run_cli(azurite, "--intake-queue", ops.queues["INTAKE_QUEUE"], "send", "--data", json.dumps(event))
    assert code == 0 and lines[0].startswith(f"queued on {ops.queues['INTAKE_QUEUE']}")
    [result] = ops.results.wait_for(lambda m: m.get("correlationId") == "cli-1", timeout=60)
    assert result["result"] == "Success"
    ops.sims.graph.reset_calls()
    code, lines = run_cli(azurite, "send", "--url", f"{ops.host.url}/api/provision", "--dry-run",
                          "--data", json.dumps(event))
    assert code == 0 and lines[0] == "HTTP 200"
    assert json.loads("\n".join(lines[1:]))["requests"][0]["calls"][0]["body"]["parameters"][0]["ruleId"] == USERS_RULE["id"]
    assert ops.sims.graph.calls() == []
    code, lines = run_cli(azurite, "send", "--url", f"{ops.host.url}/api/provision", "--data", '{"objectId": 1}')
    assert code == 1 and lines[0] == "HTTP 422"


def test_cli_results_filters_follows_and_consumes(azurite):
    import threading

    queue = fresh_queue(azurite, "cli-res")
    for n in range(3):
        queue.send_message(json.dumps({"requestId": f"r{n}", "resultId": f"r{n}:0", "result": "Success"}))
    code, lines = run_cli(azurite, "--results-queue", queue.queue_name, "results")
    assert code == 0 and [json.loads(l)["requestId"] for l in lines] == ["r0", "r1", "r2"]
    code, lines = run_cli(azurite, "--results-queue", queue.queue_name, "results", "--request-id", "r1")
    assert [json.loads(l)["requestId"] for l in lines] == ["r1"]
    later = threading.Timer(1.0, lambda: queue.send_message(json.dumps({"requestId": "late", "result": "Skipped"})))
    later.start()
    code, lines = run_cli(azurite, "--results-queue", queue.queue_name, "results", "--follow", "--request-id", "late",
                          "--count", "1", "--timeout", "15", "--interval", "0.2")
    assert [json.loads(l)["requestId"] for l in lines] == ["late"]
    code, lines = run_cli(azurite, "--results-queue", queue.queue_name, "results", "--consume", "--request-id", "r0")
    assert [json.loads(l)["requestId"] for l in lines] == ["r0"]
    remaining = [json.loads(m.content)["requestId"] for m in queue.peek_messages(max_messages=32)]
    assert sorted(remaining) == ["late", "r1", "r2"]  # the others were given back, not taken


def test_cli_deadletters_list_and_replay_put_work_back_and_delete_only_after(ops, azurite):
    graph = ops.sims.graph
    denied_user = member(950)
    graph.script(denied_user, {"status": 403, "body": {"error": {"code": "Authorization_RequestDenied",
                                                                 "message": "Insufficient privileges."}}})
    failed = ops.result_of({"objectId": denied_user, "objectTypeName": "User", "ruleId": USERS_RULE["id"]})
    assert failed["result"] == "Error"
    [work_letter] = ops.deadletters.wait_for(lambda m: m.get("requestId") == failed["requestId"])
    # The ops host's collector drains its own dead-letter queue: the CLI works on a copy.
    dead = fresh_queue(azurite, "cli-dead")
    intake_event = {"objectId": member(951), "objectTypeName": "User", "ruleId": USERS_RULE["id"],
                    "correlationId": "cli-replayed-intake"}
    intake_letter = {"reason": {"code": "BacklogTooLong", "message": "later"}, "source": "intake",
                     "original": json.dumps(intake_event), "deadLetteredAt": "2026-01-01T00:00:00Z"}
    cut_letter = dict(intake_letter, original='{"objectId": "tru', originalTruncated=True)
    ids = {name: dead.send_message(json.dumps(letter)).id
           for name, letter in (("work", work_letter), ("intake", intake_letter), ("cut", cut_letter))}
    queues = ["--deadletter-queue", dead.queue_name, "--intake-queue", ops.queues["INTAKE_QUEUE"],
              "--work-queue", ops.queues["WORK_QUEUE"]]

    code, lines = run_cli(azurite, *queues, "deadletters", "list")
    listed = {entry["id"]: entry for entry in map(json.loads, lines)}
    assert set(listed) == set(ids.values())
    assert listed[ids["work"]]["code"] == "Authorization_RequestDenied" and listed[ids["work"]]["source"] == "work"
    assert listed[ids["cut"]]["replayable"] is False

    code, lines = run_cli(azurite, *queues, "deadletters", "replay", "--id", ids["intake"])
    assert code == 0 and lines[0].startswith(f"replayed {ids['intake']} onto {ops.queues['INTAKE_QUEUE']}")
    ops.results.wait_for(lambda m: m.get("correlationId") == "cli-replayed-intake", timeout=60)

    code, lines = run_cli(azurite, *queues, "deadletters", "replay", "--all")
    assert code == 1  # the truncated entry cannot be replayed, and says so
    assert any(l.startswith(f"skipped {ids['cut']}") for l in lines)
    assert any(l.startswith(f"replayed {ids['work']} onto {ops.queues['WORK_QUEUE']}") for l in lines)
    # Replayed work starts afresh: the permanent error is fixed (no script left), so it succeeds.
    replayed = ops.results.wait_for(lambda m: m.get("requestId") == failed["requestId"] and m["result"] == "Success",
                                    timeout=60)
    assert replayed[0]["attempts"] == 1
    assert [m.id for m in dead.peek_messages(max_messages=32)] == [ids["cut"]]


def test_an_answer_whose_error_code_is_a_quarantine_reason_reports_the_job(ops):
    job = new_job()
    graph = ops.sims.graph
    graph.set_job(EXAMPLE_SP, job, code="Quarantine", quarantine={
        "reason": "EncounteredEscrowProportionThreshold", "error": {"code": "TooManyDeletes", "message": "many"}})
    user = member(990)
    graph.script(user, {"status": 200, "key": json.dumps({"result": "Failure", "details": {
        "errorCode": "EncounteredEscrowProportionThreshold", "errorMessage": "escrows"}}), "value": "{}"})
    result = ops.result_of({"objectId": user, "objectTypeName": "User", "jobId": job, "ruleId": USERS_RULE["id"]})
    assert result["result"] == "Failure" and result["errorCode"] == "EncounteredEscrowProportionThreshold"
    status = result["jobStatus"]
    assert status["code"] == "Quarantine" and status["quarantineReason"] == "EncounteredEscrowProportionThreshold"
    assert status["quarantineError"]["code"] == "TooManyDeletes" and status["autoStart"] == "started"
    assert len(graph.start_calls(EXAMPLE_SP, job)) == 1


def test_the_graph_simulator_serves_schema_and_start_configured_over_its_admin_api(ops):
    sims, job = ops.sims, new_job()
    base = sims.graph_endpoint
    auth = {"Authorization": f"Bearer {sims.mint_token()}"}
    job_url = f"{base}/beta/servicePrincipals/{EXAMPLE_SP}/synchronization/jobs/{job}"
    default = httpx.get(f"{job_url}/schema", headers=auth).json()
    assert [m["sourceObjectName"] for m in default["synchronizationRules"][0]["objectMappings"]] == ["User", "Group"]
    configured = httpx.post(f"{base}/_sim/schemas", json={"servicePrincipalId": EXAMPLE_SP, "jobId": job,
                                                         "synchronizationRules": [CLOUD_SYNC_RULE]})
    assert configured.status_code == 200
    assert httpx.get(f"{job_url}/schema", headers=auth).json()["synchronizationRules"] == [CLOUD_SYNC_RULE]
    httpx.post(f"{base}/_sim/schemas", json={"servicePrincipalId": EXAMPLE_SP, "jobId": job, "httpStatus": 429})
    assert httpx.get(f"{job_url}/schema", headers=auth).status_code == 429
    assert httpx.get(f"{job_url}/schema").status_code == 401
    httpx.post(f"{base}/_sim/jobs", json={"servicePrincipalId": EXAMPLE_SP, "jobId": job, "code": "Quarantine"})
    started = httpx.post(f"{job_url}/start", headers=auth)
    assert started.status_code == 204 and started.content == b""
    assert httpx.get(job_url, headers=auth).json()["status"]["code"] == "Active"
    assert httpx.get(f"{job_url}/start", headers=auth).status_code == 405
    assert len(sims.graph.start_calls(EXAMPLE_SP, job)) == 1
