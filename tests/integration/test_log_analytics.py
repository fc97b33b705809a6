"""Results to Log Analytics: settings, row mapping, 1 MB batching, the shipped table/DCR/queries,
the Logs Ingestion simulator, the upload function against real Azurite, and end to end through
devhost with RESULTS_SINK=both."""
from __future__ import annotations

import gzip
import json
import re
import ssl
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from azure.monitor.ingestion._helpers import _split_chunks

from shared.errors import SettingsError
from shared.graph.decoding import decode
from shared.models import GraphKeyValue, ResultMessage, Subject
from shared.queues import Queues
from shared.results.log_analytics import (
    MAX_CALL_BYTES,
    LogsEnvelope,
    UploadFailed,
    envelope_text,
    row_bytes,
    split_batches,
    to_row,
    upload_message,
    upload_rows,
)
from shared.results.sinks import QueueSink, result_sinks
from shared.settings import Settings, load_settings
from simulators.logs_ingestion import LogsIngestionSimulator, check_row, load_columns

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "simulators" / "golden"
TABLE = ROOT / "infra" / "loganalytics" / "table.json"
DCR = ROOT / "infra" / "loganalytics" / "dcr.json"
QUERIES = sorted((ROOT / "queries").glob("*.kql"))
COLUMNS = load_columns(TABLE)
SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
JOB = "3f7565a3-fde6-4e4d-bda8-1bb70aba3612"
RULE = "ea807875-5618-4f0a-9125-0b46a05298ca"
RECEIVED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def seed_result(name: str = "example1_user_skipped", index: int = 0, **update) -> ResultMessage:
    example = json.loads((GOLDEN / f"{name}.json").read_text())
    outcome = decode(GraphKeyValue.model_validate(example["response"]))
    subject = example["request"]["parameters"][0]["subjects"][0]
    fields = dict(outcome.model_dump(), resultId=f"req-{index}:0", requestId=f"req-{index}", correlationId="HR-7",
                  servicePrincipalId=SP, jobId=JOB, ruleId=RULE,
                  subject=Subject(objectId=subject["objectId"], objectTypeName=subject["objectTypeName"]),
                  callIndex=0, callCount=1, attempts=2, receivedAt=RECEIVED,
                  completedAt=RECEIVED + timedelta(milliseconds=1234))
    fields.update(update)
    return ResultMessage(**fields)


# --- settings -----------------------------------------------------------------------------------

LA = {"LOGS_INGESTION_ENDPOINT": "https://dce-x.eastus-1.ingest.monitor.azure.com",
      "LOGS_DCR_IMMUTABLE_ID": "dcr-0123456789abcdef0123456789abcdef"}


