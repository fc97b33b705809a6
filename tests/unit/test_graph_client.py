"""Graph client unit tests: failure classification, Retry-After forms, path encoding, headers.

httpx's MockTransport stands in for the network here; the end-to-end tests use the Graph simulator.
"""
import gzip
import json
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from shared.errors import GraphFailure
from shared.graph.client import GraphClient, SendTiming, provision_path
from shared.graph.decoding import UNKNOWN_RESULT, decode
from shared.graph.retry_policy import backoff_seconds, parse_retry_after
from shared.models import Subject, WorkItem, utcnow
from shared.settings import Settings


class FixedToken:
    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken
        return AccessToken("tkn", 2_000_000_000)


def item(**overrides) -> WorkItem:
    base = dict(requestId="r-1", servicePrincipalId="c8c95753-f628-48e1-9fab-76c2d4cf624c", jobId="job.1",
                ruleId="rule", subject=Subject(objectId="9bb0f679-a883-4a6f-8260-35b491b8b8c8", objectTypeName="User"),
                receivedAt=utcnow())
    base.update(overrides)
    return WorkItem(**base)


def client(handler) -> GraphClient:
    s = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", GRAPH_ENDPOINT="http://graph.test")
    return GraphClient(s, FixedToken(), httpx.Client(base_url=s.graph_root, transport=httpx.MockTransport(handler)))


def failure_for(response: httpx.Response) -> GraphFailure:
    with pytest.raises(GraphFailure) as info:
        client(lambda request: response).provision_on_demand(item(), "tkn", SendTiming())
    return info.value


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408])
def test_throttling_and_server_errors_are_transient(status):
    failure = failure_for(httpx.Response(status, json={"error": {"code": "Busy", "message": "later"}}))
    assert failure.kind == "transient" and failure.status == status and failure.code == "Busy"


@pytest.mark.parametrize("status", [400, 401, 404, 409])
def test_client_errors_are_permanent(status):
    failure = failure_for(httpx.Response(status, json={"error": {"code": "RequestParameterInvalid", "message": "m"}}))
    assert failure.kind == "permanent" and failure.code == "RequestParameterInvalid"


def test_403_names_the_roles_needed():
    failure = failure_for(httpx.Response(403, json={"error": {"code": "Authorization_RequestDenied", "message": "no"}}))
    assert failure.kind == "permanent"
    assert "Synchronization.ReadWrite.All" in failure.message and "Application.ReadWrite.OwnedBy" in failure.message


def test_non_json_error_body_still_classified():
    failure = failure_for(httpx.Response(502, text="<html>bad gateway</html>"))
    assert (failure.kind, failure.code) == ("transient", "HTTP502")


def answer_for(response: httpx.Response):
    return client(lambda request: response).provision_on_demand(item(), "tkn", SendTiming())


GOOD_KEY = '{"result":"Success","details":{}}'


@pytest.mark.parametrize("body", [
    b"Microsoft.Identity.Health.CPP.Common.DataContracts.SyncFabric.StatusInfo",  # not JSON
    b"[1,2]", b"null", b'"a string"', b"{",
    json.dumps({"key": {"result": "Success", "details": {}}, "value": "{}"}).encode(),  # key as an object
    json.dumps({"key": GOOD_KEY, "value": {"action": "Create"}}).encode(),  # value as an object
    json.dumps({"key": GOOD_KEY, "value": ["x"]}).encode(),
])
def test_a_200_graph_cannot_read_is_unknown_with_the_raw_text_never_a_failure(body):
    outcome = decode(answer_for(httpx.Response(200, content=body)))
    assert outcome.result == UNKNOWN_RESULT and outcome.errorCode == "UnreadableGraphAnswer"
    assert outcome.rawBody == body.decode()


def test_a_200_with_corrupt_content_encoding_is_unknown_with_the_raw_bytes():
    corrupt = b"\x1f\x8b not really gzip"
    outcome = decode(answer_for(httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Streamed(corrupt))))
    assert outcome.result == UNKNOWN_RESULT and "DecodingError" in outcome.errorMessage
    assert outcome.rawBody == corrupt.decode("utf-8", "replace")


def test_a_200_with_good_gzip_is_read():
    body = gzip.compress(json.dumps({"key": GOOD_KEY, "value": "{}"}).encode())
    assert decode(answer_for(httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Streamed(body)))).result == "Success"


def test_an_error_status_with_corrupt_content_encoding_is_still_classified_by_status():
    failure = failure_for(httpx.Response(503, headers={"Content-Encoding": "gzip", "Retry-After": "4"}, stream=Streamed(b"junk")))
    assert (failure.kind, failure.status, failure.retry_after) == ("transient", 503, 4.0)


class Streamed(httpx.SyncByteStream):
    """A body the client reads off the wire (MockTransport hands over bytes it was given as read)."""

    def __init__(self, body: bytes):
        self.body = body

    def __iter__(self):
        yield self.body


