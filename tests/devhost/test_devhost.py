"""devhost, the local Functions host: unit tests of its parsers, then system tests that run
`python -m devhost` on tests/devhost/app against a real Azurite."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import pytest
from azure.storage.queue import QueueClient

from devhost.azurite import Azurite, free_port, start_azurite
from devhost.functions import Binding, FunctionSpec, describe_functions
from devhost.host_config import (
    HostConfigError,
    QueueOptions,
    apply_overrides,
    parse_host_config,
    parse_timespan,
)
from devhost.invocation import FunctionTimeoutError, Invoker, OutputBindingError
from devhost.ncrontab import CronError, CronSchedule
from devhost.queue_listener import QueueListener
from devhost.routing import Route, Router
from devhost.settings import SettingsError, apply_settings, resolve_expressions
from devhost.storage import (
    MessageDecodeError,
    QueueClients,
    QueueWatcher,
    decode_message,
    encode_message,
    resolve_connection_string,
)
from scripts.local_stack import stop_process

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "tests" / "devhost" / "app"


# --------------------------------------------------------------------------------------------
# Unit tests (no processes)
# --------------------------------------------------------------------------------------------
class TestNcrontab:
    @pytest.mark.parametrize(("expression", "after", "expected"), [
        ("*/5 * * * * *", datetime(2024, 1, 31, 23, 59, 58), datetime(2024, 2, 1, 0, 0, 0)),
        ("0 */5 * * * *", datetime(2024, 1, 1, 10, 3, 0), datetime(2024, 1, 1, 10, 5, 0)),
        ("0 30 9 * * 1-5", datetime(2024, 1, 5, 9, 30, 0), datetime(2024, 1, 8, 9, 30, 0)),  # Fri -> Mon
        ("0 0 9 * * MON,WED", datetime(2024, 1, 1, 9, 0, 0), datetime(2024, 1, 3, 9, 0, 0)),
        ("0 0 0 29 2 *", datetime(2024, 3, 1), datetime(2028, 2, 29)),
        ("5/20 * * * * *", datetime(2024, 1, 1, 0, 0, 30), datetime(2024, 1, 1, 0, 0, 45)),
        ("0 0 12 1 JAN-MAR *", datetime(2024, 3, 2), datetime(2025, 1, 1, 12)),
        ("0 15 10 * * *", datetime(2024, 1, 1, 10, 15, 0, 500), datetime(2024, 1, 2, 10, 15)),
        ("30 * * * *", datetime(2024, 1, 1, 0, 0, 0), datetime(2024, 1, 1, 0, 30, 0)),  # 5 fields: second 0
    ])
    def test_next_occurrence(self, expression: str, after: datetime, expected: datetime) -> None:
        assert CronSchedule.parse(expression).next_after(after) == expected

    def test_day_of_month_and_week_must_both_match(self) -> None:
        # NCrontab semantics: the 13th that is also a Friday.
        assert CronSchedule.parse("0 0 0 13 * 5").next_after(datetime(2024, 1, 1)) == datetime(2024, 9, 13)

    @pytest.mark.parametrize("expression", ["* * * * *  * *", "60 * * * * *", "*/0 * * * * *",
                                            "0 0 0 * * 7", "5-1 * * * * *", "a * * * * *", "0 0 0 31 2 *"])
    def test_invalid(self, expression: str) -> None:
        with pytest.raises(CronError):
            CronSchedule.parse(expression).next_after(datetime(2024, 1, 1))


class TestRouting:
    def router(self) -> Router[str]:
        return Router([
            Route("api/items/{id:int}/{name?}", frozenset({"GET", "POST"}), "items"),
            Route("api/items/special", frozenset({"GET"}), "special"),
            Route("api/files/{*path}", None, "files"),
            Route("api/users/{id:guid}", None, "user"),
            Route("api/page/{n:int:range(1,5)}", None, "page"),
        ])

    def test_params_optional_and_constraints(self) -> None:
        router = self.router()
        match, _ = router.resolve("/api/items/7", "GET")
        assert match is not None and (match.target, match.params) == ("items", {"id": "7"})
        match, _ = router.resolve("/API/Items/7/some%20name", "post")
        assert match is not None and match.params == {"id": "7", "name": "some name"}
        assert router.resolve("/api/items/seven", "GET") == (None, set())
        assert router.resolve("/api/page/9", "GET") == (None, set())
        match, _ = router.resolve("/api/users/3f2504e0-4f89-11d3-9a0c-0305e82c3301", "GET")
        assert match is not None and match.target == "user"
        match, _ = router.resolve("/api/files/a/b/c.txt", "GET")
        assert match is not None and match.params == {"path": "a/b/c.txt"}

    def test_literal_beats_parameter_and_method_mismatch_is_reported(self) -> None:
        router = self.router()
        match, _ = router.resolve("/api/items/special", "GET")
        assert match is not None and match.target == "special"
        match, allowed = router.resolve("/api/items/7", "DELETE")
        assert match is None and allowed == {"GET", "POST"}
        assert router.resolve("/api/nothing", "GET") == (None, set())


class TestHostConfig:
    def test_defaults(self) -> None:
        config = parse_host_config({})
        assert config.route_prefix == "api" and config.function_timeout is None
        assert config.queues == QueueOptions(new_batch_threshold=8 * (os.cpu_count() or 1))

    def test_values_timespans_and_overrides(self) -> None:
        document: dict[str, Any] = {
            "functionTimeout": "00:05:00",
            "extensions": {"http": {"routePrefix": ""},
                           "queues": {"batchSize": 4, "maxPollingInterval": 2000, "visibilityTimeout": "00:00:30",
                                      "maxDequeueCount": 2, "messageEncoding": "none"}},
        }
        apply_overrides(document, {"AzureFunctionsJobHost__extensions__queues__BATCHSIZE": "3",
                                   "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": "1",
                                   "UNRELATED": "x"})
        config = parse_host_config(document)
        assert config.route_prefix == "" and config.function_timeout == 300
        assert config.queues == QueueOptions(batch_size=3, new_batch_threshold=1, max_polling_interval=2.0,
                                             visibility_timeout=30.0, max_dequeue_count=2, message_encoding="none")

    def test_timespan_and_errors(self) -> None:
        assert parse_timespan("1.02:03:04.5", "x") == 86400 + 2 * 3600 + 3 * 60 + 4.5
        with pytest.raises(HostConfigError, match="x"):
            parse_timespan("5 minutes", "x")
        with pytest.raises(HostConfigError, match="batchSize"):
            parse_host_config({"extensions": {"queues": {"batchSize": 64}}})
        with pytest.raises(HostConfigError, match="messageEncoding"):
            parse_host_config({"extensions": {"queues": {"messageEncoding": "utf8"}}})


class TestSettingsAndStorage:
    def test_environment_wins_over_file_values(self) -> None:
        environ = {"A": "from-env"}
        applied = apply_settings({"A": "from-file", "B": "from-file", "N": 3}, environ)
        assert environ == {"A": "from-env", "B": "from-file", "N": "3"} and set(applied) == {"B", "N"}

    def test_binding_expressions(self) -> None:
        assert resolve_expressions("%Q%-x", {"Q": "jobs"}, "w") == "jobs-x"
        assert resolve_expressions(["%A%", 1], {"A": "a"}, "w") == ["a", 1]
        with pytest.raises(SettingsError, match="'MISSING'.*not set"):
            resolve_expressions("%MISSING%", {}, "function 'f', binding 'msg' property 'queueName'")

    def test_message_encodings(self) -> None:
        assert encode_message("héllo", "base64") == base64.b64encode("héllo".encode()).decode()
        assert decode_message(encode_message(b"\x00\xff", "base64"), "base64") == b"\x00\xff"
        assert encode_message("héllo", "none") == "héllo" and decode_message("héllo", "none") == "héllo".encode()
        with pytest.raises(MessageDecodeError):
            decode_message("not base64!", "base64")

    def test_development_storage_maps_to_azurite_defaults(self) -> None:
        conn = resolve_connection_string("AzureWebJobsStorage", {"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
        assert "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1" in conn
        # The host also looks for AzureWebJobs<name>.
        assert resolve_connection_string("Other", {"AzureWebJobsOther": "x=y"}) == "x=y"

    def test_a_disabled_function_is_not_loaded(self) -> None:
        def described(environ: dict[str, str]) -> tuple[list[FunctionSpec], list[str]]:
            app = func.FunctionApp()  # the SDK refuses to list one app's functions twice

            @app.route(route="a")
            def door(req: func.HttpRequest) -> str:
                return "a"

            @app.queue_trigger(arg_name="msg", queue_name="q", connection="AzureWebJobsStorage")
            def worker(msg: func.QueueMessage) -> None:
                pass
            return describe_functions(app, environ)

        def loaded(environ: dict[str, str]) -> list[str]:
            return [spec.name for spec in described(environ)[0]]
        assert loaded({}) == ["door", "worker"]
        assert loaded({"AzureWebJobs.worker.Disabled": "true"}) == ["door"]
        assert loaded({"AzureWebJobs.door.Disabled": "True", "AzureWebJobs.worker.Disabled": "false"}) == ["worker"]
        assert "'worker' is disabled" in described({"AzureWebJobs.worker.Disabled": "1"})[1][0]


def _spec(function: Callable[..., Any], trigger_type: str = "queueTrigger", trigger_name: str = "msg",
          outputs: tuple[Binding, ...] = (), **trigger: Any) -> FunctionSpec:
    return FunctionSpec(name=function.__name__, func=function, outputs=outputs,
                        trigger=Binding(trigger_type, "in", trigger_name, trigger),
                        wants_context="context" in function.__code__.co_varnames[:function.__code__.co_argcount])


class TestInvoker:
    @pytest.fixture
    def invoker(self) -> Iterator[Invoker]:
        invoker = Invoker(QueueClients({}), QueueWatcher(), message_encoding="base64", function_timeout=0.5)
        yield invoker
        invoker.shutdown()

    def test_sync_async_and_context(self, invoker: Invoker) -> None:
        def sync(msg: str, context: Any) -> str:
            return f"{msg} {context.function_name} {len(context.invocation_id)}"

        async def asynchronous(msg: str) -> str:
            await asyncio.sleep(0.01)
            return msg.upper()

        assert invoker.invoke(_spec(sync), "hi", reason="test") == "hi sync 36"
        assert invoker.invoke(_spec(asynchronous), "hi", reason="test") == "HI"

    def test_function_timeout_discards_outputs(self, invoker: Invoker) -> None:
        finished = threading.Event()

        def slow(msg: str, out: Any) -> None:
            out.set(["never sent"])  # would need storage; reaching the send would fail differently
            time.sleep(1.0)
            finished.set()

        spec = _spec(slow, outputs=(Binding("queue", "out", "out", {"queueName": "q"}),))
        with pytest.raises(FunctionTimeoutError, match="Timeout value of 0.5s exceeded"):
            invoker.invoke(spec, "x", reason="test")
        assert invoker.activity.active == 0
        assert finished.wait(2)

    def test_unsupported_queue_output_value_fails_the_invocation(self, invoker: Invoker) -> None:
        def bad(msg: str, out: Any) -> None:
            out.set({"a": 1})  # the worker's queue converter takes str, bytes, QueueMessage or lists of them

        spec = _spec(bad, outputs=(Binding("queue", "out", "out", {"queueName": "q"}),))
        with pytest.raises(OutputBindingError, match="cannot send a dict"):
            invoker.invoke(spec, "x", reason="test")


# --------------------------------------------------------------------------------------------
# System tests: real devhost processes and Azurite
# --------------------------------------------------------------------------------------------
# Everything the host or the sample app reads; a test host sees only what its test passes.
_HOST_PREFIXES = ("AzureFunctionsJobHost__", "AzureFunctionsWebHost__", "AzureWebJobs", "DEVHOST_",
                  "WEBSITE_", "PYTHON_THREADPOOL")
_APP_SETTINGS = {"WORK_QUEUE", "RESULT_QUEUE", "FAIL_QUEUE", "OUTBOX_QUEUE", "TIMER_QUEUE", "TIMER_SCHEDULE",
                 "GREETING", "TARGET", "WORK_DELAY_SECONDS", "FUNCTIONS_WORKER_RUNTIME"}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def queue_settings() -> dict[str, str]:
    """Fresh queue names for one host (or group of hosts), through %SETTING% expressions."""
    tag = uuid.uuid4().hex[:10]
    return {name: f"{name.split('_')[0].lower()}-{tag}"
            for name in ("WORK_QUEUE", "RESULT_QUEUE", "FAIL_QUEUE", "OUTBOX_QUEUE", "TIMER_QUEUE")}


class DevHost:
    """`python -m devhost` on the sample app, with its output captured to a file."""

    def __init__(self, azurite: Azurite, log_dir: Path, settings: dict[str, str], *args: str,
                 host_id: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_PREFIXES) and k not in _APP_SETTINGS}
        env.update(AzureWebJobsStorage=azurite.connection_string,
                   AzureFunctionsWebHost__hostid=host_id or f"test-{uuid.uuid4().hex[:8]}", **settings)
        self.settings = settings
        self.port = free_port()
        self.log_path = log_dir / f"devhost-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devhost", "--app-dir", str(APP_DIR), "--port", str(self.port), *args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 20) -> "DevHost":
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"devhost exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url("/admin/host/status"), timeout=1).json() == {"state": "Running"}
            except httpx.HTTPError:
                return False
        wait_for(ready, timeout, "devhost readiness")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if not stop_process(self.process, sig, timeout):
            raise AssertionError(f"devhost did not stop within {timeout}s:\n{self.log()}")
        self._log.close()
        return self.process.returncode


class Queues:
    def __init__(self, azurite: Azurite) -> None:
        self._conn = azurite.connection_string

    def client(self, name: str) -> QueueClient:
        return QueueClient.from_connection_string(self._conn, name)

    def send(self, name: str, content: str) -> str:
        client = self.client(name)
        try:
            client.create_queue()
        except Exception:
            pass  # already there
        return client.send_message(content).id

    def peek(self, name: str) -> list[str]:
        try:
            return [m.content for m in self.client(name).peek_messages(max_messages=32)]
        except Exception:
            return []  # queue not created yet

    def take(self, name: str, count: int, timeout: float) -> list[str]:
        """Receive and delete until `count` messages were taken (fails on timeout)."""
        taken: list[str] = []
        client = self.client(name)

        def more() -> bool:
            try:
                for message in client.receive_messages(max_messages=32, messages_per_page=32):
                    taken.append(message.content)
                    client.delete_message(message)
            except Exception:
                pass  # queue not created yet
            return len(taken) >= count
        wait_for(more, timeout, f"{count} message(s) on {name} (have {len(taken)})", interval=0.05)
        return taken


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8")


@pytest.fixture(scope="module")
def devhost_azurite() -> Iterator[Azurite]:
    azurite = start_azurite()
    try:
        yield azurite
    finally:
        azurite.stop()


@pytest.fixture(scope="module")
def queues(devhost_azurite: Azurite) -> Queues:
    return Queues(devhost_azurite)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devhost-logs")


@pytest.fixture(scope="module")
def main_host(devhost_azurite: Azurite, log_dir: Path) -> Iterator[DevHost]:
    """The sample app with its own host.json (base64, maxDequeueCount 3, visibilityTimeout 0)."""
    host = DevHost(devhost_azurite, log_dir, {**queue_settings(), "TARGET": "from-environment"})
    try:
        yield host.wait_ready()
    finally:
        host.stop()


@pytest.fixture(scope="module")
def plain_host(devhost_azurite: Azurite, log_dir: Path) -> Iterator[DevHost]:
    """messageEncoding none (overridden like in Azure), function keys on, settings from --settings."""
    settings_file = log_dir / "plain.settings.json"
    settings_file.write_text(json.dumps({"Values": {"GREETING": "from --settings", "TARGET": "file",
                                                    "TIMER_SCHEDULE": "0 0 0 1 1 *"}}))
    host = DevHost(devhost_azurite, log_dir,
                   {**queue_settings(), "AzureFunctionsJobHost__extensions__queues__messageEncoding": "none",
                    "DEVHOST_FUNCTION_KEY": "sekrit", "DEVHOST_EMULATE_EASY_AUTH": "true"},
                   "--settings", str(settings_file))
    try:
        yield host.wait_ready()
    finally:
        host.stop()


class TestHttp:
    def test_startup_lists_functions_like_core_tools(self, main_host: DevHost) -> None:
        log = main_host.log()
        assert f"items: [GET,POST] http://127.0.0.1:{main_host.port}/api/items/{{id:int}}/{{name?}}" in log
        assert "\twork: queueTrigger" in log and "\ttick: timerTrigger" in log
        assert "\nHost started\n" in log

    def test_route_params_query_headers_and_body(self, main_host: DevHost) -> None:
        response = httpx.get(main_host.url("/api/items/42/widget?color=red&color=blue&flag="),
                             headers={"X-Test": "yes"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-function"] == "items"
        assert response.json() == {"method": "GET", "route_params": {"id": "42", "name": "widget"},
                                   "params": {"color": "red,blue", "flag": ""}, "body": "", "header": "yes",
                                   "principal": None}
        posted = httpx.post(main_host.url("/api/items/7"), content=b"payload")
        assert posted.json()["route_params"] == {"id": "7"} and posted.json()["body"] == "payload"

    def test_each_request_on_a_keep_alive_connection_gets_its_own_body(self, main_host: DevHost) -> None:
        with httpx.Client() as client:   # one connection, reused
            bodies = [client.post(main_host.url("/api/items/7"), content=f"payload-{i}".encode()).json()["body"]
                      for i in range(4)]
        assert bodies == ["payload-0", "payload-1", "payload-2", "payload-3"]

    def test_404_405_and_literal_routes(self, main_host: DevHost) -> None:
        assert httpx.get(main_host.url("/api/items/special")).text == "special"
        not_allowed = httpx.delete(main_host.url("/api/items/7"))
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET, POST"
        assert httpx.get(main_host.url("/api/items/not-an-int")).status_code == 404  # {id:int}
        assert httpx.get(main_host.url("/api/nowhere")).status_code == 404
        assert httpx.get(main_host.url("/items/7")).status_code == 404  # routePrefix is required

    def test_exception_is_500_with_json_error(self, main_host: DevHost) -> None:
        response = httpx.get(main_host.url("/api/boom"))
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "InternalError" and "kaboom" in error["message"]
        assert 'raise RuntimeError("kaboom")' in main_host.log()  # traceback logged

    def test_settings_file_values_and_environment_precedence(self, main_host: DevHost) -> None:
        # Not set for the process: comes from tests/devhost/app/local.settings.sample.json.
        assert httpx.get(main_host.url("/api/settings")).json() == {
            "GREETING": "hello from local.settings.sample.json", "TARGET": "from-environment"}

    def test_settings_flag_chooses_the_file(self, plain_host: DevHost) -> None:
        assert httpx.get(plain_host.url("/api/settings")).json() == {"GREETING": "from --settings", "TARGET": "file"}

    def test_client_principal_headers_are_stripped_unless_emulating_easy_auth(
            self, main_host: DevHost, plain_host: DevHost) -> None:
        # Like App Service, which lets no client set them; an emulating host plays the platform.
        sent = {"X-MS-CLIENT-PRINCIPAL": "eyJjbGFpbXMiOltdfQ==", "X-MS-CLIENT-PRINCIPAL-ID": "someone"}
        assert httpx.get(main_host.url("/api/items/1"), headers=sent).json()["principal"] is None
        passed = httpx.get(plain_host.url("/api/items/1"), headers={**sent, "x-functions-key": "sekrit"})
        assert passed.json()["principal"] == sent["X-MS-CLIENT-PRINCIPAL"]

    def test_function_keys_when_configured(self, main_host: DevHost, plain_host: DevHost) -> None:
        assert httpx.get(main_host.url("/api/secure")).text == "secret"  # not enforced by default
        assert httpx.get(plain_host.url("/api/secure")).status_code == 401
        assert httpx.get(plain_host.url("/api/secure?code=wrong")).status_code == 401
        assert httpx.get(plain_host.url("/api/secure?code=sekrit")).text == "secret"
        assert httpx.get(plain_host.url("/api/secure"), headers={"x-functions-key": "sekrit"}).text == "secret"
        assert httpx.get(plain_host.url("/api/items/1")).status_code == 200  # anonymous


class TestQueues:
    def test_http_output_binding_base64(self, main_host: DevHost, queues: Queues) -> None:
        outbox = main_host.settings["OUTBOX_QUEUE"]
        assert httpx.post(main_host.url("/api/enqueue"), content="héllo").status_code == 202
        assert [unb64(m) for m in queues.take(outbox, 1, 10)] == ["héllo"]
        assert httpx.post(main_host.url("/api/enqueue"), json=["a", "b", "c"]).status_code == 202
        assert sorted(unb64(m) for m in queues.take(outbox, 3, 10)) == ["a", "b", "c"]

    def test_queue_trigger_writes_output_base64(self, main_host: DevHost, queues: Queues) -> None:
        message_id = queues.send(main_host.settings["WORK_QUEUE"], b64("job-1 ü"))
        [result] = queues.take(main_host.settings["RESULT_QUEUE"], 1, 15)
        assert json.loads(unb64(result)) == {"body": "job-1 ü", "id": message_id, "dequeue_count": 1,
                                             "pid": main_host.process.pid}
        wait_for(lambda: not queues.peek(main_host.settings["WORK_QUEUE"]), 10, "the message to be deleted")
        wait_for(lambda: f"Queue '{main_host.settings['WORK_QUEUE']}' message {message_id} for 'Functions.work': "
                         "dequeue count 1, succeeded" in main_host.log(), 5, "the success log line")

    def test_failing_function_is_retried_then_poisoned(self, main_host: DevHost, queues: Queues) -> None:
        fail_queue = main_host.settings["FAIL_QUEUE"]
        message_id = queues.send(fail_queue, b64("doomed"))
        poisoned = wait_for(lambda: queues.peek(f"{fail_queue}-poison"), 20, "the poison message")
        assert poisoned == [b64("doomed")]  # copied unchanged, still base64
        assert queues.peek(fail_queue) == []

        def settled() -> list[str]:
            lines = [line for line in main_host.log().splitlines() if f"message {message_id} for" in line]
            return lines if len(lines) >= 3 else []
        lines = wait_for(settled, 5, "the poison move's log line")  # logged just after the move
        assert len(lines) == 3, lines  # maxDequeueCount 3 in tests/devhost/app/host.json
        assert "dequeue count 1, failed, retry in 0s" in lines[0]
        assert "dequeue count 2, failed, retry in 0s" in lines[1]
        assert "dequeue count 3, failed 3 time(s), moved to" in lines[2]
        # Output bindings of a failed invocation are never sent.
        assert all("must not be sent" not in unb64(m) for m in queues.peek(main_host.settings["RESULT_QUEUE"]))

    def test_undecodable_base64_message_ends_in_poison(self, main_host: DevHost, queues: Queues) -> None:
        work = main_host.settings["WORK_QUEUE"]
        message_id = queues.send(work, "this is not base64!")
        assert wait_for(lambda: queues.peek(f"{work}-poison"), 20, "the poison message") == ["this is not base64!"]
        # The host logs the move just after making it: wait for the line rather than race it.
        settled = f"message {message_id} for 'Functions.work': dequeue count 3"
        log = wait_for(lambda: settled in main_host.log() and main_host.log(), 5, "the poison move's log line")
        assert f"message {message_id} cannot be decoded (messageEncoding=base64)" in log

    def test_encoding_none_both_ways(self, plain_host: DevHost, queues: Queues) -> None:
        message_id = queues.send(plain_host.settings["WORK_QUEUE"], "plain text ü, not base64")
        [result] = queues.take(plain_host.settings["RESULT_QUEUE"], 1, 15)
        assert json.loads(result)["body"] == "plain text ü, not base64"
        assert json.loads(result)["id"] == message_id
        assert httpx.post(plain_host.url("/api/enqueue"), content="raw").status_code == 202
        assert queues.take(plain_host.settings["OUTBOX_QUEUE"], 1, 10) == ["raw"]

    def test_local_write_wakes_the_listener(self, devhost_azurite: Azurite, log_dir: Path, queues: Queues) -> None:
        """A queue output write in-process skips the listener's back-off (shared queue watcher)."""
        host = DevHost(devhost_azurite, log_dir,
                       {**queue_settings(), "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:01:00"},
                       "--verbose").wait_ready()
        try:
            work = host.settings["WORK_QUEUE"]

            def long_sleep() -> bool:
                for line in host.log().splitlines():
                    if f"Queue '{work}': empty poll, next poll in" in line and float(line.rsplit(" ", 1)[1][:-1]) >= 2.5:
                        return True
                return False
            wait_for(long_sleep, 15, "the listener to back off to >= 2.5s")
            started = time.monotonic()
            assert httpx.post(host.url("/api/submit"), content="fast").status_code == 202
            [result] = queues.take(host.settings["RESULT_QUEUE"], 1, 10)
            assert json.loads(unb64(result))["body"] == "fast"
            assert time.monotonic() - started < 2.0
            assert f"Queue '{work}': woken early" in host.log()
        finally:
            assert host.stop() == 0


    @contextlib.contextmanager
    def in_process_listener(self, azurite: Azurite, function: Callable[..., Any], queue_name: str,
                            **options: Any) -> Iterator[Invoker]:
        """A QueueListener for `function` on queue_name inside the test process."""
        clients = QueueClients({"AzureWebJobsStorage": azurite.connection_string})
        invoker = Invoker(clients, QueueWatcher(), message_encoding="none", function_timeout=None)
        listener = QueueListener(
            _spec(function, queueName=queue_name, connection="AzureWebJobsStorage"), clients, QueueWatcher(),
            invoker, QueueOptions(**{"batch_size": 4, "new_batch_threshold": 2, "max_polling_interval": 0.2,
                                     "max_dequeue_count": 3, "message_encoding": "none", **options.pop("queue", {})}),
            **options)
        listener.start()
        try:
            yield invoker
        finally:
            listener.close()
            invoker.shutdown()
            clients.close()

    def test_message_lease_is_renewed_while_the_function_runs(self, devhost_azurite: Azurite,
                                                               queues: Queues) -> None:
        """A 2 s lease and a 3 s function: renewal keeps the message hidden, so it runs once."""
        queue_name = f"lease-{uuid.uuid4().hex[:8]}"
        calls: list[int | None] = []

        def slow(msg: func.QueueMessage) -> None:
            calls.append(msg.dequeue_count)
            time.sleep(3)

        queues.send(queue_name, "long job")
        with self.in_process_listener(devhost_azurite, slow, queue_name, message_lease=2) as invoker:
            wait_for(lambda: calls, 10, "the invocation to start")
            assert invoker.activity.wait_idle(10)
            assert wait_for(lambda: queues.peek(queue_name) == [], 5, "the message to be deleted")
        assert calls == [1]  # never redelivered while it ran

    def test_message_over_max_dequeue_count_is_poisoned_unprocessed(self, devhost_azurite: Azurite,
                                                                     queues: Queues) -> None:
        queue_name = f"over-{uuid.uuid4().hex[:8]}"
        queues.send(queue_name, "seen too often")
        client = queues.client(queue_name)
        for _ in range(3):  # dequeue count 3 so far; the listener's receive makes it 4 > maxDequeueCount 3
            [message] = list(client.receive_messages(visibility_timeout=30))
            client.update_message(message.id, pop_receipt=message.pop_receipt, visibility_timeout=0)
        calls: list[str] = []
        with self.in_process_listener(devhost_azurite, lambda msg: calls.append("ran"), queue_name):
            poisoned = wait_for(lambda: queues.peek(f"{queue_name}-poison"), 10, "the poison message")
        assert poisoned == ["seen too often"] and queues.peek(queue_name) == [] and calls == []


