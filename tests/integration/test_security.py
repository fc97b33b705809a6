"""Authentication and secrecy: webhook signatures, PII redaction, the OpenAPI contract, and an end
to end scan proving that no secret reaches the log, the results or the dead letters."""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from azure.storage.queue import QueueClient

from shared import handlers
from shared.errors import SettingsError
from shared.graph.decoding import decode
from shared.intake.signatures import sign
from shared.models import GraphKeyValue
from shared.operations.openapi import build_spec
from shared.results.redaction import PREFIX, pseudonym, redact
from shared.settings import Settings, load_settings
from tests.fakes import SETTINGS, FakeRuntime, no_storage
from tests.system.test_scale_out import Cluster

GOLDEN = Path(__file__).resolve().parents[2] / "simulators" / "golden"
EXAMPLE1 = json.loads((GOLDEN / "example1_user_skipped.json").read_text())
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
SECRET = "whsec-" + "k3y" * 8
SALT = "salt-for-tests-0123456789"
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.")
BODY = json.dumps({"objectId": USER, "objectTypeName": "User"}).encode()


def signed_settings(**extra) -> Settings:
    return SETTINGS.model_copy(update={"webhook_hmac_secret": SECRET, **extra})


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-Timestamp": ts, "X-Signature": sign(secret, ts, body)}


# -- signatures (the rules themselves: tests/unit/test_signatures.py) --------------------------------
def test_the_check_runs_before_parsing():
    rt = FakeRuntime()
    rt.settings = signed_settings()
    with no_storage():
        unsigned = handlers.provision_http(b"{not json", {"Content-Type": "text/html"}, rt)
        signed = handlers.provision_http(BODY, signed_headers(BODY), rt)
    # An unsigned caller learns nothing about content type or JSON: 401, not 415 or 400.
    assert unsigned.status == 401 and unsigned.body["error"]["code"] == "SignatureMissing"
    assert signed.status == 202


def test_settings_validate_the_webhook_and_redaction_settings(monkeypatch):
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("REDACT_PII", "true")
    with pytest.raises(SettingsError, match="REDACT_PII_SALT"):
        load_settings()
    monkeypatch.setenv("REDACT_PII_SALT", SALT)
    monkeypatch.setenv("WEBHOOK_SIGNATURE_HEADER", "X-Sig\r\nX-Evil")
    with pytest.raises(SettingsError, match="WEBHOOK_SIGNATURE_HEADER"):
        load_settings()
    monkeypatch.setenv("WEBHOOK_SIGNATURE_HEADER", "X-Sig")
    monkeypatch.setenv("WEBHOOK_HMAC_SECRET", SECRET)
    s = load_settings()
    assert s.redact_pii and s.webhook_hmac_secret == SECRET
    assert SECRET not in repr(s) and SALT not in repr(s)


# -- redaction -------------------------------------------------------------------------------------
def golden_outcome():
    return decode(GraphKeyValue.model_validate(EXAMPLE1["response"]))


def test_redaction_replaces_personal_values_with_stable_salted_hashes():
    plain = golden_outcome()
    redacted = redact(plain, SALT)
    upn = plain.reportableIdentifier
    assert upn and redacted.reportableIdentifier == pseudonym(upn, SALT)
    assert re.fullmatch(r"pii:[0-9a-f]{16}", redacted.reportableIdentifier)
    text = redacted.model_dump_json()
    for value in ["Bill Bob", "Fill Bob", upn, "Retrieved User"]:
        assert value not in text, value
    # Joins still work: the UPN hashes alike wherever it appears.
    by_name = {p.displayName: p for p in redacted.modifiedProperties}
    assert by_name["userPrincipalName"].newValue == redacted.steps[0].details["userPrincipalName"] \
        == redacted.reportableIdentifier
    assert by_name["displayName"].newValue == pseudonym("Bill Bob", SALT)
    # What is not personal stays readable.
    assert (redacted.result, redacted.errorCode, redacted.action) == ("Skipped", "RedundantExport", "Other")
    assert [p.displayName for p in redacted.modifiedProperties] == [p.displayName for p in plain.modifiedProperties]
    assert [s.name for s in redacted.steps] == [s.name for s in plain.steps]
    assert all(v is None or v.startswith(PREFIX) for p in redacted.modifiedProperties for v in (p.oldValue, p.newValue))
    assert all(v.startswith(PREFIX) for s in redacted.steps for v in (s.details or {}).values())
    assert plain.reportableIdentifier == upn  # the input is not modified


def test_redaction_depends_on_the_salt_and_covers_identities_and_raw_values():
    outcome = golden_outcome().model_copy(update={"rawValue": "Bill Bob raw"})
    outcome.sourceIdentity.displayName = "Bill Bob"
    a, b = redact(outcome, SALT), redact(outcome, SALT + "2")
    assert a.sourceIdentity.displayName == pseudonym("Bill Bob", SALT) != b.sourceIdentity.displayName
    assert a.rawValue.startswith(PREFIX) and a.sourceIdentity.id == outcome.sourceIdentity.id


