"""Issue 13 N5: webhook signatures cover method, path, query, timestamp and body; each signature is
accepted once within its window; the old timestamp.body scheme is refused with a reason.

The replay cache is the AnswerBook on the in-memory table (tests/fakes.py); the end-to-end
run through devhost and Azurite is tests/integration/test_security.py."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.errors import KeyStoreUnavailable, RequestRejected
from shared.intake.idempotency import AnswerBook
from shared.intake.signatures import canonical_query, sign, string_to_sign, verify
from shared.settings import Settings
from tests.fakes import MemoryTable, outage

SECRET = "whsec-" + "k3y" * 8
BODY = json.dumps({"objectId": "9bb0f679-a883-4a6f-8260-35b491b8b8c8", "objectTypeName": "User"}).encode()
PATH = "/api/provision"
SETTINGS = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", WEBHOOK_HMAC_SECRET=SECRET)


def book() -> AnswerBook:
    return AnswerBook(MemoryTable(), retention_seconds=3600)


def headers_for(body: bytes = BODY, *, method: str = "POST", path: str = PATH, params=None, ts: int | None = None,
                secret: str = SECRET) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"X-Timestamp": str(ts), "X-Signature": sign(secret, ts, body, method, path, params)}


def check(headers, body: bytes = BODY, *, method: str = "POST", path: str = PATH, params=None,
          seen: AnswerBook | None = None, settings: Settings = SETTINGS, now: float | None = None):
    return verify(body, headers, settings, method=method, path=path, params=params, seen=seen, now=now)


def refusal(headers, **kwargs) -> str:
    with pytest.raises(RequestRejected) as info:
        check(headers, **kwargs)
    assert info.value.status == 401 and SECRET not in json.dumps(info.value.info.model_dump())
    return info.value.info.code


def test_signing_is_off_without_a_secret():
    assert check({}, settings=Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")) is None


def test_the_documented_string_to_sign():
    # docs/security.md: timestamp LF METHOD LF path LF canonical query LF body
    message = b"1700000000\nPOST\n/api/provision\ndryRun=true\n" + BODY
    assert string_to_sign(1700000000, "post", PATH, "dryRun=true", BODY) == message
    expected = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, BODY, "POST", PATH, {"dryRun": "true"}) == f"sha256={expected}"


def test_the_canonical_query_sorts_encodes_and_leaves_out_the_function_key():
    assert canonical_query({"z": "1", "dryRun": "true", "code": "secret-key", "a b": "c&d=é"}) == \
        "a%20b=c%26d%3D%C3%A9&dryRun=true&z=1"
    assert canonical_query(None) == canonical_query({}) == canonical_query({"CODE": "k"}) == ""


def test_a_fresh_correct_signature_passes_and_is_claimed():
    assert check(headers_for(), seen=book()) is not None


@pytest.mark.parametrize("change", [
    {"method": "PUT"}, {"path": "/api/provision/other"}, {"params": {"dryRun": "false"}}, {"params": {}},
    {"params": {"dryRun": "true", "x": "1"}}, {"body": BODY.replace(b"User", b"Group")},
])
def test_a_captured_dry_run_cannot_be_sent_as_anything_else(change):
    # Signed as ?dryRun=true; sent again with any part changed: the MAC no longer matches.
    signed = headers_for(params={"dryRun": "true"})
    sent = {"method": "POST", "path": PATH, "params": {"dryRun": "true"}, "body": BODY, **change}
    assert refusal(signed, **sent) == "SignatureInvalid"


def test_the_function_key_in_the_query_is_not_part_of_the_signature():
    check(headers_for(params={"dryRun": "true"}), params={"dryRun": "true", "code": "the-host-checks-this"})


@pytest.mark.parametrize("tamper", ["secret", "timestamp-in-mac", "garbage", "non-ascii", "empty-hex"])
def test_a_wrong_signature_is_signature_invalid(tamper):
    headers = headers_for(secret=SECRET + "x") if tamper == "secret" else headers_for()
    if tamper == "timestamp-in-mac":
        headers["X-Timestamp"] = str(int(headers["X-Timestamp"]) - 1)
    elif tamper == "garbage":
        headers["X-Signature"] = "sha256=" + "0" * 64
    elif tamper == "non-ascii":
        headers["X-Signature"] = "sha256=\u00e9" * 3
    elif tamper == "empty-hex":
        headers["X-Signature"] = "sha256="
    assert refusal(headers) == "SignatureInvalid"


def test_the_old_timestamp_dot_body_signature_is_refused_and_says_why():
    ts = str(int(time.time()))
    legacy = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + BODY, hashlib.sha256).hexdigest()
    assert refusal({"X-Timestamp": ts, "X-Signature": legacy}) == "SignatureVersionUnsupported"


@pytest.mark.parametrize("drop", ["X-Signature", "X-Timestamp"])
def test_missing_headers_are_signature_missing(drop):
    headers = headers_for()
    del headers[drop]
    assert refusal(headers) == "SignatureMissing"


@pytest.mark.parametrize("skew", [-301, 301, -86400, 10**9])
def test_old_or_future_timestamps_are_refused(skew):
    now = time.time()
    assert refusal(headers_for(ts=int(now) + skew), now=now) == "TimestampOutOfRange"


@pytest.mark.parametrize("stamp", ["nan", "1e9", "-5", "+1700000000", "17000000000000", " ", "1700000000.5"])
def test_timestamps_must_be_whole_epoch_seconds(stamp):
    headers = headers_for()
    headers["X-Timestamp"] = stamp
    assert refusal(headers) in ("TimestampOutOfRange", "SignatureMissing")


def test_header_names_and_tolerance_are_settings():
    s = SETTINGS.model_copy(update={"webhook_signature_header": "X-Hub-Signature-256",
                                    "webhook_timestamp_header": "X-Hub-Time", "webhook_tolerance_seconds": 5})
    ts = int(time.time()) - 4
    check({"x-hub-signature-256": sign(SECRET, ts, BODY), "X-HUB-TIME": str(ts)}, settings=s)
    assert refusal({"X-Hub-Signature-256": sign(SECRET, ts - 10, BODY), "X-Hub-Time": str(ts - 10)}, settings=s) \
        == "TimestampOutOfRange"


def test_a_signature_seen_again_within_the_window_is_refused():
    seen, headers = book(), headers_for()
    check(headers, seen=seen)
    assert refusal(headers, seen=seen) == "SignatureReplayed"
    check(headers_for(ts=int(time.time()) - 1), seen=seen)  # another signature is its own


def test_a_forgotten_signature_is_accepted_again_for_a_verbatim_retry():
    # The handler forgets the claim when it did not act (4xx/5xx), so a Logic Apps retry passes.
    seen, headers = book(), headers_for()
    seen.forget(check(headers, seen=seen))
    assert check(headers, seen=seen) is not None


def test_the_replay_cache_lasts_as_long_as_a_timestamp_is_accepted():
    clock = [1_000_000.0]
    seen = AnswerBook(MemoryTable(), 3600, clock=lambda: clock[0])
    headers = headers_for(ts=int(clock[0]))
    check(headers, seen=seen, now=clock[0])
    clock[0] += 2 * SETTINGS.webhook_tolerance_seconds - 1
    assert seen.claim_once(headers["X-Signature"].removeprefix("sha256="), "webhook-signature", 600) is None


def test_a_signature_table_outage_refuses_nothing_silently():
    table = MemoryTable()
    table.fault = outage
    with pytest.raises(KeyStoreUnavailable):
        check(headers_for(), seen=AnswerBook(table, 3600))


DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_the_python_sample_in_the_docs_signs_as_the_app_verifies():
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1), namespace)
    headers = namespace["sign"](SECRET, BODY, params={"dryRun": "true", "code": "function-key"})
    check(headers, params={"dryRun": "true", "code": "function-key"})


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_shell_sample_in_the_docs_signs_as_the_app_verifies():
    recipe = re.search(r"sig=\$\((printf .*?) \| openssl", DOCS.read_text()).group(1)
    script = f"ts=1700000000; body='{BODY.decode()}'; {recipe} | openssl dgst -sha256 -hmac '{SECRET}' -r | cut -d' ' -f1"
    mac = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert f"sha256={mac}" == sign(SECRET, 1700000000, BODY)