class TestTimerScaleOutAndShutdown:
    def test_timer_runs_on_startup(self, main_host: DevHost, queues: Queues) -> None:
        [fired] = queues.take(main_host.settings["TIMER_QUEUE"], 1, 15)
        assert json.loads(unb64(fired)) == {"past_due": False, "pid": main_host.process.pid}

    def test_two_hosts_share_a_queue_and_the_timer(self, devhost_azurite: Azurite, log_dir: Path,
                                                   queues: Queues) -> None:
        settings = {**queue_settings(), "WORK_DELAY_SECONDS": "0.2",
                    "AzureFunctionsJobHost__extensions__queues__batchSize": "2",
                    "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": "1",
                    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:01"}
        host_id = f"scale-{uuid.uuid4().hex[:8]}"  # instances of one app share the timer lock
        hosts = [DevHost(devhost_azurite, log_dir, settings, host_id=host_id) for _ in range(2)]
        try:
            for host in hosts:
                host.wait_ready()
            bodies = {f"job-{i}" for i in range(40)}
            for body in bodies:
                queues.send(settings["WORK_QUEUE"], b64(body))
            results = [json.loads(unb64(m)) for m in queues.take(settings["RESULT_QUEUE"], 40, 30)]
            time.sleep(1.0)  # anything processed twice would show up now
            results += [json.loads(unb64(m)) for m in queues.peek(settings["RESULT_QUEUE"])]
            assert sorted(r["body"] for r in results) == sorted(bodies)  # each exactly once
            assert {r["dequeue_count"] for r in results} == {1}  # no lease was lost or retried
            assert {r["pid"] for r in results} == {h.process.pid for h in hosts}  # both did work
            # The timer is a singleton across the instances: runOnStartup fired once, not twice.
            assert len(queues.peek(settings["TIMER_QUEUE"])) == 1
        finally:
            codes = [host.stop() for host in hosts]
        assert codes == [0, 0]

    def test_sigterm_lets_running_invocation_finish(self, devhost_azurite: Azurite, log_dir: Path,
                                                    queues: Queues) -> None:
        settings = {**queue_settings(), "WORK_DELAY_SECONDS": "2"}
        host = DevHost(devhost_azurite, log_dir, settings).wait_ready()
        queues.send(settings["WORK_QUEUE"], b64("slow"))
        wait_for(lambda: "Executing 'Functions.work'" in host.log(), 15, "the invocation to start")
        assert host.stop(signal.SIGTERM, timeout=15) == 0
        log = host.log()
        assert log.index("Application is shutting down") < log.index("Executed 'Functions.work' (Succeeded")
        assert "Host stopped" in log
        assert json.loads(unb64(queues.take(settings["RESULT_QUEUE"], 1, 5)[0]))["body"] == "slow"
        assert queues.peek(settings["WORK_QUEUE"]) == []  # completed and deleted, not left hidden
        with pytest.raises(httpx.HTTPError):
            httpx.get(host.url("/admin/host/status"), timeout=1)

    def test_sigint_stops_an_idle_host_cleanly(self, devhost_azurite: Azurite, log_dir: Path) -> None:
        host = DevHost(devhost_azurite, log_dir, queue_settings()).wait_ready()
        started = time.monotonic()
        assert host.stop(signal.SIGINT, timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "Host stopped" in host.log() and "Traceback" not in host.log()

    def test_missing_setting_fails_start_naming_it(self, devhost_azurite: Azurite, log_dir: Path) -> None:
        settings = queue_settings()
        del settings["WORK_QUEUE"]
        host = DevHost(devhost_azurite, log_dir, settings)
        assert host.process.wait(30) == 1
        host.stop()
        assert "app setting 'WORK_QUEUE' (%WORK_QUEUE%), which is not set" in host.log()