def settings_from(monkeypatch, **env) -> Settings:
    for name in ("RESULTS_SINK", "LOGS_INGESTION_ENDPOINT", "LOGS_DCR_IMMUTABLE_ID", "LOGS_STREAM_NAME", "GRAPH_CLOUD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_default_sink_is_the_results_queue_only(monkeypatch):
    s = settings_from(monkeypatch)
    assert s.results_sink.value == "queue" and not s.logs_enabled
    assert s.logs_stream_name == "Custom-ProvisioningResults_CL" and s.logs_queue == "provision-logs"
    assert s.logs_max_attempts == 10
    sinks = result_sinks(s, Queues(None))
    assert [type(k) for k in sinks] == [QueueSink]


@pytest.mark.parametrize("sink", ["loganalytics", "both", "Both"])
def test_log_analytics_sink_without_its_settings_fails_naming_them(monkeypatch, sink):
    with pytest.raises(SettingsError) as err:
        settings_from(monkeypatch, RESULTS_SINK=sink)
    assert "LOGS_INGESTION_ENDPOINT" in str(err.value) and "LOGS_DCR_IMMUTABLE_ID" in str(err.value)
    with pytest.raises(SettingsError) as err:
        settings_from(monkeypatch, RESULTS_SINK=sink, LOGS_INGESTION_ENDPOINT=LA["LOGS_INGESTION_ENDPOINT"])
    assert "missing: LOGS_DCR_IMMUTABLE_ID" in str(err.value) and "missing: LOGS_INGESTION_ENDPOINT" not in str(err.value)


def test_half_set_log_analytics_fails_even_with_the_queue_sink(monkeypatch):
    with pytest.raises(SettingsError, match="half configured: LOGS_INGESTION_ENDPOINT is not set"):
        settings_from(monkeypatch, LOGS_DCR_IMMUTABLE_ID=LA["LOGS_DCR_IMMUTABLE_ID"])


@pytest.mark.parametrize("env,message", [
    ({"RESULTS_SINK": "both", **LA, "LOGS_INGESTION_ENDPOINT": "http://dce.example"}, "must be an https:// URL"),
    ({"RESULTS_SINK": "both", **LA, "LOGS_DCR_IMMUTABLE_ID": "my-dcr"}, "immutableId"),
    ({"RESULTS_SINK": "both", **LA, "LOGS_STREAM_NAME": "ProvisioningResults_CL"}, "LOGS_STREAM_NAME"),
    ({"RESULTS_SINK": "eventhub"}, "RESULTS_SINK"),
])
def test_bad_log_analytics_settings_are_named(monkeypatch, env, message):
    with pytest.raises(SettingsError, match=message):
        settings_from(monkeypatch, **env)


@pytest.mark.parametrize("cloud,audience", [("Global", "https://monitor.azure.com"),
                                            ("USGovL4", "https://monitor.azure.us"),
                                            ("USGovL5", "https://monitor.azure.us")])
def test_token_audience_follows_the_cloud(monkeypatch, cloud, audience):
    s = settings_from(monkeypatch, RESULTS_SINK="both", GRAPH_CLOUD=cloud, **LA)
    assert s.logs_scope == audience + "/.default"
    assert [type(k).__name__ for k in result_sinks(s, Queues(None))] == ["QueueSink", "LogsQueueSink"]


def test_every_new_setting_is_in_the_sample_with_its_default():
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    defaults = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")
    for field_name, field in Settings.model_fields.items():
        if field.alias.startswith("LOGS_") or field.alias == "RESULTS_SINK":
            assert field.alias in values, field.alias
            default = getattr(defaults, field_name)
            default = default.value if hasattr(default, "value") else default
            expected = "" if default is None else f"{default:g}" if isinstance(default, float) else str(default)
            assert values[field.alias] == expected, field.alias


# --- rows and batches ---------------------------------------------------------------------------

def test_row_of_the_api_pages_first_example():
    row = to_row(seed_result())
    assert check_row(row, COLUMNS) is None
    assert row["TimeGenerated"] == "2026-03-01T12:00:01.234Z" and row["ReceivedAt"] == "2026-03-01T12:00:00.000Z"
    assert row["DurationMs"] == 1234 and isinstance(row["DurationMs"], int)
    assert (row["Result"], row["ErrorCode"], row["Action"]) == ("Skipped", "RedundantExport", "Other")
    assert row["ResultId"] == "req-0:0" and row["RequestId"] == "req-0" and row["CorrelationId"] == "HR-7"
    assert (row["ServicePrincipalId"], row["JobId"], row["RuleId"]) == (SP, JOB, RULE)
    assert (row["ObjectId"], row["ObjectTypeName"]) == ("9bb0f679-a883-4a6f-8260-35b491b8b8c8", "User")
    assert (row["CallIndex"], row["CallCount"], row["Attempts"]) == (0, 1, 2)
    assert row["ChangeId"] == "g8ba3be8-1d7f-4a60-ae31-a8980da0a389" and row["ReportableIdentifier"]
    assert len(row["Steps"]) == 4 and all("name" in s and "status" in s for s in row["Steps"])
    assert len(row["ModifiedProperties"]) == 7 and "displayName" in row["ModifiedProperties"][0]
    assert row["Truncated"] is False
    assert (row["Priority"], row["CallsSaved"]) == ("normal", 0)
    # Every column of the table is filled by a complete result (ServedBy only on a request another
    # call served); nothing outside it is sent.
    assert set(row) == set(COLUMNS) - {"ServedBy"}
    served = to_row(seed_result().model_copy(update={"servedBy": "req-1:0"}))
    assert served["ServedBy"] == "req-1:0" and set(served) == set(COLUMNS)


def test_row_of_a_failure_without_an_outcome_leaves_absent_values_out():
    result = seed_result(result="Error", errorCode="Authorization_RequestDenied", errorMessage="Insufficient privileges.",
                         action=None, changeId=None, reportableIdentifier=None, steps=[], modifiedProperties=[],
                         correlationId=None)
    row = to_row(result)
    assert check_row(row, COLUMNS) is None
    assert row["Result"] == "Error" and row["ErrorCode"] == "Authorization_RequestDenied"
    assert "Action" not in row and "CorrelationId" not in row and row["Steps"] == []


def test_clock_skew_never_gives_a_negative_duration():
    row = to_row(seed_result(completedAt=RECEIVED - timedelta(seconds=1)))
    assert row["DurationMs"] == 0


def big_row(i: int, kib: int) -> dict:
    row = to_row(seed_result(index=i))
    row["Steps"] = [{"name": "Pad", "details": {"blob": "x" * (kib * 1024)}}]
    return row


def test_batches_stay_within_one_megabyte_as_the_sdk_serialises_them():
    rows = [big_row(i, 60) for i in range(40)]  # ~2.5 MB in all
    batches, oversize = split_batches([row_bytes(r) for r in rows])
    assert oversize == []
    assert [i for b in batches for i in b] == list(range(40))  # all, once, in order
    assert len(batches) == 3
    for batch in batches:
        chunk = [rows[i] for i in batch]
        assert len(json.dumps(chunk).encode()) <= MAX_CALL_BYTES
        # The SDK would send our batch as a single call, not split it again.
        assert len(list(_split_chunks(chunk))) == 1
    # Greedy: a batch is closed only when the next row would not fit.
    first = [rows[i] for i in batches[0]] + [rows[batches[1][0]]]
    assert len(json.dumps(first).encode()) > MAX_CALL_BYTES


def test_split_counts_brackets_and_separators():
    # Two rows of 499,999 bytes fit alone but not together: [a, b] is 1,000,002 bytes.
    batches, oversize = split_batches([499_999, 499_999])
    assert batches == [[0], [1]] and oversize == []
    batches, _ = split_batches([499_998, 499_998])  # [a, b] = 2 + 999,996 + 2 = 1,000,000
    assert batches == [[0, 1]]
    batches, oversize = split_batches([10, 999_999, 10])
    assert oversize == [1] and batches == [[0, 2]]


class FakeUploader:
    def __init__(self, refuse=lambda rows: None):
        self.calls: list[list[dict]] = []
        self.refuse = refuse

    def upload(self, rows):
        self.calls.append(rows)
        failure = self.refuse(rows)
        if failure:
            raise failure


def test_a_row_the_service_refuses_does_not_hold_up_the_others():
    rows = [to_row(seed_result(index=i)) for i in range(8)]
    bad = rows[5]["ResultId"]
    fake = FakeUploader(lambda rs: UploadFailed("InvalidRow", "no", 400) if any(r["ResultId"] == bad for r in rs) else None)
    failed = upload_rows(rows, fake)
    assert list(failed) == [5] and failed[5].status == 400 and not failed[5].permanent
    accepted = [r["ResultId"] for call in fake.calls if all(r["ResultId"] != bad for r in call) for r in call]
    assert sorted(accepted) == sorted(r["ResultId"] for i, r in enumerate(rows) if i != 5)  # each once
    assert len(fake.calls) == 7  # [0-7] -> [0-3] ok, [4-7] -> [4,5] -> [4] ok, [5] refused; [6,7] ok


def test_throttling_stops_the_calls_and_every_row_waits():
    rows = [big_row(i, 300) for i in range(7)]  # three calls' worth
    fake = FakeUploader(lambda rs: UploadFailed("TooManyRequests", "slow down", 429, retry_after=7.0))
    failed = upload_rows(rows, fake)
    assert len(fake.calls) == 1  # the other calls would only count against the limit
    assert sorted(failed) == list(range(7)) and all(f.retry_after == 7.0 for f in failed.values())


def test_envelope_fits_a_queue_message_even_for_a_huge_result():
    steps = [{"name": f"s{i}", "details": {"blob": "y" * 4000}} for i in range(30)]
    text = envelope_text(seed_result(steps=steps), attempts=3, last_error="x" * 5000)
    assert len(text.encode()) <= 63 * 1024
    envelope = LogsEnvelope.model_validate_json(text)
    assert envelope.attempts == 3 and len(envelope.lastError) <= 500 and envelope.result.truncated


# --- shipped schema, DCR and queries ------------------------------------------------------------

def test_dcr_stream_matches_the_table_and_passes_rows_through():
    dcr = json.loads(DCR.read_text())["properties"]
    stream = Settings.model_fields["logs_stream_name"].default
    declared = {c["name"]: c["type"] for c in dcr["streamDeclarations"][stream]["columns"]}
    assert declared == COLUMNS
    [flow] = dcr["dataFlows"]
    assert flow["streams"] == [stream] and flow["transformKql"] == "source" and flow["outputStream"] == stream
    assert flow["destinations"] == [d["name"] for d in dcr["destinations"]["logAnalytics"]]
    table = json.loads(TABLE.read_text())
    assert stream == "Custom-" + table["name"]
    assert all(c["type"] in {"string", "int", "long", "real", "boolean", "datetime", "dynamic"} for c in
               table["properties"]["schema"]["columns"])


def strip_kql(text: str) -> tuple[str, list[str]]:
    """The query without comments and with every string literal emptied; and unclosed quotes."""
    out, problems, i = [], [], 0
    while i < len(text):
        if text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while j < len(text) and text[j] not in (ch, "\n"):
                j += 2 if text[j] == "\\" else 1
            if j >= len(text) or text[j] != ch:
                problems.append("unbalanced quote")
                break
            out.append('""')
            i = j + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out), problems


