"""The rate gate's queue store against real Azurite, through a proxy that loses answers (R2 of the
rate issue): a put whose answer is lost is never repeated, so the pool never holds more than N
valid tokens, and the next upkeep repairs a short pool."""
from __future__ import annotations

import json
import time
import uuid

import pytest
from azure.storage.queue import QueueClient

from scripts.storage_proxy import StorageProxy
from shared.ratelimit.token_gate import QueueTokenStore, RateGate

CALLS = 5


@pytest.fixture
def proxied_queue(azurite):
    proxy = StorageProxy("127.0.0.1", azurite.queue_port).start()
    name = f"lease-{uuid.uuid4().hex[:10]}"
    connection = azurite.connection_string.replace(f"127.0.0.1:{azurite.queue_port}", f"127.0.0.1:{proxy.port}")
    yield proxy, QueueClient.from_connection_string(connection, name), \
        QueueClient.from_connection_string(azurite.connection_string, name)
    proxy.stop()


def valid_tokens(direct: QueueClient) -> int:
    """Tokens of the current epoch, once every stored message has become visible (a second after minting)."""
    deadline = time.monotonic() + 15
    while True:
        properties = direct.get_queue_properties()
        seen = direct.peek_messages(max_messages=32)
        if len(seen) >= properties.approximate_message_count or time.monotonic() > deadline:
            return sum(json.loads(m.content)["epoch"] == properties.metadata["epoch"] for m in seen)
        time.sleep(0.2)


def test_a_lost_answer_to_a_token_put_never_stores_a_sixth_token(proxied_queue):
    proxy, via_proxy, direct = proxied_queue
    gate = RateGate(QueueTokenStore(via_proxy), CALLS, 1.0, 0.0, 5.0, epoch_ttl=0.0)
    proxy.lose_answer("POST", "/messages", nth=3)     # the third token is stored, its answer lost
    gate._mint("test: a put loses its answer")
    assert valid_tokens(direct) <= CALLS
    assert valid_tokens(direct) == 3                  # never retried; the rest of the mint was left out


def test_the_next_upkeep_repairs_a_pool_left_short(proxied_queue):
    proxy, via_proxy, direct = proxied_queue
    gate = RateGate(QueueTokenStore(via_proxy), CALLS, 1.0, 0.0, 5.0, epoch_ttl=0.0)
    proxy.lose_answer("POST", "/messages", nth=2)
    gate.ensure_pool()
    first = direct.get_queue_properties().metadata["epoch"]
    gate.ensure_pool()                                # the upkeep finds 2 of 5 and mints afresh
    assert direct.get_queue_properties().metadata["epoch"] != first
    assert valid_tokens(direct) == CALLS
