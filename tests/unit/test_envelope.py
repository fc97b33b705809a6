"""Fast intake's envelope (shared/intake/envelope.py): post-derived requestIds that a status read
can trace to their post, and envelopes that always fit a queue message."""
from __future__ import annotations

import json
import uuid

import pytest

from shared.intake import envelope
from shared.status.received import request_secret
from shared.intake.validation import accept
from shared.models import GUID_RE
from shared.settings import Settings

SETTINGS = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=str(uuid.uuid4()),
                    DEFAULT_JOB_ID="job1", DEFAULT_RULE_ID="rule1")


def events(count: int, **extra) -> str:
    return json.dumps([{"objectId": str(uuid.uuid4()), "objectTypeName": "User", **extra} for _ in range(count)])


def test_request_ids_are_guids_that_name_their_post_index_and_secret():
    post, key = envelope.new_post()
    ids = [envelope.request_id(post, key, i) for i in (0, 1, 999)]
    assert all(GUID_RE.match(rid) and uuid.UUID(rid).version == 8 for rid in ids)
    assert [envelope.post_of(rid) for rid in ids] == [(post, i, request_secret(key, i)) for i in (0, 1, 999)]
    assert envelope.post_of(ids[0].upper()) == (post, 0, request_secret(key, 0))
    # Another post's key gives other secrets: knowing one request's id tells nothing of its neighbours'.
    assert len({request_secret(k, i) for k in (key, envelope.new_post()[1]) for i in range(100)}) == 200


@pytest.mark.parametrize("other", [str(uuid.uuid4()), str(uuid.uuid5(uuid.NAMESPACE_URL, "x")),
                                   "00000000-0000-0000-0000-000000000000"])
def test_other_guids_name_no_post(other):
    assert envelope.post_of(other) is None


def test_a_1000_event_post_fits_in_envelopes_under_the_limit_and_opens_to_the_same_requests():
    post, key = envelope.new_post()
    accepted = envelope.named(accept(events(1000, correlationId="hr-" + "x" * 100), SETTINGS), post, key)
    texts = envelope.envelopes(accepted, post)
    assert len(texts) > 1 and all(len(t.encode("utf-8")) <= envelope.MAX_ENVELOPE_BYTES for t in texts)
    assert all(envelope.is_envelope(t) for t in texts)
    opened = [r for t in texts for r in envelope.opened(t)]
    assert [r.requestId for r in opened] == [envelope.request_id(post, key, i) for i in range(1000)]
    assert [[i.model_dump() for i in r.items] for r in opened] == [[i.model_dump() for i in r.items] for r in accepted]
    assert all(item.requestId == r.requestId for r in opened for item in r.items)


def test_a_request_too_large_for_one_message_is_not_enveloped():
    from dataclasses import replace

    [one] = accept(events(1), SETTINGS)
    calls = [one.items[0].model_copy(update={"callIndex": i}) for i in range(200)]
    assert envelope.size([one, replace(one, items=calls)]) is None and 0 < envelope.size([one]) < 2000


def test_an_event_is_never_taken_for_an_envelope():
    assert not envelope.is_envelope(events(1)) and not envelope.is_envelope('{"objectId": "x", "kind": "acceptedRequests"}')