def kql_problems(text: str, columns) -> list[str]:
    """Unbalanced brackets/quotes, and capitalised names that are neither columns of the table nor
    defined in the query (KQL's own operators and functions are all lower case)."""
    code, problems = strip_kql(text)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in code:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                problems.append(f"unbalanced {ch}")
                break
    if stack:
        problems.append(f"unclosed {stack[-1]}")
    defined = set(re.findall(r"\b([A-Za-z_]\w*)\s*=(?!=)", code)) | set(re.findall(r"\blet\s+(\w+)", code))
    for group in re.findall(r"\(([^()]*)\)\s*=(?!=)", code):
        defined.update(n.strip() for n in group.split(","))
    for name in sorted(set(re.findall(r"\b([A-Z]\w*)\b", code))):
        if name not in columns and name not in defined and name != "ProvisioningResults_CL":
            problems.append(f"unknown column {name}")
    return problems


def test_the_queries_ship_and_are_documented():
    names = {q.stem for q in QUERIES}
    assert names == {"failures_by_error_code", "success_rate_per_job", "latency_percentiles",
                     "throttling_and_retries", "still_failing_after_attempts", "calls_saved_by_coalescing"}
    doc = (ROOT / "docs" / "log-analytics.md").read_text()
    for query in QUERIES:
        assert f"queries/{query.name}" in doc, query.name
        assert query.read_text().startswith("// "), "first line says what the query answers"


