"""Running one function invocation the way the Python worker does.

Sync functions run on a shared thread pool sized like the worker's (PYTHON_THREADPOOL_THREAD_COUNT),
async functions on one shared event loop. Output bindings are flushed only after the function
returned, so a failing invocation sends nothing. host.json `functionTimeout` is enforced by
abandoning the invocation: Python cannot kill the thread, but its outputs are discarded and the
trigger sees a failure, which is what the caller of a timed-out function observes in Azure.
"""
from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import contextlib
import inspect
import logging
import os
import threading
import time
import traceback
import typing
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.functions import _queue as azf_queue

from devhost.functions import RETURN, Binding, FunctionSpec
from devhost.storage import QueueClients, QueueWatcher, encode_message

log = logging.getLogger("devhost.invocation")
_INTERNAL_PREFIXES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                      os.path.dirname(os.path.abspath(concurrent.futures.__file__)) + os.sep)


class FunctionTimeoutError(TimeoutError):
    """The invocation ran longer than host.json functionTimeout."""


class OutputBindingError(TypeError):
    """The function gave an output binding a value it cannot carry."""


class OutValue(func.Out[Any]):
    """The `func.Out` the worker passes for each output-binding parameter."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


@dataclass(frozen=True)
class TraceContext:
    trace_parent: str = ""
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryContext:
    retry_count: int = 0
    max_retry_count: int = 0
    exception: Any = None


class InvocationContext(func.Context):
    """`func.Context` for functions that declare a `context` parameter."""

    def __init__(self, invocation_id: str, function_name: str, function_directory: str) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._local = threading.local()
        self._local.invocation_id = invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return self._local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> Any:
        return TraceContext()

    @property
    def retry_context(self) -> Any:
        return RetryContext()


class ActivityTracker:
    """Counts work in progress so shutdown can wait for it to drain."""

    def __init__(self) -> None:
        self._active = 0
        self._changed = threading.Condition()

    def begin(self) -> None:
        with self._changed:
            self._active += 1

    def end(self) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    @property
    def active(self) -> int:
        with self._changed:
            return self._active

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._active == 0, timeout)


def _queue_contents(value: Any, binding: Binding, encoding: str) -> list[str]:
    """Wire texts for a queue output value; accepts what the worker's queue converter accepts."""
    if value is None:
        return []

    def one(item: Any) -> str:
        if isinstance(item, (str, bytes, bytearray)):
            return encode_message(bytes(item) if isinstance(item, bytearray) else item, encoding)
        if isinstance(item, azf_queue.QueueMessage):
            return encode_message(item.get_body(), encoding)
        raise OutputBindingError(
            f"queue output '{binding.name}' cannot send a {type(item).__name__}; use str, bytes, "
            "func.QueueMessage or a list of them")

    if isinstance(value, (str, bytes, bytearray, azf_queue.QueueMessage)):
        return [one(value)]
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, collections.abc.Mapping):
        return [one(item) for item in value]
    return [one(value)]


def user_traceback(exc: BaseException) -> str:
    """The exception with its traceback minus devhost's and the thread pool's own frames."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith(_INTERNAL_PREFIXES)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    return "".join([*lines, *traceback.format_exception_only(type(exc), exc)]).rstrip()


def trigger_type_hint(spec: FunctionSpec) -> Any:
    """The annotation of the trigger parameter (the worker converts queue bodies to str/bytes by it)."""
    try:
        hints = typing.get_type_hints(spec.func)
    except Exception:  # unresolvable forward references: fall back to the rich type
        return None
    return hints.get(spec.trigger.name)


class _EventLoopThread:
    """One event loop for all async functions, as in the worker."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, awaitable: collections.abc.Awaitable[Any]) -> Any:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="devhost-async", daemon=True).start()
            loop = self._loop

        async def wrapper() -> Any:  # run_coroutine_threadsafe needs a coroutine, not any awaitable
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result()

    def stop(self) -> None:
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop = None


class Invoker:
    def __init__(self, clients: QueueClients, watcher: QueueWatcher, *, message_encoding: str,
                 function_timeout: float | None, max_workers: int | None = None) -> None:
        self._clients = clients
        self._watcher = watcher
        self._encoding = message_encoding
        self._timeout = function_timeout
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="devhost-worker")
        self._loop = _EventLoopThread()
        self.activity = ActivityTracker()

    @staticmethod
    def worker_count_from_env() -> int | None:
        """PYTHON_THREADPOOL_THREAD_COUNT, which sizes the real worker's sync thread pool."""
        raw = os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT", "").strip()
        return int(raw) if raw.isdigit() and int(raw) > 0 else None

    def invoke(self, spec: FunctionSpec, trigger_value: Any, reason: str) -> Any:
        """Run spec with its trigger value; return the HTTP output value (if any) or the return value.

        Raises whatever the function raised, FunctionTimeoutError, or OutputBindingError.
        """
        invocation_id = str(uuid.uuid4())
        outs = {b.name: OutValue() for b in spec.outputs if b.name != RETURN}
        kwargs: dict[str, Any] = {spec.trigger.name: trigger_value, **outs}
        if spec.wants_context:
            kwargs["context"] = InvocationContext(invocation_id, spec.name, spec.directory)
        abandoned = threading.Event()
        started = threading.Event()

        def run() -> Any:
            started.set()
            result = spec.func(**kwargs)
            if inspect.isawaitable(result):
                result = self._loop.run(result)
            if abandoned.is_set():
                raise FunctionTimeoutError("outputs discarded: the invocation had already timed out")
            self._flush_queue_outputs(spec, outs, result)
            http = spec.http_output
            if http is not None and http.name != RETURN:
                return outs[http.name].get()
            return result

        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, invocation_id)
        begin = time.monotonic()
        with self.activity.track():
            future: Future[Any] = self._pool.submit(run)
            try:
                # The timeout counts from the start of the function, not from queueing for a thread.
                while not started.wait(0.5) and not future.done():
                    pass
                try:
                    value = future.result(timeout=self._timeout)
                except TimeoutError as exc:
                    if future.done():
                        raise
                    abandoned.set()
                    raise FunctionTimeoutError(
                        f"Timeout value of {self._timeout:g}s exceeded by function 'Functions.{spec.name}' "
                        f"(Id: {invocation_id}); its thread is abandoned and its outputs discarded") from exc
            except BaseException as exc:
                duration = (time.monotonic() - begin) * 1000
                log.error("Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)\n%s",
                          spec.name, invocation_id, duration, user_traceback(exc))
                raise
        duration = (time.monotonic() - begin) * 1000
        log.info("Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)", spec.name, invocation_id, duration)
        return value

    def _flush_queue_outputs(self, spec: FunctionSpec, outs: dict[str, OutValue], result: Any) -> None:
        # Convert everything first: a bad value in one binding must not leave others half-sent.
        batches = []
        for binding in spec.queue_outputs:
            value = result if binding.name == RETURN else outs[binding.name].get()
            contents = _queue_contents(value, binding, self._encoding)
            if contents:
                client = self._clients.queue(binding.get("connection"), str(binding.get("queueName")))
                batches.append((client, contents))
        for client, contents in batches:
            for content in contents:
                self._clients.send(client, content)
            self._watcher.notify(client.url)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop.stop()
