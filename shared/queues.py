"""Queue access through the azure-storage-queue SDK: plain JSON text on every queue.

host.json sets messageEncoding to "none", so the trigger sees exactly what was sent; intake also
accepts base64 because that is what the Functions default and many SDK samples produce.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.queue import QueueClient, QueueMessage, QueueServiceClient
from pydantic import BaseModel

from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
NEVER_EXPIRE = -1
DEV_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def connection_string(settings: Settings) -> str | None:
    conn = settings.storage_connection
    return DEV_STORAGE if conn and conn.strip() == "UseDevelopmentStorage=true" else conn


def transport_options() -> dict[str, Any]:
    """The storage clients' transport, reading the environment once rather than on every request:
    `requests` scans all of os.environ for proxies per request (about 0.5 ms of CPU each, a tenth
    of an HTTP intake's; BENCHMARKS.md "Intake speed"). The CA bundle it would have read from
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE is passed as such; with a proxy in the environment the
    transport is left as it is (`requests` then applies NO_PROXY per request)."""
    if urllib.request.getproxies():
        return {}
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return {"transport": RequestsTransport(use_env_settings=False, **({"connection_verify": bundle} if bundle else {}))}


def service_client(settings: Settings) -> QueueServiceClient:
    if settings.storage_connection:
        return QueueServiceClient.from_connection_string(connection_string(settings), **transport_options())
    from shared.graph.credentials import app_credential

    return QueueServiceClient(settings.queue_service_uri, credential=app_credential(settings.azure_client_id),
                              **transport_options())


class Queues:
    """Named queue clients, created on first use (idempotently, so many instances may race)."""

    def __init__(self, service: QueueServiceClient):
        self.service = service
        self._ready: dict[str, QueueClient] = {}

    def get(self, name: str) -> QueueClient:
        client = self._ready.get(name)
        if client is None:
            client = self.service.get_queue_client(name)
            try:
                client.create_queue()
            except ResourceExistsError:
                pass
            self._ready[name] = client
        return client

    def send_text(self, name: str, text: str, *, delay: int = 0) -> QueueMessage:
        """The message as sent: its id and pop receipt can delete it again."""
        return self.get(name).send_message(text, visibility_timeout=max(0, int(delay)) or None,
                                           time_to_live=NEVER_EXPIRE)

    def send_json(self, name: str, body: BaseModel | dict[str, Any], *, delay: int = 0) -> None:
        text = body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel) else json.dumps(body)
        self.send_text(name, text, delay=delay)