@pytest.mark.parametrize("query", QUERIES, ids=[q.stem for q in QUERIES])
def test_query_is_balanced_and_uses_only_table_columns(query):
    text = query.read_text()
    assert kql_problems(text, COLUMNS) == []
    assert "ProvisioningResults_CL" in text
    assert "by ResultId" in text  # at-least-once delivery: each query deduplicates first


def test_query_checker_catches_mistakes():
    assert "unknown column ErrorCod" in kql_problems("ProvisioningResults_CL | summarize count() by ErrorCod", COLUMNS)
    assert "unclosed (" in kql_problems("T | where (Result == 'x'", COLUMNS)
    assert "unbalanced quote" in kql_problems('T | where Result == "x', COLUMNS)
    assert kql_problems("T | extend Rate = round(1.0 * Attempts, 1) | where Rate > 1", COLUMNS | {"T": ""}) == []


# --- the simulator ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logs_sim(sims):
    sim = LogsIngestionSimulator(signer=sims.identity.signer).start()
    yield sim
    sim.stop()


def post_rows(sim, rows, token, *, path=None, version="2023-01-01", zipped=True):
    body = json.dumps(rows).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if zipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    path = path or f"/dataCollectionRules/{sim.dcr_id}/streams/{sim.stream}"
    return httpx.post(f"{sim.endpoint}{path}", params={"api-version": version}, content=body, headers=headers,
                      verify=ssl.create_default_context(cafile=str(sim.cert_file)), timeout=10)


