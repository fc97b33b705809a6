"""Start-up whatever the settings: the import registers every function and loads no client library;
bad settings give a 503 that names them (not their values), one critical log line, and parked
(never poisoned) queue messages; the upkeep timer costs little; Easy Auth callers."""
import base64
import json
import logging
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.errors import RequestRejected, SettingsError
from shared.intake import callers
from shared.operations import preflight, readiness
from shared.settings import Settings, get_settings, load_settings, settings_problem

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("azure.identity", "httpx", "azure.storage.queue", "azure.data.tables", "azure.monitor.ingestion")
ALL_FUNCTIONS = {"provision", "provision_status", "intake_queue", "provision_worker", "log_analytics_upload",
                 "lease_upkeep", "openapi_description", "health", "health_deep"}
APP_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
OTHER_APP = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
LEAKY = "leaky-value-42"


@pytest.fixture
def env(monkeypatch):
    """Set exactly these app settings for the test; the cached settings are forgotten around it."""
    def apply(**values: str) -> None:
        for name in list(os.environ):
            if name in Settings.model_fields or any(f.alias == name for f in Settings.model_fields.values()):
                monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        settings_problem.cache_clear()
    yield apply
    get_settings.cache_clear()
    settings_problem.cache_clear()


def _import_report(environment: dict[str, str]) -> dict:
    probe = ("import json, sys, function_app; print(json.dumps({'functions': [f.get_function_name() for f in "
             f"function_app.app.get_functions()], 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    done = subprocess.run([sys.executable, "-c", probe], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), **environment})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("environment", [{}, {"AzureWebJobsStorage": "UseDevelopmentStorage=true",
                                              "RESULTS_SINK": "queue"}], ids=["no-settings", "valid"])
def test_import_registers_every_function_and_loads_no_client_library(environment):
    report = _import_report(environment)
    assert set(report["functions"]) == ALL_FUNCTIONS
    assert report["heavy"] == []


@lru_cache(maxsize=1)
def functions() -> dict:
    import function_app

    # get_functions() validates names and refuses to run twice in one process.
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


def test_upkeep_timer_does_not_run_at_start_and_runs_every_five_minutes():
    timer = functions()["lease_upkeep"]
    trigger = json.loads(timer.get_function_json())["bindings"][0]
    assert trigger["schedule"] == "0 */5 * * * *"
    assert not trigger.get("runOnStartup")


def test_bad_setting_is_named_without_its_value(env):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true", GRAPH_CLOUD=LEAKY)
    reply = readiness.unready_reply()
    assert reply.status == 503 and reply.body["error"]["code"] == "SettingsInvalid"
    assert reply.body["error"]["details"] == [{"setting": "GRAPH_CLOUD"}]
    assert "GRAPH_CLOUD" in reply.body["error"]["message"] and LEAKY not in reply.json()
    # The anonymous health probe says the same; only the keyed deep check shows the whole problem.
    health = preflight.health_reply({})
    assert health.status == 503 and LEAKY not in health.json() and "GRAPH_CLOUD" in health.json()
    assert LEAKY in readiness.unready_reply(detailed=True).json()


def test_missing_storage_names_every_way_to_set_it(env):
    env()
    reply = readiness.unready_reply()
    assert {d["setting"] for d in reply.body["error"]["details"]} >= {"AzureWebJobsStorage",
                                                                      "AzureWebJobsStorage__accountName"}


def test_valid_settings_are_ready(env):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true")
    assert readiness.unready_reply() is None and preflight.health_reply({}).status == 200
    assert not readiness.must_park()


def test_one_critical_line_per_start_not_per_message(env, caplog):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true", RATE_LIMIT_CALLS="many")
    with caplog.at_level(logging.CRITICAL):
        for _ in range(5):
            assert readiness.must_park()
            readiness.unready_reply()
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "RATE_LIMIT_CALLS" in critical[0].getMessage()


class Out:
    def __init__(self):
        self.value = None

    def set(self, value):
        self.value = value

    def get(self):
        return self.value


def _queue_message(body: str, dequeue_count: int = 1):
    from azure.functions.queue import QueueMessage

    return QueueMessage(id="m1", body=body.encode(), dequeue_count=dequeue_count)


@pytest.mark.parametrize("name", ["intake_queue", "provision_worker", "log_analytics_upload"])
def test_queue_functions_park_their_message_instead_of_raising(env, name):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true", GRAPH_CLOUD=LEAKY)
    function = functions()[name]
    outputs = {b.name: Out() for b in function.get_bindings() if b.type == "queue"}
    body = '{"objectId": "9bb0f679-a883-4a6f-8260-35b491b8b8c8", "objectTypeName": "User"}'
    function.get_user_function()(msg=_queue_message(body, dequeue_count=5), **outputs)
    assert outputs["parked"].value == body
    assert all(out.value is None for binding, out in outputs.items() if binding != "parked")
    parked_binding = next(b for b in function.get_bindings() if b.name == "parked")
    trigger = function.get_trigger()
    assert parked_binding.queue_name == trigger.queue_name + readiness.PARKED_SUFFIX


