"""Entra ID callers through devhost emulating App Service Authentication: an allowed application
is admitted, another gets 403 with a JSON error, a caller without a principal falls back to keys."""
from __future__ import annotations

import base64
import json

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError

from scripts.local_stack import EXAMPLE_RULE
from tests.conftest import IsolatedHost

ALLOWED = "0f8fad5b-d9cb-469f-a165-70867728950e"
STRANGER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
KEY = "entra-test-key"
EVENT = {"objectId": "9bb0f679-a883-4a6f-8260-35b491b8b8c8", "objectTypeName": "User"}


def as_app(app_id: str) -> dict[str, str]:
    principal = {"auth_typ": "aad", "claims": [{"typ": "appid", "val": app_id}], "role_typ": "roles"}
    return {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(json.dumps(principal).encode()).decode(),
            "X-MS-CLIENT-PRINCIPAL-IDP": "aad", "x-functions-key": KEY}


@pytest.fixture(scope="module")
def entra(azurite, tmp_path_factory):
    host = IsolatedHost(azurite, tmp_path_factory.mktemp("entra"), "entra", EASY_AUTH_ENABLED="true",
                        ALLOWED_CLIENT_APP_IDS=ALLOWED, DEVHOST_EMULATE_EASY_AUTH="true", DEVHOST_FUNCTION_KEY=KEY,
                        DEFAULT_RULE_ID=EXAMPLE_RULE)
    yield host
    host.stop()


def test_first_call_seeds_a_fresh_pool_without_the_upkeep_timer(entra):
    # The timer runs every 5 minutes and not at start-up: the first worker call must mint the pool.
    lease = entra.queue("LEASE_QUEUE")
    assert not _epoch(lease)
    accepted = httpx.post(f"{entra.host.url}/api/provision", json=EVENT, headers={"x-functions-key": KEY}, timeout=30)
    request_id = accepted.json()["requests"][0]["requestId"]
    entra.results.wait_for(lambda m: m.get("requestId") == request_id, timeout=60)
    assert _epoch(lease)
    # Minted before any run of the timer (which fires on the wall clock's five minutes, so may fall
    # inside the test).
    log = entra.host.log_path.read_text()
    minted, upkeep = log.find("lease pool minted epoch"), log.find("Executing 'Functions.lease_upkeep'")
    assert minted >= 0 and (upkeep < 0 or minted < upkeep)


def _epoch(lease) -> str | None:
    try:
        return (lease.get_queue_properties().metadata or {}).get("epoch")
    except ResourceNotFoundError:
        return None


def test_only_allowed_entra_callers_are_admitted(entra):
    url = f"{entra.host.url}/api/provision"
    admitted = httpx.post(url, json=EVENT, headers=as_app(ALLOWED), timeout=30)
    assert admitted.status_code == 202, admitted.text
    refused = httpx.post(url, json=EVENT, headers=as_app(STRANGER), timeout=30)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "CallerNotAllowed"
    assert refused.json()["error"]["details"] == [{"appId": STRANGER}]
    request_id = admitted.json()["requests"][0]["requestId"]
    status = httpx.get(f"{url}/{request_id}", headers=as_app(STRANGER), timeout=30)
    assert status.status_code == 403
    assert httpx.get(f"{url}/{request_id}", headers=as_app(ALLOWED), timeout=30).status_code == 200
    # No principal: the function key alone, as before Easy Auth.
    assert httpx.post(url, json=EVENT, headers={"x-functions-key": KEY}, timeout=30).status_code == 202
    deep = httpx.get(f"{entra.host.url}/api/health/deep", headers={"x-functions-key": KEY}, timeout=60).json()
    callers = next(c for c in deep["checks"] if c["name"] == "Callers")
    assert callers["details"] == {"easyAuth": True, "allowedClientAppIds": 1, "allowedClientRoles": 0}
    assert next(c for c in deep["checks"] if c["name"] == "Settings")["status"] == "ok"