def test_simulator_checks_path_version_token_and_schema(logs_sim, sims):
    logs_sim.reset()
    good = sims.mint_token("https://monitor.azure.com")
    row = to_row(seed_result(index=900))
    assert post_rows(logs_sim, [row], good).status_code == 204
    assert post_rows(logs_sim, [row], good, zipped=False).status_code == 204
    assert post_rows(logs_sim, [row], sims.mint_token("https://graph.microsoft.com")).status_code == 401
    assert post_rows(logs_sim, [row], good + "x").status_code == 401  # bad signature
    assert post_rows(logs_sim, [row], good, version="2021-11-01-preview").status_code == 400
    assert post_rows(logs_sim, [row], good, path=f"/dataCollectionRules/dcr-other/streams/{logs_sim.stream}").status_code == 404
    assert post_rows(logs_sim, [row], good, path=f"/dataCollectionRules/{logs_sim.dcr_id}/streams/Custom-Other_CL").status_code == 400
    answer = post_rows(logs_sim, [dict(row, Attempts="two")], good)
    assert answer.status_code == 400 and "Attempts must be of type int" in answer.json()["error"]["message"]
    assert post_rows(logs_sim, [dict(row, Extra=1)], good).status_code == 400
    assert post_rows(logs_sim, [{k: v for k, v in row.items() if k != "TimeGenerated"}], good).status_code == 400
    assert post_rows(logs_sim, [big_row(1, 600), big_row(2, 600)], good, zipped=False).status_code == 413
    assert [r["ResultId"] for r in logs_sim.rows()] == ["req-900:0", "req-900:0"]
    assert [e["gzip"] for e in logs_sim.requests()[:2]] == [True, False]


def test_simulator_faults_count_match_and_retry_after(logs_sim, sims):
    logs_sim.reset()
    token = sims.mint_token("https://monitor.azure.us")
    a, b = to_row(seed_result(index=1)), to_row(seed_result(index=2))
    logs_sim.fail(500, match={"ResultId": "req-2:0"})
    logs_sim.fail(429, count=1, retry_after=3)
    throttled = post_rows(logs_sim, [a], token)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    assert post_rows(logs_sim, [a], token).status_code == 204
    assert post_rows(logs_sim, [a, b], token).status_code == 500
    logs_sim.recover()
    assert post_rows(logs_sim, [b], token).status_code == 204
    assert [r["ResultId"] for r in logs_sim.rows()] == ["req-1:0", "req-2:0"]
    assert logs_sim.requests()[0]["aud"] == "https://monitor.azure.us"