class BreaksMidBody(httpx.SyncByteStream):
    def __iter__(self):
        yield b'{"key": "'
        raise httpx.ReadError("connection reset")


def test_a_200_cut_off_mid_body_is_unknown_because_graph_already_acted():
    outcome = decode(answer_for(httpx.Response(200, stream=BreaksMidBody())))
    assert outcome.result == UNKNOWN_RESULT and "ReadError" in outcome.errorMessage


def test_a_500_cut_off_mid_body_is_transient():
    assert failure_for(httpx.Response(500, stream=BreaksMidBody())).kind == "transient"


def every_httpx_exception() -> list[type[Exception]]:
    return sorted((c for c in vars(httpx).values() if isinstance(c, type) and issubclass(c, Exception)
                   and c.__module__.startswith("httpx")), key=lambda c: c.__name__)


def raising(cls: type[Exception]):
    def handler(request):
        if issubclass(cls, httpx.HTTPStatusError):
            raise cls("x", request=request, response=httpx.Response(500))
        if issubclass(cls, httpx.RequestError):
            raise cls("x", request=request)
        raise cls() if issubclass(cls, httpx.StreamError) and cls is not httpx.StreamError else cls("x")
    return handler


@pytest.mark.parametrize("cls", every_httpx_exception(), ids=lambda c: c.__name__)
def test_every_httpx_exception_becomes_a_classified_graph_failure(cls):
    with pytest.raises(GraphFailure) as info:
        client(raising(cls)).provision_on_demand(item(), "tkn", SendTiming())
    assert info.value.kind in ("transient", "permanent") and cls.__name__ in info.value.message
    with pytest.raises(GraphFailure):
        client(raising(cls)).get_job("sp", "job", "tkn")


@pytest.mark.parametrize("cls,kind,acted", [
    (httpx.ConnectError, "transient", False), (httpx.ConnectTimeout, "transient", False),
    (httpx.PoolTimeout, "transient", False), (httpx.ReadTimeout, "transient", True),
    (httpx.ReadError, "transient", True), (httpx.RemoteProtocolError, "transient", True),
    (httpx.LocalProtocolError, "permanent", False), (httpx.UnsupportedProtocol, "permanent", False),
    (httpx.InvalidURL, "permanent", False), (httpx.TooManyRedirects, "permanent", False),
])
def test_transport_failures_say_whether_to_retry_and_whether_graph_may_have_acted(cls, kind, acted):
    with pytest.raises(GraphFailure) as info:
        client(raising(cls)).provision_on_demand(item(), "tkn", SendTiming())
    assert info.value.kind == kind and ("may have acted" in info.value.message) == acted


@pytest.mark.parametrize("header,expected", [("7", 7.0), ("0", 0.0), ("2.5", 2.5), (None, None), ("soon", None)])
def test_retry_after_seconds(header, expected):
    headers = {"Retry-After": header} if header is not None else {}
    failure = failure_for(httpx.Response(429, headers=headers))
    assert failure.retry_after == expected


def test_retry_after_http_date():
    now = datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0


def test_transport_errors_are_transient_and_say_whether_anything_was_sent():
    def refuse(request):
        raise httpx.ConnectError("refused")
    with pytest.raises(GraphFailure) as info:
        client(refuse).provision_on_demand(item(), "tkn", SendTiming())
    assert (info.value.kind, info.value.code) == ("transient", "ConnectionError")
    assert info.value.timing.started is None


def test_request_path_headers_and_body():
    seen = {}

    def capture(request: httpx.Request):
        seen.update(path=request.url.raw_path.decode(), headers=request.headers, body=request.content)
        return httpx.Response(200, json={"key": '{"result":"Success","details":{}}', "value": "{}"})
    answer = client(capture).provision_on_demand(item(jobId="Job.With-Dots_1"), "tkn", SendTiming())
    assert answer.key.startswith('{"result":"Success"')
    assert seen["path"] == ("/v1.0/servicePrincipals/c8c95753-f628-48e1-9fab-76c2d4cf624c"
                            "/synchronization/jobs/Job.With-Dots_1/provisionOnDemand")
    assert seen["headers"]["authorization"] == "Bearer tkn"
    assert seen["headers"]["client-request-id"] == "r-1"


@pytest.mark.parametrize("job", ["../x", "a/b", "a?b=c", "a#b", "a%2Fb", "a\nb"])
def test_path_segments_are_fully_encoded(job):
    path = provision_path("v1.0", "sp", job)
    segment = path.split("/jobs/")[1].removesuffix("/provisionOnDemand")
    assert "/" not in segment and "?" not in segment and "#" not in segment and "\n" not in segment


def test_backoff_grows_is_capped_and_jittered():
    rng = random.Random(1)
    delays = [backoff_seconds(n, 5, 60, rng) for n in range(1, 8)]
    assert 2.5 <= delays[0] <= 5 and all(30 <= d <= 60 for d in delays[4:])
    assert len({round(backoff_seconds(3, 5, 60, rng), 3) for _ in range(20)}) > 1