def test_log_rows_are_parked_while_the_sink_is_off(env):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true", RESULTS_SINK="queue")
    assert readiness.must_park(for_logs=True) and not readiness.must_park()


@pytest.mark.parametrize("sink, returned", [("queue", {"provision-requests", "provision-work"}),
                                            ("both", {"provision-requests", "provision-work", "provision-logs"})])
def test_upkeep_returns_log_rows_only_to_a_sink_that_takes_them(env, sink, returned):
    env()
    logs = {} if sink == "queue" else {"LOGS_INGESTION_ENDPOINT": "https://dce.example.ingest.monitor.azure.com",
                                       "LOGS_DCR_IMMUTABLE_ID": "dcr-" + "0" * 32}
    rt = SimpleNamespace(settings=Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", RESULTS_SINK=sink, **logs))
    assert readiness.parked_queues(rt) == {name + readiness.PARKED_SUFFIX: name for name in returned}


# -- Easy Auth ------------------------------------------------------------------------------------
def principal(*claims: tuple[str, str], role_typ: str = "roles") -> str:
    # The shape of the doc's "Decode the client principal header".
    document = {"auth_typ": "aad", "claims": [{"typ": t, "val": v} for t, v in claims],
                "name_typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "role_typ": role_typ}
    return base64.b64encode(json.dumps(document).encode()).decode()


def easy(**values: str) -> Settings:
    return Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", EASY_AUTH_ENABLED="true", **values)


def test_allowed_application_is_admitted_and_becomes_the_caller():
    s = easy(ALLOWED_CLIENT_APP_IDS=f" {APP_ID.upper()} , {OTHER_APP}")
    headers = {"X-MS-CLIENT-PRINCIPAL": principal(("appid", APP_ID))}
    assert callers.admit(headers, s) == APP_ID and callers.caller_of(headers, s) == APP_ID
    v2 = {"x-ms-client-principal": principal(("azp", OTHER_APP))}  # v2.0 tokens name the client in azp
    assert callers.admit(v2, s) == OTHER_APP


def test_role_holder_is_admitted_under_the_mapped_role_claim():
    s = easy(ALLOWED_CLIENT_ROLES="Provisioning.Submit")
    mapped = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
    headers = {"x-ms-client-principal": principal(("appid", OTHER_APP), (mapped, "Provisioning.Submit"),
                                                  role_typ=mapped)}
    assert callers.admit(headers, s) == OTHER_APP


def test_other_entra_callers_get_403():
    s = easy(ALLOWED_CLIENT_APP_IDS=APP_ID, ALLOWED_CLIENT_ROLES="Provisioning.Submit")
    headers = {"x-ms-client-principal": principal(("appid", OTHER_APP), ("roles", "Other.Role"))}
    with pytest.raises(RequestRejected) as refused:
        callers.admit(headers, s)
    assert refused.value.status == 403 and refused.value.info.code == "CallerNotAllowed"
    with pytest.raises(RequestRejected) as garbled:
        callers.admit({"x-ms-client-principal": "not base64 json"}, s)
    assert garbled.value.status == 403 and garbled.value.info.code == "UnreadableClientPrincipal"


def test_callers_without_a_principal_fall_back_to_keys_and_hmac():
    assert callers.admit({"x-functions-key": "k"}, easy(ALLOWED_CLIENT_APP_IDS=APP_ID)) is None


def test_with_easy_auth_off_the_header_is_nobodys_word():
    s = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", ALLOWED_CLIENT_APP_IDS=APP_ID)
    headers = {"x-ms-client-principal": principal(("appid", OTHER_APP))}
    assert callers.admit(headers, s) is None and callers.caller_of(headers, s) is None


@pytest.mark.parametrize("values, named", [
    ({"EASY_AUTH_ENABLED": "true"}, "EASY_AUTH_ENABLED"),
    ({"WORK_QUEUE": "w" * 57}, "WORK_QUEUE"),  # no room left for "-parked"
    ({"ALLOWED_CLIENT_APP_IDS": "my-logic-app"}, "ALLOWED_CLIENT_APP_IDS"),
])
def test_easy_auth_settings_are_checked(env, values, named):
    env(AzureWebJobsStorage="UseDevelopmentStorage=true", **values)
    with pytest.raises(SettingsError) as bad:
        load_settings()
    assert named in bad.value.settings and "my-logic-app" not in str(bad.value)


def test_preflight_reports_easy_auth_and_settings_valid():
    on = preflight.check_callers(easy(ALLOWED_CLIENT_APP_IDS=f"{APP_ID},{OTHER_APP}", ALLOWED_CLIENT_ROLES="A"))
    assert on.details == {"easyAuth": True, "allowedClientAppIds": 2, "allowedClientRoles": 1}
    assert "Easy Auth on" in on.summary
    off = preflight.check_callers(Settings(AzureWebJobsStorage="UseDevelopmentStorage=true"))
    assert off.details["easyAuth"] is False and "Easy Auth off" in off.summary
    assert preflight.check_settings().status == "ok"