def test_uploader_with_managed_identity_over_tls(logs_sim, sims, monkeypatch):
    """The real SDK, the app's credential and the CA bundle, the way devhost runs them."""
    from shared.graph.credentials import app_credential
    from shared.results.log_analytics import IngestionUploader

    logs_sim.reset()
    for name, value in {**sims.env(), **logs_sim.env()}.items():
        monkeypatch.setenv(name, value)
    settings = settings_from(monkeypatch, RESULTS_SINK="both", **logs_sim.env())
    uploader = IngestionUploader(settings, app_credential(None))
    rows = [to_row(seed_result(index=i)) for i in range(3)]
    uploader.upload(rows)
    assert logs_sim.rows() == rows
    [entry] = logs_sim.requests()
    assert entry["gzip"] and entry["aud"] == "https://monitor.azure.com" and entry["rows"] == 3

    logs_sim.fail(429, count=1, retry_after=2)
    with pytest.raises(UploadFailed) as failed:
        uploader.upload(rows[:1])
    assert failed.value.status == 429 and failed.value.retry_after == 2.0
    logs_sim.fail(503, count=1)
    started = time.monotonic()
    with pytest.raises(UploadFailed) as failed:
        uploader.upload(rows[:1])
    assert failed.value.status == 503 and failed.value.code == "SimulatedFault"
    assert time.monotonic() - started < 2  # the SDK did not retry and sleep
    assert len(logs_sim.requests()) == 3  # one request per failed upload: no hidden retries


# --- the upload function, in-process against Azurite ---------------------------------------------

@pytest.fixture
def la_runtime(azurite, monkeypatch):
    suffix = uuid.uuid4().hex[:8]
    settings = settings_from(monkeypatch, RESULTS_SINK="both", **LA, AzureWebJobsStorage=azurite.connection_string,
                             LOGS_QUEUE=f"unit-logs-{suffix}", DEADLETTER_QUEUE=f"unit-dead-{suffix}",
                             RESULTS_QUEUE=f"unit-results-{suffix}", LOGS_MAX_ATTEMPTS="3",
                             RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="2")
    from shared.queues import service_client

    rt = SimpleNamespace(settings=settings, queues=Queues(service_client(settings)))
    yield rt
    for name in (settings.logs_queue, settings.deadletter_queue, settings.results_queue):
        rt.queues.get(name).delete_queue()


def queue_texts(rt, name, wait=0.0) -> list[str]:
    time.sleep(wait)
    return [m.content for m in rt.queues.get(name).peek_messages(max_messages=32)]


def test_sink_and_function_upload_a_batch_and_empty_the_queue(la_runtime):
    rt = la_runtime
    for sink in result_sinks(rt.settings, rt.queues):
        for i in range(5):
            sink.emit(seed_result(index=i))
    assert len(queue_texts(rt, rt.settings.results_queue)) == 5
    logs = rt.queues.get(rt.settings.logs_queue)
    [first] = list(logs.receive_messages(max_messages=1, visibility_timeout=60))
    fake = FakeUploader()
    upload_message(first.content.encode(), rt, uploader=fake)
    logs.delete_message(first)  # what the host does when the function returns
    assert len(fake.calls) == 1 and sorted(r["ResultId"] for r in fake.calls[0]) == [f"req-{i}:0" for i in range(5)]
    assert queue_texts(rt, rt.settings.logs_queue) == []
    assert queue_texts(rt, rt.settings.deadletter_queue) == []


