"""Preflight against real Azurite and the loopback Graph and identity simulators: in-process, as
the operator command, and over HTTP through devhost with function keys enforced."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.storage.queue import QueueClient, QueueServiceClient

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_SP, start_devhost
from shared.graph.client import GraphClient
from shared.operations.preflight import queue_names, run_preflight
from shared.ratelimit.token_gate import QueueTokenStore, RateGate
from shared.settings import Settings
from simulators import start_simulators

ROOT = Path(__file__).resolve().parents[2]
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
FULL = "Synchronization.ReadWrite.All"
OWNED = "Application.ReadWrite.OwnedBy"


@pytest.fixture(scope="module")
def graph_sims():
    # Our own pair: job status changes here must not leak into the end-to-end tests' simulators.
    running = start_simulators(rate_calls=None)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _fresh_jobs(graph_sims):
    graph_sims.graph.clear_jobs()
    graph_sims.identity.set_roles([FULL])


class MintingCredential:
    """Hands out simulator-signed tokens with chosen roles, and remembers each one it gave out."""

    def __init__(self, sims, roles):
        self.sims, self.roles, self.issued = sims, list(roles), []

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        audience = scopes[0].removesuffix("/.default")
        token = self.sims.mint_token(audience, roles=self.roles)
        self.issued.append(token)
        return AccessToken(token, int(time.time()) + 3600)


def make_settings(azurite, sims, prefix: str, **overrides) -> Settings:
    values = {
        "AzureWebJobsStorage": azurite.connection_string, "GRAPH_ENDPOINT": sims.graph_endpoint,
        "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP, "DEFAULT_JOB_ID": EXAMPLE_JOB,
        "INTAKE_QUEUE": f"{prefix}-requests", "WORK_QUEUE": f"{prefix}-work", "RESULTS_QUEUE": f"{prefix}-results",
        "DEADLETTER_QUEUE": f"{prefix}-deadletter", "LEASE_QUEUE": f"{prefix}-leases", "LOGS_QUEUE": f"{prefix}-logs",
        "RATE_LIMIT_CALLS": "5", "RATE_LIMIT_WINDOW_SECONDS": "2",
    }
    values.update(overrides)
    return Settings(**values)


def prefix() -> str:
    return "pf" + uuid.uuid4().hex[:10]


def create_queues(settings: Settings, service: QueueServiceClient, *, seed_pool: bool = True) -> None:
    for name in queue_names(settings).values():
        service.get_queue_client(name).create_queue()
    if seed_pool:
        RateGate(QueueTokenStore(service.get_queue_client(settings.lease_queue)), settings.rate_limit_calls,
                 settings.rate_limit_window_seconds, settings.rate_limit_margin_seconds, 5).ensure_pool()


@pytest.fixture
def service(azurite) -> QueueServiceClient:
    return QueueServiceClient.from_connection_string(azurite.connection_string)


def preflight(settings, sims, service, roles=(FULL,)):
    credential = MintingCredential(sims, roles)
    graph = GraphClient(settings, credential)
    try:
        report = run_preflight(settings, graph, service)
    finally:
        graph.close()
    checks = {c.name: c for c in report.checks}
    return report, checks, credential


def assert_no_token(report, credential) -> None:
    text = report.render() + json.dumps(report.to_dict())
    assert credential.issued, "the preflight never asked for a token"
    for token in credential.issued:
        assert token not in text and token.split(".")[2] not in text
    assert not JWT.search(text)


def test_healthy_deployment_passes_every_check(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    report, checks, credential = preflight(settings, graph_sims, service)
    assert report.status == "ok", report.render()
    assert [c.status for c in report.checks] == ["ok"] * 8
    assert checks["Settings"].summary == "all app settings are valid" and checks["Callers"].details["easyAuth"] is False
    assert checks["Graph roles"].details["roles"] == [FULL]
    assert checks["Job"].details["status"] == "Active" and checks["Job"].details["jobId"] == EXAMPLE_JOB
    assert checks["Lease pool"].details["tokens"] == 5 and checks["Lease pool"].details["epoch"]
    assert set(checks["Queues"].details["messages"]) == set(queue_names(settings).values())
    assert report.render().splitlines()[-1] == "OK: nothing to fix."
    assert_no_token(report, credential)
    job_calls = [c for c in graph_sims.graph.calls() if c["route"] == "get_job"]
    assert job_calls and job_calls[-1]["servicePrincipalId"] == EXAMPLE_SP


def test_owned_by_role_alone_is_a_warning_that_explains_ownership(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    report, checks, credential = preflight(settings, graph_sims, service, roles=[OWNED])
    roles = checks["Graph roles"]
    assert roles.status == "warn" and report.status == "warn"
    assert "8800" in roles.summary and "--mode ownedby" in roles.fix and f"--target-sp {EXAMPLE_SP}" in roles.fix
    assert checks["Job"].status == "ok"  # OwnedBy may read the job in the simulator, as in Graph
    assert_no_token(report, credential)


def test_missing_graph_role_fails_and_names_the_grant_script(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    report, checks, credential = preflight(settings, graph_sims, service, roles=["User.Read.All"])
    assert report.status == "fail"
    roles = checks["Graph roles"]
    assert roles.status == "fail" and "User.Read.All" in roles.summary
    assert "grant-graph-permission" in roles.fix and "restart" in roles.fix
    job = checks["Job"]
    assert job.status == "fail" and job.details["httpStatus"] == 403
    assert "Synchronization.ReadWrite.All" in job.fix
    assert_no_token(report, credential)


@pytest.mark.parametrize("code,status,words", [
    ("Active", "ok", ["is Active"]),
    ("Paused", "warn", ["Paused", "/start"]),
    ("Quarantine", "fail", ["quarantine", "EncounteredQuarantineException", "next attempt",
                            "SystemForCrossDomainIdentityManagementCredentialsInvalid"]),
    ("NotRun", "warn", ["NotRun"]),
])
def test_job_status_is_reported_with_advice(azurite, graph_sims, service, code, status, words):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    graph_sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, code=code)
    report, checks, _ = preflight(settings, graph_sims, service)
    job = checks["Job"]
    assert job.status == status and job.details["status"] == code
    text = job.summary + " " + (job.fix or "")
    for word in words:
        assert word in text
    if code == "Quarantine":
        assert job.details["quarantine"]["reason"] == "EncounteredQuarantineException"
        assert "clear the quarantine" in job.fix and "loop" in job.fix
        assert report.status == "fail"


def test_quarantine_reason_set_over_the_admin_endpoint_is_reported(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    answer = httpx.post(f"{graph_sims.graph_endpoint}/_sim/jobs", json={
        "servicePrincipalId": EXAMPLE_SP, "jobId": EXAMPLE_JOB, "code": "Quarantine",
        "quarantine": {"reason": "EncounteredEscrowProportionThreshold", "currentBegan": "2026-01-02T03:04:05Z",
                       "nextAttempt": "2026-01-03T03:04:05Z"}})
    assert answer.status_code == 200 and answer.json()["status"]["code"] == "Quarantine"
    _, checks, _ = preflight(settings, graph_sims, service)
    job = checks["Job"]
    assert job.status == "fail"
    assert "EncounteredEscrowProportionThreshold" in job.summary and "2026-01-02T03:04:05Z" in job.summary


def test_unknown_job_says_which_ids_to_check(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix(), DEFAULT_JOB_ID="no-such-job")
    create_queues(settings, service)
    graph_sims.graph.configure(known_jobs=[[EXAMPLE_SP, EXAMPLE_JOB]])
    try:
        _, checks, _ = preflight(settings, graph_sims, service)
    finally:
        graph_sims.graph.configure(known_jobs=None)
    job = checks["Job"]
    assert job.status == "fail" and job.details["httpStatus"] == 404
    assert "no-such-job" in job.summary and "DEFAULT_SERVICE_PRINCIPAL_ID" in job.fix


def test_graph_outage_while_reading_the_job_is_a_warning_to_retry(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service)
    graph_sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, http_status=503)
    report, checks, _ = preflight(settings, graph_sims, service)
    assert checks["Job"].status == "warn" and "ServiceUnavailable" in checks["Job"].summary
    assert "Try again" in checks["Job"].fix and report.status == "warn"


def test_missing_queues_and_lease_pool_are_reported(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    report, checks, _ = preflight(settings, graph_sims, service)
    assert report.status == "fail"
    queues = checks["Queues"]
    assert queues.status == "fail" and settings.intake_queue in queues.summary and "INTAKE_QUEUE" in queues.summary
    pool = checks["Lease pool"]
    assert pool.status == "warn" and "does not exist" in pool.summary and "lease_upkeep" in pool.fix
    # Read-only: the check must not have created what it reports missing.
    names = {q.name for q in service.list_queues(name_starts_with=settings.intake_queue.split("-")[0])}
    assert not names


def test_unseeded_and_shrunken_pools_are_reported(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix())
    create_queues(settings, service, seed_pool=False)
    _, checks, _ = preflight(settings, graph_sims, service)
    assert checks["Lease pool"].status == "warn" and "not been seeded" in checks["Lease pool"].summary

    lease = service.get_queue_client(settings.lease_queue)
    lease.set_queue_metadata({"epoch": "e" * 32, "calls": "5", "window": "2"})
    lease.send_message(json.dumps({"epoch": "e" * 32, "n": 0}), time_to_live=-1)
    _, checks, _ = preflight(settings, graph_sims, service)
    assert checks["Lease pool"].status == "warn" and "about 1 of 5" in checks["Lease pool"].summary

    # A pool minted for more calls than now allowed would let too many calls through.
    lease.set_queue_metadata({"epoch": "e" * 32, "calls": "8", "window": "2"})
    _, checks, _ = preflight(settings, graph_sims, service)
    pool = checks["Lease pool"]
    assert pool.status == "fail" and "8 calls" in pool.summary and "message clear" in pool.fix


def test_no_default_job_is_skipped_not_failed(azurite, graph_sims, service):
    settings = make_settings(azurite, graph_sims, prefix(), DEFAULT_SERVICE_PRINCIPAL_ID="", DEFAULT_JOB_ID="")
    create_queues(settings, service)
    report, checks, _ = preflight(settings, graph_sims, service)
    assert checks["Job"].status == "skip" and "DEFAULT_JOB_ID" in checks["Job"].summary
    assert report.status == "ok"


# -- the operator command ------------------------------------------------------------------------
def run_cli(azurite, sims, settings_prefix: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAPH_", "IDENTITY_", "AZURE"))}
    env.update(sims.env())
    s = make_settings(azurite, sims, settings_prefix)
    env.update({"AzureWebJobsStorage": azurite.connection_string, "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP,
                "DEFAULT_JOB_ID": EXAMPLE_JOB, "RATE_LIMIT_CALLS": "5", "RATE_LIMIT_WINDOW_SECONDS": "2",
                **{k: v for k, v in queue_names(s).items()}})
    return subprocess.run([sys.executable, "-m", "tools.preflight", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_command_prints_a_readable_report_and_exit_code(azurite, graph_sims, service):
    name = prefix()
    create_queues(make_settings(azurite, graph_sims, name), service)
    healthy = run_cli(azurite, graph_sims, name)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "OK: nothing to fix." in healthy.stdout and "Synchronization.ReadWrite.All granted" in healthy.stdout

    graph_sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, code="Quarantine")
    broken = run_cli(azurite, graph_sims, name)
    assert broken.returncode == 1
    assert re.search(r"FAIL\s+Job\s+job .* is in quarantine", broken.stdout)
    assert "Fix: Fix the cause" in broken.stdout and broken.stdout.rstrip().endswith("1 thing(s) to fix.")

    as_json = run_cli(azurite, graph_sims, name, "--json")
    report = json.loads(as_json.stdout)
    assert report["status"] == "fail" and as_json.returncode == 1
    for output in (healthy, broken, as_json):
        assert not JWT.search(output.stdout + output.stderr)


def test_command_reads_a_settings_file_and_reports_bad_configuration(azurite, graph_sims, service, tmp_path):
    name = prefix()
    settings = make_settings(azurite, graph_sims, name)
    create_queues(settings, service)
    values = {"AzureWebJobsStorage": azurite.connection_string, "GRAPH_ENDPOINT": graph_sims.graph_endpoint,
              "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP, "DEFAULT_JOB_ID": EXAMPLE_JOB,
              "RATE_LIMIT_CALLS": "5", "RATE_LIMIT_WINDOW_SECONDS": "2", **queue_names(settings)}
    file = tmp_path / "local.settings.json"
    file.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    base = {"PATH": os.environ.get("PATH", ""), **graph_sims.env()}
    base.pop("GRAPH_ENDPOINT")
    ok = subprocess.run([sys.executable, "-m", "tools.preflight", "--settings", str(file)], cwd=ROOT,
                        capture_output=True, text=True, env=base, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"pool {settings.lease_queue} is seeded" in ok.stdout

    bad = subprocess.run([sys.executable, "-m", "tools.preflight"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "GRAPH_CLOUD": "China"}, timeout=60)
    assert bad.returncode == 2 and "GRAPH_CLOUD=China is not supported" in bad.stderr


# -- over HTTP -----------------------------------------------------------------------------------
KEY = "preflight-test-key"


@pytest.fixture(scope="module")
def keyed_host(azurite, graph_sims, tmp_path_factory):
    name = prefix()
    settings = make_settings(azurite, graph_sims, name)
    create_queues(settings, QueueServiceClient.from_connection_string(azurite.connection_string), seed_pool=False)
    env = {"AzureWebJobsStorage": azurite.connection_string, **graph_sims.env(), "DEVHOST_FUNCTION_KEY": KEY,
           "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP, "DEFAULT_JOB_ID": EXAMPLE_JOB, "DEFAULT_RULE_ID": "rule",
           "RATE_LIMIT_CALLS": "5", "RATE_LIMIT_WINDOW_SECONDS": "2", **queue_names(settings),
           # Another app on the same storage: its own host id, or the end-to-end tests' devhost holds
           # the lease_upkeep singleton lock and this one never seeds its pool.
           "AzureFunctionsWebHost__hostid": f"preflight-{name}"}
    host = start_devhost(env, log_dir=tmp_path_factory.mktemp("preflight-devhost"))
    # The lease_upkeep timer does not run at start-up: run it as an operator would, through the admin API.
    upkeep = httpx.post(f"{host.url}/admin/functions/lease_upkeep", json={}, headers={"x-functions-key": KEY}, timeout=10)
    assert upkeep.status_code == 202
    lease = QueueClient.from_connection_string(azurite.connection_string, settings.lease_queue)
    deadline = time.monotonic() + 30
    while not (lease.get_queue_properties().metadata or {}).get("epoch") and time.monotonic() < deadline:
        time.sleep(0.2)
    yield host, settings
    host.stop()


def test_plain_health_is_anonymous_and_reveals_nothing(keyed_host, graph_sims):
    host, settings = keyed_host
    response = httpx.get(f"{host.url}/api/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    hinted = httpx.get(f"{host.url}/api/health", params={"deep": "true"}, timeout=10)
    assert hinted.status_code == 401
    assert hinted.json()["error"]["code"] == "FunctionKeyRequired" and "/api/health/deep" in hinted.text
    for body in (response.text, hinted.text):
        for secret in (EXAMPLE_SP, EXAMPLE_JOB, settings.intake_queue, settings.lease_queue,
                       graph_sims.graph_endpoint, "Synchronization", "127.0.0.1"):
            assert secret not in body


def test_deep_health_needs_the_function_key(keyed_host):
    host, _ = keyed_host
    assert httpx.get(f"{host.url}/api/health/deep", timeout=30).status_code == 401
    assert httpx.get(f"{host.url}/api/health/deep", headers={"x-functions-key": "wrong"}, timeout=30).status_code == 401


def test_deep_health_reports_roles_job_and_pool(keyed_host, graph_sims):
    host, settings = keyed_host
    response = httpx.get(f"{host.url}/api/health/deep", headers={"x-functions-key": KEY}, timeout=30)
    assert response.status_code == 200, response.text
    report = response.json()
    checks = {c["name"]: c for c in report["checks"]}
    assert report["status"] == "ok", report
    assert checks["Graph roles"]["details"]["roles"] == [FULL]
    assert checks["Job"]["details"]["status"] == "Active"
    assert checks["Lease pool"]["details"]["queue"] == settings.lease_queue
    assert checks["Lease pool"]["details"]["tokens"] >= 5
    assert not JWT.search(response.text)

    graph_sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, code="Paused")
    paused = httpx.get(f"{host.url}/api/health/deep", params={"code": KEY}, timeout=30)
    assert paused.status_code == 200 and paused.json()["status"] == "warn"

    graph_sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, code="Quarantine")
    quarantined = httpx.get(f"{host.url}/api/health/deep", params={"code": KEY}, timeout=30)
    assert quarantined.status_code == 503
    job = {c["name"]: c for c in quarantined.json()["checks"]}["Job"]
    assert job["status"] == "fail" and job["details"]["quarantine"]["reason"] == "EncounteredQuarantineException"
    assert not JWT.search(quarantined.text)


def test_simulated_job_route_checks_the_token_and_is_outside_the_rate_limit():
    with start_simulators(rate_calls=5, rate_window=10) as sims:
        url = f"{sims.graph_endpoint}/v1.0/servicePrincipals/{EXAMPLE_SP}/synchronization/jobs/{EXAMPLE_JOB}"
        assert httpx.get(url).status_code == 401
        headers = {"Authorization": f"Bearer {sims.mint_token()}"}
        answers = [httpx.get(url, headers=headers) for _ in range(8)]
        assert {a.status_code for a in answers} == {200}
        assert answers[0].json()["id"] == EXAMPLE_JOB and answers[0].json()["status"]["code"] == "Active"
        with pytest.raises(ValueError):
            sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, code="Sleeping")
        sims.graph.set_job(EXAMPLE_SP, EXAMPLE_JOB, http_status=503)
        failed = httpx.get(url, headers=headers)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "ServiceUnavailable"
        assert not [c for c in sims.graph.calls() if c["counted"]]
