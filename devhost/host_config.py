"""The parts of host.json the devhost honours, with the Functions host's defaults.

Like the real host, any setting can be overridden by an environment variable named
`AzureFunctionsJobHost__path__to__setting` (e.g. `AzureFunctionsJobHost__extensions__queues__batchSize`),
which lets one app directory run under several configurations.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OVERRIDE_PREFIX = "AzureFunctionsJobHost__"
_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)$")


class HostConfigError(ValueError):
    """host.json (or an override) holds a value the host would reject."""


def parse_timespan(value: Any, setting: str, *, number_unit_seconds: float | None = None) -> float:
    """Seconds from a .NET TimeSpan string ("d.hh:mm:ss.fff").

    `number_unit_seconds` allows bare numbers for settings where host.json documents them
    (maxPollingInterval may be given in milliseconds).
    """
    if number_unit_seconds is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) * number_unit_seconds
        if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
            return float(value) * number_unit_seconds
    if isinstance(value, str):
        match = _TIMESPAN.match(value.strip())
        if match:
            days = int(match.group("days") or 0)
            return days * 86400 + int(match.group("h")) * 3600 + int(match.group("m")) * 60 + float(match.group("s"))
    raise HostConfigError(f"{setting}: {value!r} is not a TimeSpan like \"00:00:30\"")


@dataclass(frozen=True)
class QueueOptions:
    """`extensions.queues`, with the Storage Queues extension (v5) defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)
    # None means no limit ("-1" in host.json, or not set: Core Tools does not impose one).
    function_timeout: float | None = None


def _as_int(value: Any, setting: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise HostConfigError(f"{setting}: {value!r} is not an integer")
    try:
        number = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise HostConfigError(f"{setting}: {value!r} is not an integer") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise HostConfigError(f"{setting}: {number} must be {bound}")
    return number


def _get(section: Mapping[str, Any], key: str) -> Any:
    """Case-insensitive lookup: host.json keys are case-insensitive, as in .NET configuration."""
    for name, value in section.items():
        if name.lower() == key.lower():
            return value
    return None


def _section(document: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    current: Any = document
    for key in path:
        current = _get(current, key) if isinstance(current, Mapping) else None
        if current is None:
            return {}
    if not isinstance(current, Mapping):
        raise HostConfigError(f"{'.'.join(path)} must be an object")
    return current


def apply_overrides(document: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Fold `AzureFunctionsJobHost__a__b` variables into the host.json document (in place)."""
    for name, raw in environ.items():
        if not name.startswith(OVERRIDE_PREFIX):
            continue
        path = [part for part in name[len(OVERRIDE_PREFIX):].split("__") if part]
        if not path:
            continue
        node = document
        for key in path[:-1]:
            existing = next((k for k in node if k.lower() == key.lower()), key)
            child = node.get(existing)
            if not isinstance(child, dict):
                child = node[existing] = {}
            node = child
        leaf = next((k for k in node if k.lower() == path[-1].lower()), path[-1])
        node[leaf] = raw  # strings; the typed readers below coerce them.
    return document


def load_host_config(app_dir: Path, environ: Mapping[str, str] | None = None) -> HostConfig:
    env = os.environ if environ is None else environ
    path = app_dir / "host.json"
    document: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError as exc:
            raise HostConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise HostConfigError(f"{path} must hold a JSON object")
        document = loaded
    return parse_host_config(apply_overrides(document, env))


def parse_host_config(document: Mapping[str, Any]) -> HostConfig:
    http = _section(document, "extensions", "http")
    prefix = _get(http, "routePrefix")
    route_prefix = "api" if prefix is None else str(prefix).strip("/")

    queues = _section(document, "extensions", "queues")
    batch_raw = _get(queues, "batchSize")
    batch_size = 16 if batch_raw is None else _as_int(batch_raw, "extensions.queues.batchSize", 1, 32)
    threshold_raw = _get(queues, "newBatchThreshold")
    # The extension's default is batchSize/2 per processor: a bigger machine keeps more in flight.
    new_batch_threshold = (
        _as_int(threshold_raw, "extensions.queues.newBatchThreshold", 0)
        if threshold_raw is not None
        else (batch_size // 2) * (os.cpu_count() or 1)
    )
    polling_raw = _get(queues, "maxPollingInterval")
    max_polling = (
        60.0 if polling_raw is None
        else parse_timespan(polling_raw, "extensions.queues.maxPollingInterval", number_unit_seconds=0.001)
    )
    if max_polling < 0.1:
        raise HostConfigError("extensions.queues.maxPollingInterval must be at least 100 ms")
    visibility_raw = _get(queues, "visibilityTimeout")
    visibility = 0.0 if visibility_raw is None else parse_timespan(visibility_raw, "extensions.queues.visibilityTimeout")
    dequeue_raw = _get(queues, "maxDequeueCount")
    max_dequeue = 5 if dequeue_raw is None else _as_int(dequeue_raw, "extensions.queues.maxDequeueCount", 1)
    encoding = str(_get(queues, "messageEncoding") or "base64").lower()
    if encoding not in ("base64", "none"):
        raise HostConfigError(f"extensions.queues.messageEncoding: {encoding!r} must be 'base64' or 'none'")

    timeout_raw = _get(document, "functionTimeout")
    function_timeout: float | None = None
    if timeout_raw is not None and str(timeout_raw).strip() not in ("-1", ""):
        function_timeout = parse_timespan(timeout_raw, "functionTimeout")

    return HostConfig(
        route_prefix=route_prefix,
        queues=QueueOptions(
            batch_size=batch_size,
            new_batch_threshold=new_batch_threshold,
            max_polling_interval=max_polling,
            visibility_timeout=visibility,
            max_dequeue_count=max_dequeue,
            message_encoding=encoding,
        ),
        function_timeout=function_timeout,
    )