def test_failed_upload_goes_back_on_the_queue_with_a_delay_then_dead_letters(la_runtime):
    rt = la_runtime
    text = envelope_text(seed_result(index=7))
    throttled = FakeUploader(lambda rows: UploadFailed("TooManyRequests", "slow down", 429, retry_after=2))
    upload_message(text, rt, uploader=throttled)
    assert queue_texts(rt, rt.settings.logs_queue) == []  # hidden for Retry-After
    deadline = time.monotonic() + 10
    while not (waiting := queue_texts(rt, rt.settings.logs_queue)) and time.monotonic() < deadline:
        time.sleep(0.2)
    [again] = waiting
    envelope = LogsEnvelope.model_validate_json(again)
    assert envelope.attempts == 1 and envelope.lastError.startswith("TooManyRequests")
    assert envelope.result.resultId == "req-7:0"

    down = FakeUploader(lambda rows: UploadFailed("ServiceUnavailable", "down", 503))
    logs = rt.queues.get(rt.settings.logs_queue)
    for _ in range(2):  # attempts 2 and 3 of LOGS_MAX_ATTEMPTS=3
        deadline = time.monotonic() + 10
        got = []
        while not got and time.monotonic() < deadline:
            got = list(logs.receive_messages(max_messages=1, visibility_timeout=60))
            time.sleep(0.2)
        [message] = got
        upload_message(message.content, rt, uploader=down)
        logs.delete_message(message)
    [letter] = [json.loads(t) for t in queue_texts(rt, rt.settings.deadletter_queue)]
    assert letter["source"] == "loganalytics" and letter["attempts"] == 3 and letter["requestId"] == "req-7"
    assert letter["reason"]["code"] == "ServiceUnavailable"
    assert "gave up after 3 upload attempts" in letter["reason"]["message"]
    assert LogsEnvelope.model_validate_json(letter["original"]).result.resultId == "req-7:0"
    assert queue_texts(rt, rt.settings.logs_queue, wait=2.5) == []


def test_unreadable_message_is_dead_lettered_and_the_rest_still_uploads(la_runtime):
    rt = la_runtime
    rt.queues.send_text(rt.settings.logs_queue, '{"kind": "somethingElse"}')
    rt.queues.send_text(rt.settings.logs_queue, envelope_text(seed_result(index=3)))
    fake = FakeUploader()
    upload_message(envelope_text(seed_result(index=4)), rt, uploader=fake)
    assert sorted(r["ResultId"] for r in fake.calls[0]) == ["req-3:0", "req-4:0"]
    [letter] = [json.loads(t) for t in queue_texts(rt, rt.settings.deadletter_queue)]
    assert letter["reason"]["code"] == "InvalidLogsMessage" and letter["original"] == '{"kind": "somethingElse"}'
    assert queue_texts(rt, rt.settings.logs_queue) == []


# --- end to end through devhost -----------------------------------------------------------------

@pytest.fixture(scope="module")
def la_env(app_env, logs_sim):
    suffix = uuid.uuid4().hex[:8]
    names = {key: f"la-{key.split('_')[0].lower()}-{suffix}" for key in
             ("INTAKE_QUEUE", "WORK_QUEUE", "RESULTS_QUEUE", "DEADLETTER_QUEUE", "LEASE_QUEUE", "LOGS_QUEUE")}
    return {**app_env, **logs_sim.env(), **names, "RESULTS_SINK": "both", "LOGS_MAX_ATTEMPTS": "8",
            "RETRY_BASE_SECONDS": "1", "RETRY_MAX_SECONDS": "2", "LOGS_BATCH_SIZE": "20",
            # Another app on the same storage: with the default host id, the end-to-end tests'
            # devhost would hold the lease_upkeep singleton lock and this app's pool never be seeded.
            "AzureFunctionsWebHost__hostid": f"la-{suffix}"}


@pytest.fixture(scope="module")
def la_host(la_env, tmp_path_factory):
    from scripts.local_stack import start_devhost

    host = start_devhost(la_env, log_dir=tmp_path_factory.mktemp("devhost-la"))
    yield host
    host.stop()


@pytest.fixture(scope="module")
def la_results(azurite, la_env):
    from tests.conftest import QueueCollector

    collector = QueueCollector(azurite.connection_string, la_env["RESULTS_QUEUE"])
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def la_deadletters(azurite, la_env):
    from tests.conftest import QueueCollector

    collector = QueueCollector(azurite.connection_string, la_env["DEADLETTER_QUEUE"])
    yield collector
    collector.stop()


def provision(host, body) -> str:
    response = httpx.post(f"{host.url}/api/provision", json=body, timeout=30)
    assert response.status_code == 202, response.text
    [accepted] = response.json()["requests"]
    return accepted["requestId"]


def wait_rows(sim, predicate, count=1, timeout=60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in sim.rows() if predicate(r)]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"expected {count} row(s), got {len(found)}: {sim.stats()}"
            return found
        time.sleep(0.2)