# -- the OpenAPI description -----------------------------------------------------------------------
def test_the_description_is_valid_openapi_30():
    from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

    spec = build_spec(SETTINGS, "https://func.example.net")
    errors = list(OPENAPI_30_VALIDATOR.iter_errors(spec))
    assert errors == []
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert all(op.get("operationId") for op in operations)
    provision = spec["paths"]["/api/provision"]["post"]["responses"]
    assert sorted(provision) == ["202", "400", "401", "409", "413", "415", "422", "503"]
    for status, response in provision.items():
        if status != "202":
            assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "$defs" not in json.dumps(spec) and '"const"' not in json.dumps(spec)


# -- end to end: signatures on, PII redacted, then look for secrets everywhere ---------------------
FUNCTION_KEY = "fk-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secure(azurite, tmp_path_factory):
    c = Cluster(azurite, tmp_path_factory.mktemp("secure"), hosts=1, WEBHOOK_HMAC_SECRET=SECRET,
                REDACT_PII="true", REDACT_PII_SALT=SALT, DEVHOST_FUNCTION_KEY=FUNCTION_KEY)
    yield c
    c.stop()


def post_signed(cluster: Cluster, body: dict, *, sign_it: bool = True, key: bool = True,
                timestamp: int | None = None) -> httpx.Response:
    raw = json.dumps(body).encode()
    headers = signed_headers(raw, timestamp=timestamp) if sign_it else {"Content-Type": "application/json"}
    if key:
        headers["x-functions-key"] = FUNCTION_KEY
    return httpx.post(f"{cluster.hosts[0].url}/api/provision", content=raw, headers=headers, timeout=30)


def test_end_to_end_signatures_redaction_and_no_secret_anywhere(secure, azurite):
    example = dict(EXAMPLE1["request"], servicePrincipalId=EXAMPLE1["servicePrincipalId"], jobId=EXAMPLE1["jobId"])
    # Refusals: each a 401 with a JSON error, none of them reaching intake.
    assert post_signed(secure, example, key=False).status_code == 401
    missing = post_signed(secure, example, sign_it=False)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "SignatureMissing"
    stale = post_signed(secure, example, timestamp=int(time.time()) - 3600)
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "TimestampOutOfRange"
    forged = httpx.post(f"{secure.hosts[0].url}/api/provision", content=json.dumps(example),
                        headers={**signed_headers(b"{}"), "x-functions-key": FUNCTION_KEY}, timeout=30)
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "SignatureInvalid"
    # The description and the probe stay anonymous.
    assert httpx.get(f"{secure.hosts[0].url}/api/openapi.json", timeout=10).status_code == 200

    accepted = post_signed(secure, example)
    assert accepted.status_code == 202, accepted.text
    [request] = accepted.json()["requests"]
    denied_user = "33333333-0000-4000-8000-00000000beef"
    secure.sims.graph.script(denied_user, {"status": 403, "body": {"error": {
        "code": "Authorization_RequestDenied", "message": "Insufficient privileges."}}})
    denied = post_signed(secure, {"objectId": denied_user, "objectTypeName": "User"})
    [denied_request] = denied.json()["requests"]
    QueueClient.from_connection_string(azurite.connection_string, secure.queues["INTAKE_QUEUE"]).send_message(
        '{"objectId": "nope", "objectTypeName": "User", "correlationId": "sec-bad"}')

    # A fresh lease pool needs a window plus its epoch cache time before the first call.
    [result] = secure.results.wait_for(lambda m: m.get("requestId") == request["requestId"], timeout=60)
    secure.deadletters.wait_for(lambda m: m.get("requestId") == denied_request["requestId"], timeout=60)
    secure.deadletters.wait_for(lambda m: "sec-bad" in m.get("original", ""), timeout=30)
    secure.results.wait_for(lambda m: m.get("requestId") == denied_request["requestId"], timeout=30)

    # Redacted, and joinable under the salt.
    assert result["result"] == "Skipped" and result["errorCode"] == "RedundantExport"
    plain = golden_outcome()
    assert result["reportableIdentifier"] == pseudonym(plain.reportableIdentifier, SALT)
    text = json.dumps(result)
    for value in ["Bill Bob", "Fill Bob", plain.reportableIdentifier]:
        assert value not in text

    secrets = {
        "HMAC secret": SECRET,
        "IDENTITY_HEADER": secure.sims.identity_header,
        "storage account key": re.search(r"AccountKey=([^;]+)", azurite.connection_string).group(1),
        "function key": FUNCTION_KEY,
        "redaction salt": SALT,
        "a Graph token": secure.sims.mint_token(),
    }
    time.sleep(0.5)  # let the host flush its last log lines
    haystacks = {"devhost log": secure.hosts[0].log_path.read_text(errors="replace"),
                 "results": json.dumps(secure.results.matching(lambda m: True)),
                 "dead letters": json.dumps(secure.deadletters.matching(lambda m: True)),
                 "HTTP answers": " ".join(r.text for r in (missing, stale, forged, accepted, denied))}
    # The scan is only worth something if it reads the log of the host that did the work.
    assert "Functions.provision_worker" in haystacks["devhost log"]
    for where, text in haystacks.items():
        for name, secret in secrets.items():
            assert secret not in text, f"{name} found in {where}"
        assert not JWT_RE.search(text), f"something shaped like a JWT in {where}"