def test_event_over_http_becomes_a_row_and_a_result(la_host, la_results, logs_sim):
    example = json.loads((GOLDEN / "example1_user_skipped.json").read_text())
    request_id = provision(la_host, dict(example["request"], servicePrincipalId=example["servicePrincipalId"],
                                         jobId=example["jobId"], correlationId="la-e2e-1"))
    [result] = la_results.wait_for(lambda m: m.get("requestId") == request_id, timeout=60)
    [row] = wait_rows(logs_sim, lambda r: r["RequestId"] == request_id)
    assert row["ResultId"] == result["resultId"] == f"{request_id}:0"
    assert (row["Result"], row["ErrorCode"], row["Action"]) == ("Skipped", "RedundantExport", "Other")
    assert row["CorrelationId"] == "la-e2e-1" and row["Attempts"] == result["attempts"] == 1
    assert len(row["Steps"]) == 4 and len(row["ModifiedProperties"]) == 7
    completed = datetime.fromisoformat(result["completedAt"].replace("Z", "+00:00"))
    received = datetime.fromisoformat(result["receivedAt"].replace("Z", "+00:00"))
    assert abs(row["DurationMs"] - (completed - received).total_seconds() * 1000) <= 1
    entry = next(e for e in logs_sim.requests() if f"{request_id}:0" in e["resultIds"] and e["status"] == 204)
    assert entry["gzip"] and entry["aud"] == "https://monitor.azure.com"


def test_outage_then_recovery_loses_no_row(la_host, la_results, logs_sim):
    logs_sim.fail(503)  # until recover()
    subjects = [f"66666666-0000-4000-8000-00000000000{i}" for i in range(3)]
    ids = [provision(la_host, {"objectId": s, "objectTypeName": "User"}) for s in subjects]
    # Provisioning goes on during the outage: every result reaches the results queue.
    for request_id in ids:
        la_results.wait_for(lambda m, r=request_id: m.get("requestId") == r, timeout=60)
    wanted = {f"{r}:0" for r in ids}

    def refused() -> set[str]:
        return {rid for e in logs_sim.requests() if e["status"] == 503 for rid in e["resultIds"]} & wanted

    deadline = time.monotonic() + 30
    while refused() != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refused() == wanted, "every row was tried during the outage"
    assert not [r for r in logs_sim.rows() if r["ResultId"] in wanted]
    logs_sim.recover()
    logs_sim.fail(429, count=2, retry_after=1)  # the service comes back throttling
    rows = wait_rows(logs_sim, lambda r: r["ResultId"] in wanted, count=3, timeout=60)
    assert {r["ResultId"] for r in rows} == wanted
    assert any(e["status"] == 429 for e in logs_sim.requests())


def test_row_dead_lettered_after_max_attempts(la_host, la_results, la_deadletters, logs_sim):
    subject = "77777777-0000-4000-8000-000000000001"
    logs_sim.fail(500, match={"ObjectId": subject})
    try:
        request_id = provision(la_host, {"objectId": subject, "objectTypeName": "User"})
        la_results.wait_for(lambda m: m.get("requestId") == request_id, timeout=60)
        [letter] = la_deadletters.wait_for(lambda m: m.get("requestId") == request_id, timeout=90)
    finally:
        logs_sim.recover()
    assert letter["source"] == "loganalytics" and letter["attempts"] == 8
    assert letter["reason"]["code"] == "SimulatedFault" and letter["reason"]["details"]["status"] == 500
    assert "gave up after 8 upload attempts" in letter["reason"]["message"]
    envelope = LogsEnvelope.model_validate_json(letter["original"])
    assert envelope.result.requestId == request_id and envelope.attempts == 8
    tried = [e for e in logs_sim.requests() if f"{request_id}:0" in e["resultIds"]]
    assert len(tried) == 8 and all(e["status"] == 500 for e in tried)
    assert not [r for r in logs_sim.rows() if r["RequestId"] == request_id]
